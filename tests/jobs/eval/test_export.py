"""``vmae export``: any checkpoint in, each format out, one error line for a bad input."""

import torch

from jobs.cli import main
from model import VideoMAE, VideoMAEClassifier, get_config, load_checkpoint, save_checkpoint
from pipeline.loader.masking import tube_mask

CFG = get_config("vit_s", encoder_depth=1, decoder_depth=1, img_size=32, num_frames=4, mask_ratio=0.75)


def _same(a, b):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 32, 32, generator=g)
    with torch.no_grad():
        if isinstance(a, VideoMAE):
            mask = tube_mask(2, *CFG.grid, 0.75, g)
            return torch.allclose(a.eval()(x, mask)[1], b.eval()(x, mask)[1], atol=1e-6)
        return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-6)


def test_export_chain_through_every_format(tmp_path, capsys):
    torch.manual_seed(0)
    model = VideoMAE(CFG)
    src = save_checkpoint(model, str(tmp_path / "vmae"))
    hf, official, back = str(tmp_path / "hf"), str(tmp_path / "m.pth"), str(tmp_path / "back")
    assert main(["export", src, "--format", "hf", "--output", hf]) == 0
    assert main(["export", hf, "--format", "official", "--output", official]) == 0
    # an official file carries no clip size: --model/--set give the architecture and clip
    argv = ["export", official, "--format", "vmae", "--output", back, "--model", "vit_s"]
    argv += [
        "--set",
        "encoder_depth=1",
        "--set",
        "decoder_depth=1",
        "--set",
        "img_size=32",
        "--set",
        "num_frames=4",
    ]
    assert main(argv + ["--set", "mask_ratio=0.75"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("exported pretrain (vmae, 384 wide x 1 blocks, patch 16)")
    loaded, meta = load_checkpoint(back)
    assert meta["format"] == "vmae" and loaded.cfg == CFG and _same(model, loaded)
    inferred, meta = load_checkpoint(official)  # and the official file alone infers the architecture
    assert meta["config_inferred"] and (inferred.cfg.decoder_width, inferred.cfg.decoder_heads) == (192, 3)


def test_export_classifier_to_hf_and_back(tmp_path):
    clf = VideoMAEClassifier(get_config("tiny", use_mean_pooling=False), 4, init_scale=1.0)
    src = save_checkpoint(clf, str(tmp_path / "clf"))
    assert main(["export", src, "--format", "hf", "--output", str(tmp_path / "hf")]) == 0
    loaded, meta = load_checkpoint(str(tmp_path / "hf"))
    assert meta["kind"] == "classifier" and not loaded.cfg.use_mean_pooling
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        assert torch.allclose(clf.eval()(x), loaded.eval()(x), atol=1e-6)


def test_bad_inputs_give_one_error_line(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    out = str(tmp_path / "out")
    assert main(["export", str(bad), "--format", "hf", "--output", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vmae export: error: ") and str(bad) in err[0]
    assert main(["export", str(tmp_path / "missing"), "--format", "vmae", "--output", out]) == 2
    assert "does not exist" in capsys.readouterr().err
    src = save_checkpoint(VideoMAE(get_config("tiny")), str(tmp_path / "ok"))
    assert main(["export", src, "--format", "vmae", "--output", src]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(bad), "--format", "vmae", "--output", out, "--set", "encoder_depth=1"]) == 2
    assert "--set needs --model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
