"""Golden loss curve of the tiny model: catches any silent change to init, masking, target or optimisation.

Regenerate (after an intended change only, and say why in the commit):
    VMAE_WRITE_GOLDEN=1 .venv/bin/python -m pytest -q tests/model/test_golden.py
"""

import json
import math
import os
from pathlib import Path

import torch

from model import VideoMAE, get_config
from pipeline.loader.masking import tube_mask

GOLDEN = Path(__file__).with_name("golden_loss_tiny.json")
STEPS = 5


def _losses() -> list[float]:
    torch.manual_seed(1234)
    cfg = get_config("tiny")
    model = VideoMAE(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    gen = torch.Generator().manual_seed(99)
    video = torch.randn(4, 3, cfg.num_frames, cfg.img_size, cfg.img_size, generator=gen)
    losses = []
    for _ in range(STEPS):
        mask = tube_mask(4, *cfg.grid, cfg.mask_ratio, gen)
        loss, _ = model(video, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_golden_losses():
    losses = _losses()
    if os.environ.get("VMAE_WRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"config": "tiny", "steps": STEPS, "losses": losses}, indent=2) + "\n")
    golden = json.loads(GOLDEN.read_text())["losses"]
    assert len(golden) == STEPS
    for step, (got, want) in enumerate(zip(losses, golden, strict=True)):
        assert math.isclose(got, want, rel_tol=1e-5), f"step {step}: loss {got} != golden {want}"
    assert losses[-1] < losses[0]  # the tiny model does learn on a fixed clip
