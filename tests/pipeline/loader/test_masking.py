"""Token masks (pipeline.loader.masking): exact counts, tube structure, uniformity, determinism, bad inputs; the one
masked-count formula against independent arithmetic; mask types dispatched by table, an unknown one an error;
the clip spec's decoder mask."""

import numpy as np
import pytest
import torch

from pipeline.loader import masking
from pipeline.loader.decoder_masking import DECODER_MASK_TYPES, decoder_masks, running_cell_mask
from pipeline.loader.masking import (
    MASK_TYPES,
    ClipSpec,
    MaskKind,
    check_mask_ratio,
    clip_masks,
    mask_kind,
    num_masked,
    random_mask,
    token_grid,
    tube_mask,
)


def test_tube_mask_is_constant_over_time_with_exact_ratio():
    t, h, w, ratio = 4, 7, 7, 0.9
    mask = tube_mask(8, t, h, w, ratio, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (8, t * h * w)
    grid = mask.view(8, t, h * w)
    assert torch.equal(grid, grid[:, :1].expand_as(grid))
    assert (grid[:, 0].sum(1) == round(ratio * h * w)).all()
    assert (mask.sum(1) == t * round(ratio * h * w)).all()
    assert not torch.equal(grid[0, 0], grid[1, 0])  # samples differ


def test_random_masks_exact_counts_and_differ_over_time():
    t, h, w, ratio = 4, 6, 6, 0.75
    gen = torch.Generator().manual_seed(1)
    token = random_mask(4, t, h, w, ratio, gen)
    assert (token.sum(1) == round(ratio * t * h * w)).all()
    frame = random_mask(4, t, h, w, ratio, gen, per_frame=True).view(4, t, h * w)
    assert (frame.sum(-1) == round(ratio * h * w)).all()
    for m in (token.view(4, t, h * w), frame):
        assert any(not torch.equal(m[b, 0], m[b, i]) for b in range(4) for i in range(1, t))


def test_masks_are_uniform_over_positions():
    """Each spatial position is masked with probability ~ratio (draws are not biased to a corner)."""
    mask = tube_mask(4000, 1, 4, 4, 0.5, torch.Generator().manual_seed(2))
    freq = mask.float().mean(0)
    assert torch.allclose(freq, torch.full_like(freq, 0.5), atol=0.04)


@pytest.mark.parametrize("fn", [tube_mask, random_mask])
def test_generator_makes_masks_deterministic(fn):
    a = fn(3, 2, 4, 4, 0.75, torch.Generator().manual_seed(7))
    b = fn(3, 2, 4, 4, 0.75, torch.Generator().manual_seed(7))
    c = fn(3, 2, 4, 4, 0.75, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "args,message",
    [
        ((0, 2, 4, 4, 0.5), "batch must be a positive int"),
        ((2, 2, 4.0, 4, 0.5), "h must be a positive int"),
        ((2, 2, 4, 4, 1.0), r"mask ratio must be a number in \(0, 1\)"),
        ((2, 2, 4, 4, -0.1), r"mask ratio must be a number in \(0, 1\)"),
        ((2, 2, 4, 4, 0.0), r"mask ratio must be a number in \(0, 1\)"),
        ((2, 2, 4, 4, True), r"mask ratio must be a number in \(0, 1\)"),
        ((True, 2, 4, 4, 0.5), "batch must be a positive int"),
    ],
)
def test_mask_bad_inputs(args, message):
    with pytest.raises(ValueError, match=message):
        tube_mask(*args, torch.Generator())
    with pytest.raises(ValueError, match=message):
        random_mask(*args, torch.Generator())


def test_mask_needs_generator():
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        tube_mask(2, 2, 4, 4, 0.5, 123)


@pytest.mark.parametrize("t,h,w,ratio", [(8, 14, 14, 0.9), (2, 4, 4, 0.75), (4, 7, 7, 0.95), (3, 5, 5, 0.5)])
def test_num_masked_matches_the_masks_and_hand_arithmetic(t, h, w, ratio):
    import math

    def half_even(x):  # Python's round: half to even, written out
        f = math.floor(x)
        return f + 1 if x - f > 0.5 or (x - f == 0.5 and f % 2) else f

    assert num_masked(t, h, w, ratio, "tube") == t * half_even(ratio * h * w)
    assert num_masked(t, h, w, ratio, "random") == half_even(ratio * t * h * w)
    assert num_masked(t, h, w, ratio, "none") == 0
    g = torch.Generator().manual_seed(0)
    assert int(tube_mask(1, t, h, w, ratio, g).sum()) == num_masked(t, h, w, ratio, "tube")
    assert int(random_mask(1, t, h, w, ratio, g).sum()) == num_masked(t, h, w, ratio, "random")
    with pytest.raises(ValueError, match="mask_type must be one of"):
        num_masked(t, h, w, ratio, "block")


def test_clip_spec_validation_and_clip_masks():
    with pytest.raises(ValueError, match="num_frames=5 is not a multiple of tubelet_size=2"):
        ClipSpec(num_frames=5, input_size=32, patch_size=8, tubelet_size=2)
    with pytest.raises(ValueError, match="input_size=100 is not a multiple of patch_size=16"):
        ClipSpec(num_frames=4, input_size=100, patch_size=16, tubelet_size=2)
    with pytest.raises(ValueError, match="mask_type must be one of"):
        ClipSpec(num_frames=4, input_size=32, patch_size=8, tubelet_size=2, mask_type="blocks")
    with pytest.raises(ValueError, match=r"mask_ratio must be a number in \(0, 1\)"):
        ClipSpec(num_frames=4, input_size=32, patch_size=8, tubelet_size=2, mask_ratio=1.0, mask_type="tube")
    with pytest.raises(ValueError, match="mask_ratio must be 0 with mask_type 'none'"):
        ClipSpec(num_frames=4, input_size=32, patch_size=8, tubelet_size=2, mask_ratio=0.5)
    with pytest.raises(ValueError, match="masks no token of a 4x4 grid"):
        ClipSpec(num_frames=4, input_size=32, patch_size=8, tubelet_size=2, mask_ratio=0.01, mask_type="tube")
    with pytest.raises(ValueError, match="num_frames must be a positive int, got True"):
        ClipSpec(num_frames=True, input_size=32, patch_size=8, tubelet_size=1)
    spec = ClipSpec(
        num_frames=4, input_size=32, patch_size=8, tubelet_size=2, mask_ratio=0.75, mask_type="tube"
    )
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    m = clip_masks(spec, gens)
    assert m.shape == (3, spec.num_tokens) and (m.sum(1) == spec.num_masked).all()
    assert torch.equal(m[1:2], tube_mask(1, 2, 4, 4, 0.75, torch.Generator().manual_seed(1)))
    none = ClipSpec(num_frames=4, input_size=32, patch_size=8, tubelet_size=2)
    assert not clip_masks(none, gens).any()


def _spec(**kw):
    return ClipSpec(num_frames=4, input_size=32, patch_size=8, tubelet_size=2, **kw)


def test_unknown_mask_type_is_an_error_never_a_fallback():
    """The dispatch is the MASKS table: a type missing from it raises, naming the type, wherever it is used —
    even on a spec whose validation was bypassed (before, anything not "tube" drew a random mask)."""
    assert MASK_TYPES == tuple(masking.MASKS) == ("tube", "random", "motion")
    with pytest.raises(ValueError, match="mask_type must be one of .* got 'block'"):
        mask_kind("block")
    spec = _spec(mask_ratio=0.5, mask_type="tube")
    object.__setattr__(spec, "mask_type", "block")
    with pytest.raises(ValueError, match="got 'block'"):
        clip_masks(spec, [torch.Generator()])
    with pytest.raises(ValueError, match="decoder_mask_type must be one of .* got 'cells'"):
        decoder_masks((2, 4, 4), "cells", 0.5, [torch.Generator()])
    assert DECODER_MASK_TYPES == ("none", "run_cell")


def test_a_new_mask_type_is_one_table_entry(monkeypatch):
    """Adding a mask type is a MASKS entry: its count and draw are what num_masked and clip_masks use."""

    def corner(batch, t, h, w, ratio, generator):  # the first k tokens, a deterministic toy mask
        k = round(ratio * t * h * w)
        return (torch.arange(t * h * w) < k).expand(batch, -1)

    monkeypatch.setitem(masking.MASKS, "corner", MaskKind(lambda t, h, w, r: round(r * t * h * w), corner))
    monkeypatch.setattr(masking, "CLIP_MASK_TYPES", (*masking.CLIP_MASK_TYPES, "corner"))
    spec = _spec(mask_ratio=0.25, mask_type="corner")
    assert spec.num_masked == num_masked(2, 4, 4, 0.25, "corner") == 8
    m = clip_masks(spec, [torch.Generator()] * 2)
    assert m.shape == (2, 32) and m[:, :8].all() and not m[:, 8:].any()


def test_clip_spec_carries_the_decoder_mask():
    spec = _spec(mask_ratio=0.75, mask_type="tube", decoder_mask_type="run_cell", decoder_mask_ratio=0.5)
    assert spec.num_masked == 24 and spec.num_decoded == 16  # run_cell 0.5 keeps half of the 32 tokens
    assert _spec(mask_ratio=0.75, mask_type="tube").num_decoded == 24  # no decoder mask: every masked token
    g = torch.Generator().manual_seed(3)
    got = decoder_masks(spec.token_grid, spec.decoder_mask_type, spec.decoder_mask_ratio, [g])
    assert torch.equal(got, running_cell_mask(1, 2, 4, 4, 0.5, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="decoder_mask_type 'run_cell' needs an encoder mask type"):
        _spec(decoder_mask_type="run_cell", decoder_mask_ratio=0.5)
    with pytest.raises(ValueError, match="decoder_mask_ratio must be 0 with decoder_mask_type 'none'"):
        _spec(mask_ratio=0.75, mask_type="tube", decoder_mask_ratio=0.5)
    with pytest.raises(ValueError, match="needs an even token grid"):
        ClipSpec(num_frames=4, input_size=24, patch_size=8, tubelet_size=2, mask_ratio=0.75, mask_type="tube",
                 decoder_mask_type="run_cell", decoder_mask_ratio=0.5)  # fmt: skip


def test_token_grid_and_the_mask_ratio_check():
    assert token_grid(16, 224, 16, 2) == (8, 14, 14) and token_grid(4, 32, 8, 1) == (4, 4, 4)
    assert check_mask_ratio(0.9) == 0.9 and isinstance(check_mask_ratio(np.float64(0.5)), float)
    for bad in (0, 1, 1.5, -0.2, True, "0.5", None):
        with pytest.raises(ValueError, match=r"^r must be a number in \(0, 1\), got "):
            check_mask_ratio(bad, name="r")
