"""Official VideoMAE / VideoMAE V2 checkpoints: every family's key layout (``data/official_layouts.json``, see its
generator) loads with the architecture inferred from the weights alone, computes what the official code computes
(``official_ref``), and what we write back loads the way the official finetuning scripts load it."""

import dataclasses
import json
import pathlib

import pytest
import torch

from model import VideoMAE, VideoMAEClassifier, get_config, load_checkpoint, save_checkpoint
from model.checkpoint import infer_config
from model.keymaps import CLASSIFIER, PRETRAIN, detect_kind, from_official, to_official
from pipeline.loader.decoder_masking import running_cell_mask
from pipeline.loader.masking import tube_mask
from tests.model import official_ref as ref

LAYOUTS = json.loads((pathlib.Path(__file__).parent / "data" / "official_layouts.json").read_text())[
    "families"
]
FAMILIES = sorted(LAYOUTS)


def _expected(cfg, kind, num_classes=None):
    got = dict(
        encoder_width=cfg.encoder_width,
        encoder_depth=cfg.encoder_depth,
        encoder_heads=cfg.encoder_heads,
        patch_size=cfg.patch_size,
        tubelet_size=cfg.tubelet_size,
        in_chans=cfg.in_chans,
        encoder_mlp_hidden=cfg.encoder_mlp_hidden,
        qkv_bias=cfg.qkv_bias,
    )
    if kind == PRETRAIN:
        got.update(
            encoder_norm=cfg.encoder_norm,
            decoder_width=cfg.decoder_width,
            decoder_depth=cfg.decoder_depth,
            decoder_heads=cfg.decoder_heads,
            decoder_mlp_hidden=cfg.decoder_mlp_hidden,
        )
    else:
        got.update(use_mean_pooling=cfg.use_mean_pooling, num_classes=num_classes)
    return got


@pytest.mark.parametrize("family", FAMILIES)
def test_full_size_layout_infers_the_official_architecture(family):
    """Full-size layouts as meta tensors: the inferred config builds a model with exactly the file's keys."""
    spec = LAYOUTS[family]
    raw = {k: torch.empty(shape, device="meta") for k, shape in spec["keys"].items()}
    kind = detect_kind(raw.keys())
    assert kind == spec["kind"]
    state = from_official(raw, kind)
    cfg = infer_config(state, kind, where=family)
    num_classes = state["head.weight"].shape[0] if kind == CLASSIFIER else None
    assert _expected(cfg, kind, num_classes) == spec["expect"]
    with torch.device("meta"):
        model = VideoMAE(cfg) if kind == PRETRAIN else VideoMAEClassifier(cfg, num_classes)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert own == {k: tuple(v.shape) for k, v in state.items()}
    assert set(to_official(model.state_dict(), kind)) == set(spec["keys"])


def _truncated(spec, encoder_blocks, seed=0):
    """Real tensors for the family's layout with only the first ``encoder_blocks`` encoder blocks and one decoder
    block: values random, norms and q/v biases non-trivial."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in spec["keys"].items():
        parts = key.split(".")
        if "blocks" in parts:
            index = int(parts[parts.index("blocks") + 1])
            if index >= (1 if key.startswith("decoder.") else encoder_blocks):
                continue
        t = torch.randn(shape, generator=g)
        if key.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            t = 1 + 0.1 * t
        elif key.endswith(("q_bias", "v_bias")):
            t = 0.5 * t
        elif len(shape) > 1:
            t = t * shape[-1] ** -0.5 if key != "mask_token" else t * 0.02
        else:
            t = 0.1 * t
        out[key] = t
    return out


def _small_clip(model, cfg_overrides):
    """The same weights in a model on a small clip (positions are fixed sinusoids, not weights)."""
    cfg = dataclasses.replace(model.cfg, **cfg_overrides)
    small = VideoMAE(cfg) if isinstance(model, VideoMAE) else VideoMAEClassifier(cfg, model.num_classes)
    small.load_state_dict(model.state_dict())
    return small.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_file_loads_and_matches_the_official_computation(tmp_path, family):
    """A depth-truncated file of each family, saved as the official code saves it, loads with weights_only from
    its shapes alone and computes the official forward (and VideoMAE V2's decoder-masked loss)."""
    spec = LAYOUTS[family]
    big = spec["expect"]["encoder_width"] >= 1024
    sd = _truncated(spec, encoder_blocks=1 if big else 2)
    path = str(tmp_path / f"{family}.pth")
    torch.save({spec["wrapper"]: sd, "epoch": 7}, path)
    model, meta = load_checkpoint(path)
    assert meta == {
        "format": "official",
        "kind": spec["kind"],
        "url": path,
        "config_inferred": True,
        "extra": {"epoch": 7},
        "lineage": None,  # a published file records none
    }
    cfg = model.cfg
    assert (cfg.encoder_width, cfg.encoder_heads, cfg.patch_size) == (
        spec["expect"]["encoder_width"],
        spec["expect"]["encoder_heads"],
        spec["expect"]["patch_size"],
    )
    assert to_official(model.state_dict(), meta["kind"]).keys() == sd.keys()
    small = _small_clip(model, dict(img_size=4 * cfg.patch_size, num_frames=4, mask_ratio=0.75))
    g = torch.Generator().manual_seed(1)
    video = torch.randn(2, 3, 4, small.cfg.img_size, small.cfg.img_size, generator=g)
    with torch.no_grad():
        if isinstance(small, VideoMAEClassifier):
            want = ref.finetune_logits(sd, video, cfg.encoder_heads)
            assert torch.allclose(small(video), want, atol=1e-4, rtol=1e-4)
            return
        mask = tube_mask(2, *small.cfg.grid, 0.75, g)
        decode_mask = running_cell_mask(2, *small.cfg.grid, 0.5, g)
        for dm in (None, decode_mask):
            loss, pred = small(video, mask, dm)
            want = ref.pretrain_pred(sd, video, mask, cfg.encoder_heads, cfg.decoder_heads, dm)
            assert torch.allclose(pred, want, atol=1e-4, rtol=1e-4)
            want_loss = ref.pretrain_loss(video, mask, want, cfg.patch_size, cfg.tubelet_size, dm)
            assert torch.allclose(loss, want_loss, rtol=1e-4)


def _official_finetune_load(path, finetune_keys):
    """What MCG-NJU / OpenGVLab ``run_class_finetuning.py --finetune`` does with a file: take ``model|module``,
    strip ``encoder.``, load non-strictly into the finetune model; returns the state, matched and missing keys."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    sd = next(obj[k] for k in ("model", "module") if k in obj)
    sd = {k.removeprefix("encoder."): v for k, v in sd.items()}
    matched = {k for k, shape in finetune_keys.items() if k in sd and list(sd[k].shape) == shape}
    return sd, matched, set(finetune_keys) - matched


@pytest.mark.parametrize("size", ["vit_s", "vit_b"])
def test_official_export_is_what_official_finetuning_loads(tmp_path, size):
    """A model pretrained here, written with format="official", gives the official finetuning every encoder
    weight (all but the fresh fc_norm/head), and the official pretraining forward equals ours."""
    cfg = get_config(size, encoder_depth=2, decoder_depth=1, img_size=64, num_frames=4, mask_ratio=0.75)
    torch.manual_seed(0)
    model = VideoMAE(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_bias", "v_bias")):
                p.normal_(0, 0.5)
    path = save_checkpoint(model, str(tmp_path / "checkpoint-799.pth"), format="official")
    family = LAYOUTS[f"videomae_finetune_{size}"]["keys"]
    finetune_keys = {
        k: s for k, s in family.items() if not k.startswith("blocks.") or int(k.split(".")[1]) < 2
    }
    _, _, missing = _official_finetune_load(path, finetune_keys)
    assert missing == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    # and the file is the official pretraining layout itself (2 encoder blocks, 1 decoder block kept)
    layout = LAYOUTS[f"videomae_pretrain_{size}"]["keys"]
    depth = {"encoder": 2, "decoder": 1}
    want = {
        k: s
        for k, s in layout.items()
        if ".blocks." not in k or int(k.split(".")[2]) < depth[k.split(".")[0]]
    }
    official = torch.load(path, weights_only=True)["model"]
    assert {k: list(v.shape) for k, v in official.items()} == want
    g = torch.Generator().manual_seed(2)
    video = torch.randn(2, 3, 4, 64, 64, generator=g)
    mask = tube_mask(2, *cfg.grid, 0.75, g)
    with torch.no_grad():
        _, pred = model(video, mask)
        want = ref.pretrain_pred(official, video, mask, cfg.encoder_heads, cfg.decoder_heads)
    assert torch.allclose(pred, want, atol=1e-5)


@pytest.mark.parametrize("use_mean_pooling", [True, False])
def test_classifier_official_roundtrip_both_poolings(tmp_path, use_mean_pooling):
    cfg = get_config("vit_b", encoder_depth=2, img_size=64, num_frames=4, use_mean_pooling=use_mean_pooling)
    torch.manual_seed(0)
    clf = VideoMAEClassifier(cfg, 174, init_scale=1.0).eval()
    path = save_checkpoint(clf, str(tmp_path / "ft.pth"), format="official")
    family = "videomae_finetune_vit_b" if use_mean_pooling else "videomae_finetune_vit_b_use_cls"
    keys = {
        k: s
        for k, s in LAYOUTS[family]["keys"].items()
        if not k.startswith("blocks.") or int(k.split(".")[1]) < 2
    }
    written = torch.load(path, weights_only=True)["model"]
    assert {k: list(v.shape) for k, v in written.items()} == {
        **keys,
        "head.weight": [174, 768],
        "head.bias": [174],
    }
    loaded, meta = load_checkpoint(path)
    assert meta["config_inferred"] and loaded.cfg.use_mean_pooling is use_mean_pooling
    small = _small_clip(loaded, dict(img_size=64, num_frames=4))
    video = torch.randn(2, 3, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(small(video), clf(video), atol=1e-6)
        assert torch.allclose(clf(video), ref.finetune_logits(written, video, 12), atol=1e-4)


def test_ambiguous_architectures_name_what_and_where(tmp_path):
    spec = LAYOUTS["videomae_pretrain_vit_s"]
    sd = _truncated(spec, 2)
    odd = {k: v for k, v in sd.items() if not k.startswith("decoder.head.")}
    odd["decoder.head.weight"] = torch.zeros(100, 192)
    odd["decoder.head.bias"] = torch.zeros(100)
    del odd["encoder.blocks.1.attn.q_bias"]
    path = str(tmp_path / "odd.pth")
    torch.save({"model": odd}, path)
    with pytest.raises(ValueError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: cannot determine the model architecture:") and msg.endswith("pass cfg=")
    assert "decoder.head predicts 100 values per token" in msg and "attn.q_bias/v_bias" in msg
    # a width with neither an official head count nor 64-wide heads
    narrow = {k: v for k, v in sd.items()}
    state = from_official(narrow, PRETRAIN)
    state = {
        k: torch.empty(*[96 if d == 384 else d for d in v.shape], device="meta") for k, v in state.items()
    }
    with pytest.raises(
        ValueError, match="encoder_heads: width 96 is neither an official size nor a multiple of 64"
    ):
        infer_config(state, PRETRAIN, where="narrow.pth")
    ft = {
        k: v
        for k, v in _truncated(LAYOUTS["videomae_finetune_vit_s"], 1).items()
        if not k.startswith("fc_norm")
    }
    with pytest.raises(ValueError, match="neither fc_norm"):
        infer_config(from_official(ft, CLASSIFIER), CLASSIFIER)
