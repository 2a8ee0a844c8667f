"""VideoMAE V2 dual masking end to end on the real pretraining path (shard set -> loader -> PretrainTask ->
VideoMAE): the loader draws decoder masks from the clip spec, the task passes them, the decoder runs on K < M
tokens, the analytic FLOPs match what torch counts, and the masks are as reproducible as the tube masks."""

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from jobs.config import load_config
from jobs.train.config import PretrainConfig
from jobs.train.pretrain import PretrainTask
from model.flops import pretrain_train_flops
from pipeline.loader.clips import Decoded, clip_decoder_masks, collate_clips, sample_generator
from pipeline.loader.config import LoaderConfig
from pipeline.loader.decode import BadSample
from pipeline.loader.decoder_masking import running_cell_mask
from pipeline.loader.loader import make_loader
from pipeline.loader.masking import clip_masks
from tests.pipeline.shardset_helpers import make_shard_set, take

DEBUG = "configs/pretrain/debug.yaml"
RUN_CELL = ["model.overrides.decoder_mask_type=run_cell", "model.overrides.decoder_mask_ratio=0.5"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("dual"))
    make_shard_set(url, 8, 2, pattern="moving", width=64, height=48, frames=12)
    return url


def _task(url: str, *overrides: str) -> PretrainTask:
    return PretrainTask(load_config(PretrainConfig, DEBUG, [f"loader.manifest={url}", *overrides]))


def test_run_cell_decodes_fewer_tokens_and_its_flops_are_counted(shards):
    """A run_cell 0.5 batch through PretrainTask.forward: the decoder predicts K = L/2 = 16 tokens per clip,
    not the M = 24 masked ones, and one forward+backward costs what ``model.flops`` says (torch's count)."""
    task = _task(shards, *RUN_CELL)
    cfg = task.model_cfg
    batch = next(iter(make_loader(task.cfg.loader, task.clip_spec())))
    B, L = batch["mask"].shape
    dmask = batch["decoder_mask"]
    assert dmask.dtype == torch.bool and dmask.shape == (B, L) == (
        task.cfg.loader.batch_size,
        cfg.num_patches,
    )
    assert ((~dmask).sum(1) == 16).all() and cfg.num_masked == 24 and cfg.num_decoded == 16
    torch.manual_seed(0)
    model = task.build_model(resuming=False)
    shapes = []
    model.register_forward_hook(lambda m, args, out: shapes.append(tuple(out[1].shape)))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss, _ = task.forward(model, batch, torch.device("cpu"))
        loss.backward()
    assert shapes == [(B, 16, cfg.patch_dim)] and torch.isfinite(loss)
    counted, analytic = counter.get_total_flops(), B * pretrain_train_flops(cfg)
    assert abs(counted - analytic) <= 0.05 * analytic, (counted, analytic)
    # the test can tell: the count of a decoder without the mask (every masked token) is outside the band
    plain = B * pretrain_train_flops(_task(shards).model_cfg)
    assert abs(counted - plain) > 0.05 * plain


def test_without_decoder_mask_the_batch_and_forward_are_unchanged(shards):
    """``none``: no decoder_mask key, the decoder predicts every masked token; the dual-masking loader's video
    and tube masks are the plain loader's (its decoder masks come from their own streams)."""
    plain, dual = _task(shards), _task(shards, *RUN_CELL)
    a = next(iter(make_loader(plain.cfg.loader, plain.clip_spec())))
    b = next(iter(make_loader(dual.cfg.loader, dual.clip_spec())))
    assert "decoder_mask" not in a and "decoder_mask" in b
    assert a["key"] == b["key"] and torch.equal(a["video"], b["video"]) and torch.equal(a["mask"], b["mask"])
    torch.manual_seed(0)
    model = plain.build_model(resuming=False)
    shapes = []
    model.register_forward_hook(lambda m, args, out: shapes.append(tuple(out[1].shape)))
    plain.forward(model, a, torch.device("cpu"))
    assert shapes == [(len(a["key"]), plain.model_cfg.num_masked, plain.model_cfg.patch_dim)]
    with pytest.raises(
        ValueError, match="batch has a decoder_mask but the model's decoder_mask_type is 'none'"
    ):
        plain.forward(model, b, torch.device("cpu"))
    with pytest.raises(ValueError, match="batch lacks a decoder_mask .* 'run_cell'"):
        dual.forward(dual.build_model(resuming=False), a, torch.device("cpu"))


def test_decoder_masks_are_drawn_per_sample_and_resume_bit_identically(shards):
    """Every clip's decoder mask is the running-cell mask of stream ``(seed, epoch, key, dmask{r})``, so a
    loader resumed mid-epoch yields exactly the decoder masks of an uninterrupted one."""
    task = _task(shards, *RUN_CELL, "loader.num_sample=2", "loader.shuffle_buffer=4")
    spec, lcfg = task.clip_spec(), task.cfg.loader
    full = make_loader(lcfg, spec, rank=0, world_size=2)
    full.set_epoch(3)
    want = take(full)
    first = make_loader(lcfg, spec, rank=0, world_size=2)
    first.set_epoch(3)
    head = take(first, limit=1)
    resumed = make_loader(lcfg, spec, rank=0, world_size=2)
    resumed.load_state_dict(first.state_dict())
    resumed.set_epoch(3)
    got = head + take(resumed)
    assert len(got) == len(want) == 2
    for x, y in zip(got, want, strict=True):
        assert x["key"] == y["key"] and torch.equal(x["decoder_mask"], y["decoder_mask"])
        assert torch.equal(x["mask"], y["mask"])
    for batch in want:  # independent recomputation: clip r of a sample draws from its own stream
        for i, key in enumerate(batch["key"]):
            g = sample_generator(lcfg.seed, 3, key, f"dmask{i % 2}")
            assert torch.equal(
                batch["decoder_mask"][i : i + 1], running_cell_mask(1, *spec.token_grid, 0.5, g)
            )
    assert len({tuple(m.tolist()) for b in want for m in b["decoder_mask"]}) > 1  # phases differ by clip


def test_bad_samples_carry_decoder_masks_of_their_stand_ins():
    """A bad sample's slots copy a good clip of the batch with its masks (decoder mask included); a batch with
    no good sample gets zeros and fresh masks from the pad streams. Shapes never change."""
    task_cfg = load_config(PretrainConfig, DEBUG, ["loader.manifest=unused", *RUN_CELL])
    spec = PretrainTask(task_cfg).clip_spec()
    lcfg = LoaderConfig(manifest="unused", sampling_rate=2, num_sample=2, batch_size=4)
    frames = np.random.default_rng(0).integers(0, 255, (12, 48, 64, 3), dtype=np.uint8)
    good, bad = Decoded(frames=frames, label=3), Decoded(frames=None, error=BadSample("b", "garbage"))
    batch = collate_clips([("g", good), ("b", bad)], spec, lcfg, seed=1, epoch=0, pad_id="0")
    dm = batch["decoder_mask"]
    assert dm.shape == (4, spec.num_tokens) and batch["valid"].tolist() == [True, True, False, False]
    assert torch.equal(dm[:2], clip_decoder_masks(spec, "g", 2, seed=1, epoch=0)) and torch.equal(
        dm[2:], dm[:2]
    )
    assert torch.equal(batch["mask"][2:], batch["mask"][:2])
    none = collate_clips([("b", bad), ("c", bad)], spec, lcfg, seed=1, epoch=0, pad_id="7")
    assert none["decoder_mask"].shape == (4, spec.num_tokens) and not none["valid"].any()
    assert torch.equal(none["decoder_mask"][2:], clip_decoder_masks(spec, "pad/7/1", 2, seed=1, epoch=0))
    assert ((~none["decoder_mask"]).sum(1) == spec.num_decoded).all()
    pad_gens = [sample_generator(1, 0, "pad/7/1", str(j)) for j in range(2)]  # tube masks keep their streams
    assert torch.equal(none["mask"][2:], clip_masks(spec, pad_gens))


def test_dual_masking_run_still_draws_its_reconstruction(shards, tmp_path):
    """The step predicts only the K kept tokens; the logged PNG predicts every masked token with one more forward
    without a decoder mask, so a dual-masking run shows what it learned like any other (and the PNG is there)."""
    task = _task(shards, *RUN_CELL)
    batch = next(iter(make_loader(task.cfg.loader, task.clip_spec())))
    torch.manual_seed(0)
    model = task.build_model(resuming=False)
    task.forward(model, batch, torch.device("cpu"))
    assert task._last[2] is None  # nothing for every masked token yet
    task.on_log(7, str(tmp_path), model)
    png = tmp_path / "images" / "step_00000007.png"
    assert png.is_file() and png.stat().st_size > 0
    assert model.training  # on_log leaves the model as it found it
