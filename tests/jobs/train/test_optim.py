"""lr schedule, linear scaling, resize policy and weight-decay groups, each against an independent computation."""

import math

import pytest
import torch
from timm.scheduler import CosineLRScheduler

from jobs.train.optim import (
    OptimConfig,
    SampleCosineSchedule,
    ScheduleConfig,
    batch_plan,
    build_optimizer,
    lr_at,
    scaled_lr,
    schedule_samples,
)


def test_lr_at_matches_timm_cosine_with_warmup_prefix():
    """timm's CosineLRScheduler (warmup prefix, stepped per update) is an independent implementation."""
    peak, warm, total, min_lr = 6e-4, 40, 400, 1e-5
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=peak)
    ref = CosineLRScheduler(
        opt, t_initial=total - warm, lr_min=min_lr, warmup_t=warm, warmup_lr_init=0.0, warmup_prefix=True,
        t_in_epochs=False,
    )  # fmt: skip
    for t in range(0, total + 20, 7):
        ref.step_update(t)
        expected = opt.param_groups[0]["lr"]
        got = lr_at(t, peak_lr=peak, warmup_samples=warm, total_samples=total, min_lr=min_lr)
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12), t


def test_lr_at_closed_form_points():
    kw = dict(peak_lr=1.0, warmup_samples=10, total_samples=110, min_lr=0.0)
    assert lr_at(0, **kw) == 0.0
    assert lr_at(5, **kw) == pytest.approx(0.5)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.5)  # cos(pi/2) midpoint of the decay
    assert lr_at(35, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, **kw) == pytest.approx(0.0, abs=1e-15)
    assert lr_at(500, **kw) == pytest.approx(0.0, abs=1e-15)  # clamps past the end
    assert lr_at(3, peak_lr=2.0, warmup_samples=0, total_samples=4, min_lr=0.0) == pytest.approx(
        1.0 + math.cos(math.pi * 3 / 4)
    )


def test_scaled_lr_is_linear_rule():
    assert scaled_lr(1.5e-4, 1024) == pytest.approx(6e-4)
    assert scaled_lr(1.5e-4, 256) == pytest.approx(1.5e-4)
    assert scaled_lr(1e-3, 64, base_batch=128) == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="global_batch"):
        scaled_lr(1e-3, 0)


def test_resize_policy_keeps_per_worker_batch_and_rescales_lr():
    cfg = OptimConfig(base_lr=1.5e-4, accum_steps=2)
    four = batch_plan(cfg, per_worker_batch=8, world_size=4)
    two = batch_plan(cfg, per_worker_batch=8, world_size=2)
    assert (four.global_batch, two.global_batch) == (8 * 4 * 2, 8 * 2 * 2)
    assert four.peak_lr == pytest.approx(1.5e-4 * 64 / 256)
    assert two.peak_lr / four.peak_lr == pytest.approx(0.5)
    with pytest.raises(ValueError, match="world_size"):
        batch_plan(cfg, per_worker_batch=8, world_size=0)


def test_resized_run_reaches_same_schedule_fraction_at_same_samples():
    """Samples-keyed schedule: after a 4 -> 2 worker resize, lr / peak depends only on samples seen."""
    sched = ScheduleConfig(total_steps=100, warmup_steps=10)
    cfg = OptimConfig()
    nominal = batch_plan(cfg, per_worker_batch=4, world_size=4)
    warm, total = schedule_samples(sched, dataset_size=0, nominal_global_batch=nominal.global_batch)
    assert (warm, total) == (10 * 16, 100 * 16)
    small = batch_plan(cfg, per_worker_batch=4, world_size=2)
    seen, steps = 30 * nominal.global_batch, 30  # 30 steps at 4 workers, then continue at 2
    while seen < total:
        seen += small.global_batch
        steps += 1
    assert steps == 30 + 70 * 2  # half the batch -> twice the steps for the remaining samples
    frac = (
        lr_at(800, peak_lr=small.peak_lr, warmup_samples=warm, total_samples=total, min_lr=0) / small.peak_lr
    )
    frac_ref = lr_at(800, peak_lr=nominal.peak_lr, warmup_samples=warm, total_samples=total, min_lr=0)
    assert frac == pytest.approx(frac_ref / nominal.peak_lr)


def test_schedule_samples_epochs():
    sched = ScheduleConfig(epochs=800, warmup_epochs=40)
    assert schedule_samples(sched, dataset_size=1000, nominal_global_batch=7) == (40_000, 800_000)
    with pytest.raises(ValueError, match="dataset_size"):
        schedule_samples(sched, dataset_size=0, nominal_global_batch=7)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "exactly one"),
        (dict(epochs=10, total_steps=5), "exactly one"),
        (dict(total_steps=5, warmup_steps=6), "warmup_steps"),
        (dict(epochs=-1.0), "epochs"),
    ],
)
def test_schedule_config_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScheduleConfig(**kwargs)


def test_optim_config_rejects_bad_input():
    with pytest.raises(ValueError, match="base_lr"):
        OptimConfig(base_lr=0)
    with pytest.raises(ValueError, match="betas"):
        OptimConfig(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="accum_steps"):
        OptimConfig(accum_steps=0)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, 4, 8))
        self.proj = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 2, bias=False)


def test_weight_decay_groups_exclude_norms_biases_pos_embed():
    model = _Tiny()
    opt = build_optimizer(model, OptimConfig(weight_decay=0.05), lr=1e-3)
    by_wd = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    expected_no = {id(model.pos_embed), id(model.proj.bias), id(model.norm.weight), id(model.norm.bias)}
    assert by_wd[0.0] == expected_no
    assert by_wd[0.05] == {id(model.proj.weight), id(model.head.weight)}
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_sample_schedule_state_roundtrip_and_mismatch():
    model = _Tiny()
    opt = build_optimizer(model, OptimConfig(), lr=0.0)
    s = SampleCosineSchedule(opt, peak_lr=1e-3, warmup_samples=10, total_samples=100)
    s.step(40)
    assert all(g["lr"] == pytest.approx(lr_at(40, peak_lr=1e-3, warmup_samples=10, total_samples=100, min_lr=0))
               for g in opt.param_groups)  # fmt: skip
    resumed = SampleCosineSchedule(opt, peak_lr=5e-4, warmup_samples=10, total_samples=100)
    resumed.load_state_dict(s.state_dict())
    assert resumed.samples_seen == 40 and resumed.peak_lr == 5e-4  # the resize policy's peak wins
    other = SampleCosineSchedule(opt, peak_lr=1e-3, warmup_samples=10, total_samples=200)
    with pytest.raises(ValueError, match="total_samples"):
        other.load_state_dict(s.state_dict())


def test_fused_option_builds_the_fused_kernel_and_matches_the_default_step():
    """``optim.fused: true`` reaches ``torch.optim.AdamW(fused=True)`` (CPU has the fused kernel too) and takes the
    same steps as the default kernel; ``auto`` on CPU keeps the default; both builders honour it."""
    from jobs.train.finetune import build_finetune_optimizer
    from model import VideoMAEClassifier, get_config

    torch.manual_seed(0)
    models = {k: _Tiny() for k in ("default", "fused")}
    models["fused"].load_state_dict(models["default"].state_dict())
    init = {k: v.clone() for k, v in models["default"].state_dict().items()}
    opts = {k: build_optimizer(m, OptimConfig(fused=k == "fused"), lr=1e-2) for k, m in models.items()}
    assert opts["fused"].defaults["fused"] is True and not opts["default"].defaults["fused"]
    assert not build_optimizer(_Tiny(), OptimConfig(), lr=1e-2).defaults["fused"]  # default: today's kernel
    assert not build_optimizer(_Tiny(), OptimConfig(fused="auto"), lr=1e-2).defaults[
        "fused"
    ]  # auto: CPU params
    x = torch.randn(5, 4, 8)
    for _ in range(3):
        for k, m in models.items():
            loss = m.head(m.norm(m.proj(x + m.pos_embed))).square().mean()
            loss.backward()
            opts[k].step()
            opts[k].zero_grad()
    for (name, a), b in zip(models["default"].named_parameters(), models["fused"].parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), name
        assert not torch.equal(a, init[name]), name  # the steps moved every parameter
    clf = VideoMAEClassifier(get_config("tiny"), 3)
    assert build_finetune_optimizer(clf, OptimConfig(fused=True), layer_decay=0.75, lr=1e-3).defaults["fused"]


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_fused_option_rejects_other_values(bad):
    with pytest.raises(ValueError, match="optim.fused"):
        OptimConfig(fused=bad)
