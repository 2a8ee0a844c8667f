"""What a clip is to the model (its token grid and masks) and the token masks, as pure functions of a
``torch.Generator``.

Why here, on the data side: the loader draws masks (a seeded generator per sample makes the input pipeline
reproducible and resumable) and the model only consumes them. ``ClipSpec`` is derived from the model config
(``model.config.VideoMAEConfig.clip_spec``), never written by hand, so clip size and mask settings have one home;
the token grid (:func:`token_grid`) and the mask-ratio range (:func:`check_mask_ratio`) are defined here once
and the model config derives from them. Every mask has the same number of masked tokens per sample (the
``count`` of its :data:`MASKS` entry), which the model needs to batch visible tokens without padding.

Mask types are one table, :data:`MASKS` (type -> count formula and draw); an unknown type is a ``ValueError``,
never a fallback. ``motion`` masks follow the clip's motion vectors, so the loader draws them from the video
(:func:`pipeline.loader.clips.make_clips`); their table entry holds their tube count and motionless case.
VideoMAE V2's decoder masks (:mod:`pipeline.loader.decoder_masking`) are part of the spec too.

Legend: ``B`` batch, ``t, h, w`` token grid (``T'``, ``H'``, ``W'``), ``L = t*h*w``; masks are bool ``[B, L]``
with True = masked, tokens ordered ``(t, h, w)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from pipeline.checks import positive_int
from pipeline.loader.decoder_masking import check_decoder_mask, num_decoder_kept


def token_grid(num_frames: int, input_size: int, patch_size: int, tubelet_size: int) -> tuple[int, int, int]:
    """Token grid ``(t, h, w)`` of a ``num_frames`` x ``input_size``^2 clip cut into tubelets of
    ``tubelet_size`` x ``patch_size``^2 (the one formula; sizes are assumed to divide)."""
    side = input_size // patch_size
    return num_frames // tubelet_size, side, side


def check_mask_ratio(ratio: object, *, name: str = "mask_ratio") -> float:
    """``ratio`` as a float if it is a number in (0, 1) — the fraction of tokens a mask hides — otherwise
    ``ValueError`` naming ``name``."""
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {ratio!r}")
    return float(ratio)


def _check(batch: int, t: int, h: int, w: int, ratio: float, generator: torch.Generator) -> None:
    for name, value in (("batch", batch), ("t", t), ("h", h), ("w", w)):
        positive_int(f"mask {name}", value)
    check_mask_ratio(ratio, name="mask ratio")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"mask generator must be a torch.Generator, got {type(generator).__name__}")


def _tube_count(t: int, h: int, w: int, ratio: float) -> int:
    return t * round(ratio * h * w)


def _random_count(t: int, h: int, w: int, ratio: float) -> int:
    return round(ratio * t * h * w)


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
    spatial_BS = _exact_k_of_n(batch, h * w, _tube_count(1, h, w, ratio), generator)
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
        k = _tube_count(1, h, w, ratio)
        return _exact_k_of_n(batch * t, h * w, k, generator).reshape(batch, t * h * w)
    return _exact_k_of_n(batch, t * h * w, _random_count(t, h, w, ratio), generator)


@dataclasses.dataclass(frozen=True)
class MaskKind:
    """One mask type: ``count(t, h, w, ratio)`` masked tokens per clip, and ``draw(batch, t, h, w, ratio,
    generator)`` -> bool ``[batch, L]`` masks with exactly that many True per row.

    ``follows_motion``: the loader draws this type from each clip's own motion vectors
    (:func:`pipeline.loader.clips.make_clips`, :mod:`pipeline.loader.motion`); ``draw`` is then only its
    motionless case, what a clip without video (a padded slot) gets, and no fixed mask can stand for it."""

    count: Callable[[int, int, int, float], int]
    draw: Callable[..., torch.Tensor]
    follows_motion: bool = False


MASKS: dict[str, MaskKind] = {
    "tube": MaskKind(_tube_count, tube_mask),
    "random": MaskKind(_random_count, random_mask),
    # motion-guided tubes (pipeline.loader.motion.motion_masks): the tube count; zero motion = the tube mask
    "motion": MaskKind(_tube_count, tube_mask, follows_motion=True),
}
MASK_TYPES = tuple(MASKS)  # what a model can be pretrained with; "none" (finetuning) is a ClipSpec's
CLIP_MASK_TYPES = (*MASK_TYPES, "none")


def mask_kind(mask_type: str) -> MaskKind:
    """The :data:`MASKS` entry of ``mask_type``; ``ValueError`` naming it if there is none."""
    if mask_type not in MASKS:
        raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
    return MASKS[mask_type]


def num_masked(t: int, h: int, w: int, ratio: float, mask_type: str) -> int:
    """Masked tokens per clip of grid ``(t, h, w)``: tube and motion masks ``round(ratio*h*w)`` positions in
    every time slice, random masks ``round(ratio*t*h*w)`` anywhere, ``none`` masks nothing."""
    if mask_type == "none":
        return 0
    if mask_type not in MASKS:
        raise ValueError(f"mask_type must be one of {CLIP_MASK_TYPES}, got {mask_type!r}")
    return MASKS[mask_type].count(t, h, w, ratio)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClipSpec:
    """The clip a model consumes: ``num_frames`` x ``input_size``^2 pixels in tubelets of
    ``tubelet_size`` x ``patch_size``^2, masked by ``mask_type`` at ``mask_ratio`` (``none``: no masking, ratio
    0), and, for VideoMAE V2's dual masking, reconstructed where a ``decoder_mask_type`` mask at
    ``decoder_mask_ratio`` keeps tokens (``none``: every masked token)."""

    num_frames: int
    input_size: int
    patch_size: int
    tubelet_size: int
    mask_ratio: float = 0.0
    mask_type: str = "none"
    decoder_mask_type: str = "none"
    decoder_mask_ratio: float = 0.0

    def __post_init__(self) -> None:
        for name in ("num_frames", "input_size", "patch_size", "tubelet_size"):
            positive_int(name, getattr(self, name))
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
        t, h, w = self.token_grid
        if self.mask_type == "none":
            if self.mask_ratio != 0:
                raise ValueError(f"mask_ratio must be 0 with mask_type 'none', got {self.mask_ratio!r}")
            if self.decoder_mask_type != "none":
                raise ValueError(f"decoder_mask_type {self.decoder_mask_type!r} needs an encoder mask type")
        else:
            check_mask_ratio(self.mask_ratio)
            if self.num_masked == 0:
                raise ValueError(f"mask_ratio {self.mask_ratio} masks no token of a {h}x{w} grid")
        check_decoder_mask(h, w, self.decoder_mask_ratio, self.decoder_mask_type)

    @property
    def token_grid(self) -> tuple[int, int, int]:
        """(t, h, w) tokens of one clip."""
        return token_grid(self.num_frames, self.input_size, self.patch_size, self.tubelet_size)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.token_grid)

    @property
    def num_masked(self) -> int:
        return num_masked(*self.token_grid, self.mask_ratio, self.mask_type)

    @property
    def num_decoded(self) -> int:
        """Tokens per clip the decoder reconstructs: every masked token, or those a decoder mask keeps."""
        kept = num_decoder_kept(*self.token_grid, self.decoder_mask_ratio, self.decoder_mask_type)
        return self.num_masked if kept is None else kept


def clip_masks(spec: ClipSpec, generators: list[torch.Generator]) -> torch.Tensor:
    """One mask per generator: bool ``[len(generators), L]``, True = masked (all False for ``none``; for
    ``motion``, without a video, the motionless case: the tube mask)."""
    t, h, w = spec.token_grid
    if spec.mask_type == "none":
        return torch.zeros(len(generators), t * h * w, dtype=torch.bool)
    draw = mask_kind(spec.mask_type).draw
    return torch.cat([draw(1, t, h, w, spec.mask_ratio, g) for g in generators])
