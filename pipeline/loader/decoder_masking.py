"""Decoder masks for VideoMAE V2's dual masking (Wang et al., 2023, §3.2), as pure functions of a
``torch.Generator``.

Why here, on the data side: like the encoder mask (``pipeline.loader.masking``), the decoder mask is drawn per sample by
the loader from a seeded generator, so the input pipeline stays reproducible and resumable; the model only consumes
it (``VideoMAE.forward(video, mask, decoder_mask)``). With a decoder mask the decoder runs on the visible tokens
plus mask tokens at the positions the decoder mask keeps, and the loss counts the kept positions the encoder did
not see — far fewer decoder tokens than VideoMAE's every-masked-token reconstruction.

Running cell (``run_cell``, VideoMAE V2's ``RunningCellMaskingGenerator``): every time slice is tiled by 2x2 cells;
in each cell ``int(4 * ratio)`` of the 4 positions are dropped, and the dropped positions advance one step around
the cell per time slice, so consecutive slices reconstruct complementary positions. One random phase (of 4) per
clip. Exactly ``t*h*w * (4 - int(4*ratio)) / 4`` tokens are kept per clip (:func:`num_decoder_kept`).

Decoder mask types are one table, :data:`DECODER_MASKS` (type -> check, kept count, draw); ``none`` is the
absence of a decoder mask; an unknown type is a ``ValueError``, never a fallback.

Legend: ``B`` batch, ``t, h, w`` token grid, ``L = t*h*w`` tokens ordered ``(t, h, w)``; decoder masks are bool
``[B, L]`` with True = not reconstructed by the decoder (VideoMAE V2's ``decode_masked_pos``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from pipeline.checks import positive_int

CELL = 4  # positions of a 2x2 running cell


def _check_run_cell(h: int, w: int, ratio: float) -> None:
    if not 0.0 < ratio < 1.0 or not 1 <= int(CELL * ratio) < CELL:
        raise ValueError(
            f"decoder_mask_ratio must drop 1-3 positions of a 2x2 cell for run_cell (0.25 <= r < 1), got {ratio}"
        )
    if h % 2 or w % 2:
        raise ValueError(f"decoder_mask_type 'run_cell' needs an even token grid, got {h}x{w}")


def _run_cell_kept(t: int, h: int, w: int, ratio: float) -> int:
    return t * h * w * (CELL - int(CELL * ratio)) // CELL


def running_cell_mask(
    batch: int, t: int, h: int, w: int, ratio: float, generator: torch.Generator
) -> torch.Tensor:
    """Running-cell decoder mask, bool ``[batch, t*h*w]`` (True = not reconstructed).

    Cell position ``c = 2*(y % 2) + (x % 2)`` of slice ``i`` is dropped iff ``(c + phase + i + 1) % 4 <
    int(4*ratio)``, with one ``phase`` in ``0..3`` per sample: the official generator's rotating queue of
    ``int(4*ratio)`` ones and ``4 - int(4*ratio)`` zeros, advanced once before each slice."""
    _check_run_cell(h, w, ratio)
    positive_int("decoder mask batch", batch)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"decoder mask generator must be a torch.Generator, got {type(generator).__name__}")
    device = generator.device
    phase_B = torch.randint(CELL, (batch,), generator=generator, device=device)
    y, x = torch.arange(h, device=device), torch.arange(w, device=device)
    cell_HW = 2 * (y[:, None] % 2) + x[None, :] % 2
    slice_T = torch.arange(t, device=device)
    step_BTHW = (cell_HW[None, None] + phase_B[:, None, None, None] + slice_T[None, :, None, None] + 1) % CELL
    return (step_BTHW < int(CELL * ratio)).reshape(batch, t * h * w)


@dataclasses.dataclass(frozen=True)
class DecoderMaskKind:
    """One decoder mask type: ``check(h, w, ratio)`` raises ``ValueError`` for settings it cannot draw,
    ``kept(t, h, w, ratio)`` tokens per clip the decoder reconstructs, ``draw(batch, t, h, w, ratio,
    generator)`` -> bool ``[batch, L]`` (True = not reconstructed)."""

    check: Callable[[int, int, float], None]
    kept: Callable[[int, int, int, float], int]
    draw: Callable[..., torch.Tensor]


DECODER_MASKS: dict[str, DecoderMaskKind] = {
    "run_cell": DecoderMaskKind(_check_run_cell, _run_cell_kept, running_cell_mask),
}
DECODER_MASK_TYPES = (
    "none",
    *DECODER_MASKS,
)  # "none": the decoder reconstructs every masked token (VideoMAE)


def check_decoder_mask(h: int, w: int, ratio: float, mask_type: str) -> None:
    """``ValueError`` unless ``mask_type``/``ratio`` describe a decoder mask of an ``h x w`` token grid."""
    if mask_type == "none":
        if ratio != 0.0:
            raise ValueError(f"decoder_mask_ratio must be 0 with decoder_mask_type 'none', got {ratio}")
        return
    if mask_type not in DECODER_MASKS:
        raise ValueError(f"decoder_mask_type must be one of {DECODER_MASK_TYPES}, got {mask_type!r}")
    DECODER_MASKS[mask_type].check(h, w, ratio)


def num_decoder_kept(t: int, h: int, w: int, ratio: float, mask_type: str) -> int | None:
    """Tokens per clip the decoder reconstructs under a decoder mask; ``None`` for ``none`` (then it is every
    masked token, which the encoder mask decides)."""
    check_decoder_mask(h, w, ratio, mask_type)
    if mask_type == "none":
        return None
    return DECODER_MASKS[mask_type].kept(t, h, w, ratio)


def decoder_masks(
    grid: tuple[int, int, int], mask_type: str, ratio: float, generators: list[torch.Generator]
) -> torch.Tensor | None:
    """One decoder mask per generator, bool ``[len(generators), L]``; ``None`` for ``mask_type="none"``."""
    t, h, w = grid
    check_decoder_mask(h, w, ratio, mask_type)
    if mask_type == "none":
        return None
    draw = DECODER_MASKS[mask_type].draw
    return torch.cat([draw(1, t, h, w, ratio, g) for g in generators])
