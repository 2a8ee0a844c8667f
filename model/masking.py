"""Token masks for VideoMAE pretraining, as pure functions of a ``torch.Generator``.

Why pure: the data loader (not the model) draws masks, so a seeded generator per worker makes the whole input
pipeline reproducible and resumable. Every mask has the same count of masked tokens per sample (exact ratio),
which the model needs to batch visible tokens without padding.

Legend: ``B`` batch, ``t, h, w`` token grid (``T'``, ``H'``, ``W'``), ``L = t*h*w``; masks are bool ``[B, L]``
with True = masked, tokens ordered ``(t, h, w)``.
"""

from __future__ import annotations

import torch


def _check(batch: int, t: int, h: int, w: int, ratio: float, generator: torch.Generator) -> None:
    for name, value in (("batch", batch), ("t", t), ("h", h), ("w", w)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"mask {name} must be a positive int, got {value!r}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"mask generator must be a torch.Generator, got {type(generator).__name__}")


def _exact_k_of_n(rows: int, n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """bool ``[rows, n]`` with exactly ``k`` True per row, positions uniform without replacement."""
    noise = torch.rand(rows, n, generator=generator, device=generator.device)
    rank = noise.argsort(dim=1).argsort(dim=1)
    return rank < k


def tube_mask(batch: int, t: int, h: int, w: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Tube masking (paper §3.3): one spatial mask of ``round(ratio*h*w)`` tokens repeated over all ``t``.

    Returns bool ``[batch, t*h*w]``; every sample masks exactly ``t * round(ratio*h*w)`` tokens.
    """
    _check(batch, t, h, w, ratio, generator)
    spatial_BS = _exact_k_of_n(batch, h * w, round(ratio * h * w), generator)
    return spatial_BS[:, None, :].expand(batch, t, h * w).reshape(batch, t * h * w)


def random_mask(
    batch: int,
    t: int,
    h: int,
    w: int,
    ratio: float,
    generator: torch.Generator,
    *,
    per_frame: bool = False,
) -> torch.Tensor:
    """Random masking (ablation baseline): independent positions, exact count per sample.

    ``per_frame=False``: ``round(ratio*t*h*w)`` tokens anywhere in the clip. ``per_frame=True``: each time
    slice draws its own spatial mask of ``round(ratio*h*w)`` tokens ("frame" masking in the paper).
    Returns bool ``[batch, t*h*w]``.
    """
    _check(batch, t, h, w, ratio, generator)
    if per_frame:
        return _exact_k_of_n(batch * t, h * w, round(ratio * h * w), generator).reshape(batch, t * h * w)
    return _exact_k_of_n(batch, t * h * w, round(ratio * t * h * w), generator)
