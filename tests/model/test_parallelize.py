import socket

import pytest
import torch
import torch.distributed as dist

from model import VideoMAE, VideoMAEClassifier, get_config
from model.parallelize import parallelize
from pipeline.loader.masking import tube_mask

CFG = get_config("tiny", drop_path_rate=0.0)


def _pair():
    torch.manual_seed(0)
    ref = VideoMAE(CFG)
    torch.manual_seed(0)
    return ref, VideoMAE(CFG)


def _step(model):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, CFG.num_frames, CFG.img_size, CFG.img_size, generator=g)
    loss, _ = model(x, tube_mask(2, *CFG.grid, CFG.mask_ratio, g))
    loss.backward()
    return loss.detach()


def _grads(model):
    """Gradients by state-dict name (wrappers may rename parameters, never state-dict keys)."""
    names = {id(p): n for n, p in model.state_dict(keep_vars=True).items()}
    out = {}
    for p in model.parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out[names[id(p)]] = grad
    return out


@pytest.mark.parametrize(
    "kwargs",
    [
        {"activation_checkpointing": True},
        pytest.param(
            {"compile": True, "compile_backend": "aot_eager", "activation_checkpointing": True},
            marks=pytest.mark.slow,
        ),
    ],
)
def test_checkpointing_and_compile_keep_numbers_and_keys(kwargs):
    ref, model = _pair()
    parallelize(model, **kwargs)
    assert list(model.state_dict()) == list(ref.state_dict())
    assert torch.allclose(_step(model), _step(ref), rtol=1e-6)
    want = _grads(ref)
    for name, grad in _grads(model).items():
        assert torch.allclose(grad, want[name], atol=1e-6), name


def test_fsdp_needs_process_group():
    with pytest.raises(ValueError, match="needs an initialised torch.distributed process group"):
        parallelize(VideoMAE(CFG), fsdp=True)
    with pytest.raises(ValueError, match="no transformer Block lists"):
        parallelize(torch.nn.Linear(2, 2), activation_checkpointing=True)


def test_fsdp_single_rank_gloo():
    """FSDP2 on one CPU rank: same loss and gradients, full state dict keys unchanged."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        ref, model = _pair()
        parallelize(model, fsdp=True, activation_checkpointing=True)
        assert torch.allclose(_step(model), _step(ref), rtol=1e-6)
        want = _grads(ref)
        for name, grad in _grads(model).items():
            assert torch.allclose(grad, want[name], atol=1e-6), name
        assert set(model.state_dict()) == set(ref.state_dict())
        clf = parallelize(VideoMAEClassifier(CFG, 3), fsdp=True)
        x = torch.randn(2, 3, CFG.num_frames, CFG.img_size, CFG.img_size)
        assert clf.forward_features(x).shape == (2, CFG.encoder_width)
    finally:
        dist.destroy_process_group()


def test_fsdp_keeps_the_loss_target_float32():
    """FSDP2's root casts forward inputs to param_dtype by default; the normalised-pixel target is computed from
    the input video inside forward, so a bf16 cast would quantise the target. Compare the dtype target() sees
    under FSDP (bf16 params, autocast) with plain DDP-style eager."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        seen = []
        real = VideoMAE.target

        def spy(self, video):
            seen.append(video.dtype)
            return real(self, video)

        VideoMAE.target = spy
        try:
            _, plain = _pair()
            _step(plain)
            _, sharded = _pair()
            parallelize(sharded, fsdp=True, param_dtype=torch.bfloat16)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _step(sharded)
        finally:
            VideoMAE.target = real
        assert seen == [torch.float32, torch.float32]
    finally:
        dist.destroy_process_group()


def test_compiled_deep_model_with_drop_path_stays_under_the_recompile_limit():
    """Per-block drop-path rates were Python floats (block 0 an Identity): dynamo guarded on each value and
    recompiled the shared block code once per block, past its limit of 8 (fullgraph: an error). A depth-12
    classifier with drop path 0.1 must train two steps compiled (aot_eager backend on CPU) with one graph for
    all its blocks."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # earlier compiled tests in this process count too
    cfg = get_config("tiny", encoder_depth=12, drop_path_rate=0.1)
    torch.manual_seed(0)
    model = parallelize(VideoMAEClassifier(cfg, 4), compile=True, compile_backend="aot_eager")
    x = torch.randn(2, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
    for _ in range(2):
        model(x).sum().backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2  # the block, forward (+ eval variant)


def test_model_scope_compiles_the_whole_forward_with_eager_numbers():
    """``compile="model"`` compiles ``forward_indexed`` (encoder, decoder, target, gathers, loss) as one graph
    (fullgraph: a graph break would raise), leaves the blocks uncompiled, and keeps losses, gradients and keys of
    the eager model (dynamo's eager backend: the capture, in seconds on CPU)."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ref, model = _pair()
    parallelize(model, compile="model", compile_backend="eager")
    assert "forward_indexed" in vars(model)
    assert all(b._compiled_call_impl is None for b in [*model.encoder.blocks, *model.decoder.blocks])
    assert list(model.state_dict()) == list(ref.state_dict())
    for _ in range(2):  # the second call runs the cached graph
        assert torch.equal(_step(model), _step(ref))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    want = _grads(ref)
    for name, grad in _grads(model).items():
        assert torch.equal(grad, want[name]), name


@pytest.mark.slow
def test_model_scope_with_autograd_capture_checkpointing_and_dual_masking():
    """aot_eager (autograd traced too) with activation checkpointing, on a VideoMAE V2 decoder-masked step:
    loss and gradients as eager."""
    from pipeline.loader.decoder_masking import decoder_masks

    cfg = get_config("tiny", drop_path_rate=0.0, decoder_mask_type="run_cell", decoder_mask_ratio=0.5)
    torch.manual_seed(0)
    ref = VideoMAE(cfg)
    torch.manual_seed(0)
    model = parallelize(
        VideoMAE(cfg), compile="model", compile_backend="aot_eager", activation_checkpointing=True
    )
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, cfg.num_frames, cfg.img_size, cfg.img_size, generator=g)
    mask = tube_mask(2, *cfg.grid, cfg.mask_ratio, g)
    dmask = decoder_masks(cfg.grid, cfg.decoder_mask_type, cfg.decoder_mask_ratio, [g, g])
    for m in (ref, model):
        m(x, mask, dmask)[0].backward()
    want = _grads(ref)
    for name, grad in _grads(model).items():
        assert torch.allclose(grad, want[name], atol=1e-6), name


def test_compile_scope_is_checked():
    with pytest.raises(ValueError, match="compile must be one of"):
        parallelize(VideoMAE(CFG), compile="everything")
    with pytest.raises(ValueError, match="not supported"):
        parallelize(VideoMAE(CFG), compile="model", fsdp=True, mesh=object())
