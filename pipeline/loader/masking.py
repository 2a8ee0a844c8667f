"""What a clip is to the model (its token grid and mask) and the token masks, as pure functions of a
``torch.Generator``.

Why here, on the data side: the loader draws masks (a seeded generator per sample makes the input pipeline
reproducible and resumable) and the model only consumes them. ``ClipSpec`` is derived from the model config
(``model.config.VideoMAEConfig.clip_spec``), never written by hand, so clip size and mask settings have one home.
Every mask has the same number of masked tokens per sample (:func:`num_masked`, the one formula), which the
model needs to batch visible tokens without padding.

Legend: ``B`` batch, ``t, h, w`` token grid (``T'``, ``H'``, ``W'``), ``L = t*h*w``; masks are bool ``[B, L]``
with True = masked, tokens ordered ``(t, h, w)``.
"""

from __future__ import annotations

import dataclasses

import torch

MASK_TYPES = ("tube", "random")  # what a model can be pretrained with; "none" (finetuning) is a ClipSpec's
CLIP_MASK_TYPES = (*MASK_TYPES, "none")


def num_masked(t: int, h: int, w: int, ratio: float, mask_type: str) -> int:
    """Masked tokens per clip of grid ``(t, h, w)``: tube masks ``round(ratio*h*w)`` positions in every time
    slice, random masks ``round(ratio*t*h*w)`` anywhere, ``none`` masks nothing."""
    if mask_type == "tube":
        return t * round(ratio * h * w)
    if mask_type == "random":
        return round(ratio * t * h * w)
    if mask_type == "none":
        return 0
    raise ValueError(f"mask_type must be one of {CLIP_MASK_TYPES}, got {mask_type!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClipSpec:
    """The clip a model consumes: ``num_frames`` x ``input_size``^2 pixels in tubelets of
    ``tubelet_size`` x ``patch_size``^2, masked by ``mask_type`` at ``mask_ratio`` (``none``: no masking)."""

    num_frames: int
    input_size: int
    patch_size: int
    tubelet_size: int
    mask_ratio: float = 0.0
    mask_type: str = "none"

    def __post_init__(self) -> None:
        for name in ("num_frames", "input_size", "patch_size", "tubelet_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.num_frames % self.tubelet_size:
            raise ValueError(
                f"num_frames={self.num_frames} is not a multiple of tubelet_size={self.tubelet_size}"
            )
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input_size={self.input_size} is not a multiple of patch_size={self.patch_size}"
            )
        if self.mask_type not in CLIP_MASK_TYPES:
            raise ValueError(f"mask_type must be one of {CLIP_MASK_TYPES}, got {self.mask_type!r}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")

    @property
    def token_grid(self) -> tuple[int, int, int]:
        """(t, h, w) tokens of one clip."""
        side = self.input_size // self.patch_size
        return self.num_frames // self.tubelet_size, side, side

    @property
    def num_tokens(self) -> int:
        t, h, w = self.token_grid
        return t * h * w

    @property
    def num_masked(self) -> int:
        return num_masked(*self.token_grid, self.mask_ratio, self.mask_type)


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

    Returns bool ``[batch, t*h*w]``; every sample masks exactly ``num_masked(t, h, w, ratio, "tube")`` tokens.
    """
    _check(batch, t, h, w, ratio, generator)
    spatial_BS = _exact_k_of_n(batch, h * w, num_masked(1, h, w, ratio, "tube"), generator)
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

    ``per_frame=False``: ``num_masked(t, h, w, ratio, "random")`` tokens anywhere in the clip.
    ``per_frame=True``: each time slice draws its own spatial mask of ``round(ratio*h*w)`` tokens ("frame"
    masking in the paper). Returns bool ``[batch, t*h*w]``.
    """
    _check(batch, t, h, w, ratio, generator)
    if per_frame:
        k = num_masked(1, h, w, ratio, "tube")
        return _exact_k_of_n(batch * t, h * w, k, generator).reshape(batch, t * h * w)
    return _exact_k_of_n(batch, t * h * w, num_masked(t, h, w, ratio, "random"), generator)


def clip_masks(spec: ClipSpec, generators: list[torch.Generator]) -> torch.Tensor:
    """One mask per generator: bool ``[len(generators), L]``, True = masked (all False for ``none``)."""
    t, h, w = spec.token_grid
    if spec.mask_type == "none":
        return torch.zeros(len(generators), t * h * w, dtype=torch.bool)
    fn = tube_mask if spec.mask_type == "tube" else random_mask
    return torch.cat([fn(1, t, h, w, spec.mask_ratio, g) for g in generators])
