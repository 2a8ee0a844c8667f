import argparse
import dataclasses
import os

import pytest
import torch

from model import VideoMAE, VideoMAEClassifier, get_config, load_checkpoint, save_checkpoint
from model.checkpoint import official_state_dict
from model.keymaps import CLASSIFIER, PRETRAIN, from_hf, to_hf
from pipeline.loader.masking import tube_mask

CFG = get_config("tiny", drop_path_rate=0.0)


def _inputs(cfg=CFG, batch=2):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size, generator=g)
    return x, tube_mask(batch, *cfg.grid, cfg.mask_ratio, g)


def _pretrain(cfg=CFG):
    torch.manual_seed(0)
    model = VideoMAE(cfg).eval()
    with torch.no_grad():  # non-trivial biases so the q/v/k bias handling is exercised
        for name, p in model.named_parameters():
            if name.endswith(("q_bias", "v_bias")):
                p.normal_(0, 0.5)
    return model


def _classifier(cfg=CFG):
    torch.manual_seed(1)
    return VideoMAEClassifier(cfg, 5, init_scale=1.0).eval()


def _same_pretrain(a, b, cfg=CFG):
    x, mask = _inputs(cfg)
    with torch.no_grad():
        (la, pa), (lb, pb) = a.eval()(x, mask), b.eval()(x, mask)
    assert torch.equal(pa, pb) and torch.equal(la, lb)


@pytest.mark.parametrize("fmt", ["vmae", "hf", "official"])
def test_roundtrip_pretrain_and_classifier(tmp_path, fmt):
    model = _pretrain()
    cfg = CFG if fmt == "official" else None  # tiny's 32-wide decoder has no conventional head count
    loaded, meta = load_checkpoint(save_checkpoint(model, str(tmp_path / "p"), format=fmt), cfg=cfg)
    assert isinstance(loaded, VideoMAE) and meta["format"] == fmt and meta["kind"] == PRETRAIN
    assert loaded.cfg == model.cfg if fmt == "vmae" else loaded.cfg.encoder_width == 64
    _same_pretrain(model, loaded)
    clf = _classifier()
    loaded, meta = load_checkpoint(save_checkpoint(clf, str(tmp_path / "c"), format=fmt), cfg=cfg)
    assert isinstance(loaded, VideoMAEClassifier) and loaded.num_classes == 5 and meta["kind"] == CLASSIFIER
    x, _ = _inputs()
    with torch.no_grad():
        assert torch.equal(clf(x), loaded.eval()(x))


def test_hf_layout_splits_fused_qkv():
    state = _pretrain().state_dict()
    hf = to_hf(state, PRETRAIN)
    pre = "videomae.encoder.layer.1.attention.attention."
    q, k, v = (hf[f"{pre}{n}.weight"] for n in ("query", "key", "value"))
    assert torch.equal(torch.cat([q, k, v]), state["encoder.blocks.1.attn.qkv.weight"])
    assert f"{pre}key.bias" not in hf and torch.equal(
        hf[f"{pre}q_bias"], state["encoder.blocks.1.attn.q_bias"]
    )
    assert "decoder.decoder_layers.0.intermediate.dense.weight" in hf and "videomae.layernorm.weight" in hf
    back = from_hf(hf, PRETRAIN)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="non-zero key bias"):
        from_hf({**hf, f"{pre}key.bias": torch.ones(64)}, PRETRAIN)


@pytest.mark.slow
def test_hf_from_pretrained_parity(tmp_path):
    """transformers loads our "hf" directory and computes the same loss / predictions / logits."""
    from transformers import VideoMAEForPreTraining, VideoMAEForVideoClassification

    model, clf = _pretrain(), _classifier()
    x, mask = _inputs()
    hf, info = VideoMAEForPreTraining.from_pretrained(
        save_checkpoint(model, str(tmp_path / "p"), format="hf"), output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    hf.eval()
    with torch.no_grad():
        loss, pred = model(x, mask)
        out = hf(x.transpose(1, 2), bool_masked_pos=mask)  # HF takes [B, T, C, H, W]
        assert torch.allclose(out.loss, loss, rtol=1e-4)
        assert torch.allclose(out.logits, pred, atol=1e-4)  # HF's decoder.norm uses eps 1e-5, ours 1e-6
        hf.decoder.norm.eps = 1e-6
        out = hf(x.transpose(1, 2), bool_masked_pos=mask)
        assert torch.allclose(out.logits, pred, atol=1e-5) and torch.allclose(out.loss, loss, rtol=1e-6)

    hc, info = VideoMAEForVideoClassification.from_pretrained(
        save_checkpoint(clf, str(tmp_path / "c"), format="hf"), output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    hc.eval().fc_norm.eps = 1e-6
    with torch.no_grad():
        assert torch.allclose(hc(x.transpose(1, 2)).logits, clf(x), atol=1e-5)

    # and the other way: a directory written by transformers' own save_pretrained loads into ours
    hf.save_pretrained(str(tmp_path / "hf_native"))
    ours, meta = load_checkpoint(str(tmp_path / "hf_native"))
    assert meta["format"] == "hf"
    _same_pretrain(model, ours)


def test_official_pretrain_keys_roundtrip(tmp_path):
    model = _pretrain()
    sd = official_state_dict(model)
    for key in (
        "encoder.patch_embed.proj.weight",
        "encoder.blocks.0.attn.qkv.weight",
        "encoder.blocks.0.attn.q_bias",
        "encoder.blocks.0.attn.v_bias",
        "encoder.blocks.1.norm2.weight",
        "encoder.blocks.1.mlp.fc1.weight",
        "encoder.norm.weight",
        "encoder_to_decoder.weight",
        "mask_token",
        "decoder.blocks.0.mlp.fc2.bias",
        "decoder.norm.bias",
        "decoder.head.weight",
    ):
        assert key in sd, key
    assert sd["encoder.blocks.0.attn.qkv.weight"].shape == (192, 64)
    assert not any(k.endswith(("qkv.bias", "k_bias")) for k in sd)
    path = str(tmp_path / "checkpoint-799.pth")
    torch.save({"model": sd, "epoch": 799, "args": argparse.Namespace(lr=1.5e-4)}, path)
    loaded, meta = load_checkpoint(path, cfg=CFG)
    assert meta["format"] == "official" and meta["extra"] == {"epoch": 799}
    _same_pretrain(model, loaded)


def test_official_finetune_keys_roundtrip(tmp_path):
    clf = _classifier()
    sd = official_state_dict(clf)
    assert {
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.1.attn.v_bias",
        "fc_norm.weight",
        "head.bias",
    } <= set(sd)
    assert not any(k.startswith("encoder.") for k in sd)
    path = str(tmp_path / "ft.pth")
    torch.save({"module": sd}, path)
    loaded, meta = load_checkpoint(path, cfg=CFG)
    assert meta["kind"] == CLASSIFIER and loaded.num_classes == 5
    x, _ = _inputs()
    with torch.no_grad():
        assert torch.equal(clf(x), loaded.eval()(x))


def test_official_config_inferred_from_shapes(tmp_path):
    cfg = get_config("vit_s", encoder_depth=2, decoder_depth=1, img_size=32, num_frames=4)
    model = _pretrain(cfg)
    path = str(tmp_path / "s.pth")
    torch.save({"model": official_state_dict(model)}, path)
    loaded, meta = load_checkpoint(path)
    got = loaded.cfg
    assert meta["config_inferred"] and (got.encoder_width, got.encoder_depth, got.encoder_heads) == (
        384,
        2,
        6,
    )
    assert (got.decoder_width, got.decoder_depth, got.decoder_heads, got.patch_size) == (192, 1, 3, 16)
    assert (got.img_size, got.num_frames) == (224, 16)  # paper clip: positions are fixed, not stored
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    # the file's saved training args fix the clip; heads of other widths follow 64 per head
    sd = official_state_dict(_pretrain(get_config("tiny", encoder_width=128, decoder_width=64)))
    torch.save({"model": sd, "args": argparse.Namespace(num_frames=4, input_size=32)}, path)
    got = load_checkpoint(path)[0].cfg
    assert (got.img_size, got.num_frames, got.encoder_heads, got.decoder_heads) == (32, 4, 2, 1)
    odd = str(tmp_path / "odd.pth")
    torch.save({"model": official_state_dict(_pretrain(get_config("tiny", encoder_width=96)))}, odd)
    with pytest.raises(
        ValueError, match=f"{odd}: cannot determine the model architecture: encoder_heads: width 96"
    ):
        load_checkpoint(odd)


def test_mismatched_and_corrupt_files_raise_clear_errors(tmp_path):
    sd = official_state_dict(_pretrain())
    bad = {k: v for k, v in sd.items() if k != "encoder.norm.bias"} | {"encoder.extra.weight": torch.zeros(1)}
    path = str(tmp_path / "bad.pth")
    torch.save({"model": bad}, path)
    with pytest.raises(ValueError) as err:
        load_checkpoint(path, cfg=CFG)
    msg = str(err.value)
    assert (
        path in msg
        and "missing keys ['encoder.norm.bias']" in msg
        and "unexpected keys ['encoder.extra.weight']" in msg
    )
    with pytest.raises(ValueError, match=r"shape mismatches \['encoder.blocks.0.mlp.fc1.weight"):
        load_checkpoint(_saved(tmp_path, sd), cfg=get_config("tiny", mlp_ratio=2.0))

    good = _saved(tmp_path, sd)
    trunc = str(tmp_path / "trunc.pth")
    with open(good, "rb") as f, open(trunc, "wb") as g:
        g.write(f.read()[: os.path.getsize(good) // 2])
    with pytest.raises(ValueError, match=f"{trunc}: not a readable torch checkpoint"):
        load_checkpoint(trunc, cfg=CFG)

    evil = str(tmp_path / "evil.pth")
    torch.save({"model": sd, "obj": Foreign()}, evil)
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_checkpoint(evil, cfg=CFG)

    ck = save_checkpoint(_pretrain(), str(tmp_path / "ours"))
    weights = os.path.join(ck, "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 3])
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        load_checkpoint(ck)

    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="neither vmae.json"):
        load_checkpoint(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="format must be one of"):
        save_checkpoint(_pretrain(), str(tmp_path / "x"), format="onnx")
    with pytest.raises(ValueError, match="must be a VideoMAE or VideoMAEClassifier"):
        save_checkpoint(torch.nn.Linear(2, 2), str(tmp_path / "x"))


class Foreign:  # an arbitrary pickled class: refused by torch.load(weights_only=True)
    pass


def _saved(tmp_path, sd):
    path = str(tmp_path / "good.pth")
    torch.save({"model": sd}, path)
    return path


@pytest.mark.s3
def test_roundtrip_through_s3(s3_bucket):
    model = _pretrain()
    url = save_checkpoint(model, f"{s3_bucket}/ckpt/tiny")
    loaded, meta = load_checkpoint(url)
    assert meta["url"] == url
    _same_pretrain(model, loaded)


def test_any_width_and_depth_inferred_from_weights(tmp_path):
    """Widths, depths, MLP ratio, patch/tubelet (Conv3d kernel), channels, q/v bias, final norm and decoder all
    come from the shapes; heads follow 64 per head."""
    cfg = get_config(
        "tiny",
        img_size=32,
        patch_size=8,
        tubelet_size=1,
        num_frames=2,
        in_chans=1,
        encoder_width=256,
        encoder_depth=3,
        encoder_heads=4,
        mlp_ratio=2.0,
        qkv_bias=False,
        encoder_norm=False,
        decoder_width=128,
        decoder_depth=2,
        decoder_heads=2,
    )
    model = _pretrain(cfg)
    path = str(tmp_path / "any.pth")
    save_checkpoint(model, path, format="official")
    got, meta = load_checkpoint(path)
    arch = [f.name for f in dataclasses.fields(cfg) if f.name not in ("img_size", "num_frames", "mask_ratio")]
    assert meta["config_inferred"] and {k: getattr(got.cfg, k) for k in arch} == {
        k: getattr(cfg, k) for k in arch
    }
    assert all(torch.equal(v, got.state_dict()[k]) for k, v in model.state_dict().items())
