import socket

import pytest
import torch
import torch.distributed as dist

from model import VideoMAE, VideoMAEClassifier, get_config
from model.parallelize import parallelize
from pipeline.masking import tube_mask

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
