"""Hugging Face transformers as the independent reference, both ways, for ``VideoMAEForPreTraining`` and
``VideoMAEForVideoClassification`` with ``use_mean_pooling`` true and false (tiny configs: seconds on CPU).

HF's ``fc_norm`` and decoder ``norm`` use LayerNorm's default eps 1e-5 where the official code (and ours) uses
1e-6; the comparisons set those two to 1e-6 so they can be exact to float rounding."""

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from model import VideoMAE, VideoMAEClassifier, get_config, load_checkpoint, save_checkpoint  # noqa: E402
from pipeline.loader.masking import tube_mask  # noqa: E402

CFG = get_config("tiny", drop_path_rate=0.0)
CASES = [(kind, pooling) for kind in ("pretrain", "classifier") for pooling in (True, False)]


def _hf_config(kind, use_mean_pooling):
    labels = {"id2label": {str(i): f"c{i}" for i in range(5)}} if kind == "classifier" else {}
    return transformers.VideoMAEConfig(
        image_size=CFG.img_size,
        patch_size=CFG.patch_size,
        num_frames=CFG.num_frames,
        tubelet_size=CFG.tubelet_size,
        hidden_size=CFG.encoder_width,
        num_hidden_layers=CFG.encoder_depth,
        num_attention_heads=CFG.encoder_heads,
        intermediate_size=CFG.encoder_mlp_hidden,
        decoder_hidden_size=CFG.decoder_width,
        decoder_num_hidden_layers=CFG.decoder_depth,
        decoder_num_attention_heads=CFG.decoder_heads,
        decoder_intermediate_size=CFG.decoder_mlp_hidden,
        layer_norm_eps=1e-6,
        use_mean_pooling=use_mean_pooling,
        **labels,
    )


def _hf_class(kind):
    return (
        transformers.VideoMAEForPreTraining
        if kind == "pretrain"
        else transformers.VideoMAEForVideoClassification
    )


def _perturb(model, seed):
    """Non-trivial q/v biases and norms, so their mapping is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_bias", "v_bias", "query.bias", "value.bias")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _set_eps(hf):
    for m in hf.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-6
    return hf.eval()


def _inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, CFG.num_frames, CFG.img_size, CFG.img_size, generator=g)
    return x, tube_mask(2, *CFG.grid, CFG.mask_ratio, g)


def _outputs(model, hf=None):
    """Our ``(loss, pred)`` / logits, and HF's for the same inputs (HF takes ``[B, T, C, H, W]``)."""
    x, mask = _inputs()
    with torch.no_grad():
        if hf is None:
            return model(x, mask) if isinstance(model, VideoMAE) else (model(x),)
        if isinstance(hf, transformers.VideoMAEForPreTraining):
            out = hf(x.transpose(1, 2), bool_masked_pos=mask)
            return out.loss, out.logits
        return (hf(x.transpose(1, 2)).logits,)


def _close(a, b):
    assert len(a) == len(b) and all(
        torch.allclose(x, y, atol=1e-5, rtol=1e-5) for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("kind,use_mean_pooling", CASES)
def test_hf_native_checkpoint_loads_with_same_outputs(tmp_path, kind, use_mean_pooling):
    torch.manual_seed(0)
    hf = _perturb(_hf_class(kind)(_hf_config(kind, use_mean_pooling)), 1)
    hf.save_pretrained(str(tmp_path / "hf"))
    ours, meta = load_checkpoint(str(tmp_path / "hf"))
    assert meta["format"] == "hf" and meta["kind"] == kind
    assert isinstance(ours, VideoMAE if kind == "pretrain" else VideoMAEClassifier)
    if kind == "pretrain":  # HF use_mean_pooling drops the final encoder norm of pretraining models too
        assert ours.cfg.encoder_norm is (not use_mean_pooling)
    else:
        assert ours.cfg.use_mean_pooling is use_mean_pooling and ours.num_classes == 5
    _close(_outputs(ours.eval()), _outputs(None, _set_eps(hf)))


@pytest.mark.parametrize("kind,use_mean_pooling", CASES)
def test_our_hf_export_loads_in_transformers_with_same_outputs(tmp_path, kind, use_mean_pooling):
    field = (
        {"use_mean_pooling": use_mean_pooling}
        if kind == "classifier"
        else {"encoder_norm": not use_mean_pooling}
    )
    cfg = dataclasses.replace(CFG, **field)
    torch.manual_seed(0)
    ours = _perturb(
        VideoMAE(cfg) if kind == "pretrain" else VideoMAEClassifier(cfg, 5, init_scale=1.0), 2
    ).eval()
    hf, info = _hf_class(kind).from_pretrained(
        save_checkpoint(ours, str(tmp_path / "ours"), format="hf"), output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert hf.config.use_mean_pooling is use_mean_pooling
    _close(_outputs(ours), _outputs(None, _set_eps(hf)))
    # the q/v biases matter and survived: zeroing them changes our output, and HF matched the non-zero ones
    zeroed = _perturb(VideoMAE(cfg) if kind == "pretrain" else VideoMAEClassifier(cfg, 5), 0)
    zeroed.load_state_dict(ours.state_dict())
    with torch.no_grad():
        for name, p in zeroed.named_parameters():
            if name.endswith(("q_bias", "v_bias")):
                p.zero_()
    assert not torch.allclose(_outputs(zeroed.eval())[-1], _outputs(ours)[-1], atol=1e-3)


@pytest.mark.parametrize("spelling", ["q_bias", "query.bias"])
def test_both_hf_bias_spellings_are_read(tmp_path, spelling):
    """Files name the biases ``attention.attention.q_bias`` (Hub, transformers 4.x) or ``query.bias`` (5.x's
    module names); both load, and the bias values arrive."""
    torch.manual_seed(0)
    ours = _perturb(VideoMAE(CFG), 3).eval()
    url = save_checkpoint(ours, str(tmp_path / "p"), format="hf")
    weights = load_file(f"{url}/model.safetensors")
    if spelling == "query.bias":
        renamed = {}
        for k, v in weights.items():
            k = k.replace("attention.attention.q_bias", "attention.attention.query.bias")
            renamed[k.replace("attention.attention.v_bias", "attention.attention.value.bias")] = v
        weights = renamed
    assert any(spelling in k for k in weights)
    save_file(weights, f"{url}/model.safetensors", metadata={"format": "pt"})
    loaded, _ = load_checkpoint(url)
    _close(_outputs(loaded.eval()), _outputs(ours))
    hf, info = transformers.VideoMAEForPreTraining.from_pretrained(url, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    _close(_outputs(None, _set_eps(hf)), _outputs(ours))


@pytest.mark.parametrize("layout", ["sharded", "pytorch_model.bin"])
def test_sharded_and_legacy_hf_weights(tmp_path, layout):
    """Hub directories come with sharded safetensors or only a legacy ``pytorch_model.bin``."""
    torch.manual_seed(0)
    hf = _perturb(transformers.VideoMAEForVideoClassification(_hf_config("classifier", True)), 4)
    url = str(tmp_path / "hf")
    if layout == "sharded":
        hf.save_pretrained(url, max_shard_size="100KB")
        assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    else:
        hf.save_pretrained(url)
        (tmp_path / "hf" / "model.safetensors").unlink()
        torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    ours, _ = load_checkpoint(url)
    _close(_outputs(ours.eval()), _outputs(None, _set_eps(hf)))
