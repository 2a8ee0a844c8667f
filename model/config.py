"""VideoMAE model config: one frozen dataclass, the paper's sizes as named factories, a ``tiny`` debug size.

Why here: the model, FLOP counter, checkpoint loader and every job build from the same validated config, and
jobs make one by name (``get_config("vit_b", drop_path_rate=0.1)``) or from YAML through ``jobs.config``. It is
the one home of the clip geometry and the mask settings: the loader gets them as :meth:`VideoMAEConfig.clip_spec`.

Variants of the checkpoints users download are fields with the official names, not classes: ``qkv_bias``,
``use_mean_pooling`` (classifier pooling), ``encoder_norm`` (the pretraining encoder's final LayerNorm, absent from
Hugging Face ``use_mean_pooling=True`` pretraining models) and VideoMAE V2's dual masking
(``decoder_mask_type``/``decoder_mask_ratio``, masks drawn by ``pipeline.loader.decoder_masking``).

Token grid: a clip ``[C, T, H, W]`` becomes ``T' x H' x W'`` tubelets with ``T' = T / tubelet_size`` and
``H' = H / patch_size`` (same for W); tokens are ordered ``(t, h, w)`` as in the official implementation. The
grid formula, the mask-ratio range and the mask and decoder-mask checks live on the data side
(``pipeline.loader.masking``: ``token_grid``, ``ClipSpec``); this config derives from them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from pipeline.checks import positive_int
from pipeline.loader.masking import MASK_TYPES, ClipSpec, token_grid

CLASSIFIER_POOLS = ("mean", "time")


@dataclasses.dataclass(frozen=True, kw_only=True)
class VideoMAEConfig:
    """Architecture + pretraining-objective settings (defaults: ViT-B, 16x224x224, tube mask 0.9)."""

    img_size: int = 224
    patch_size: int = 16
    num_frames: int = 16
    tubelet_size: int = 2
    in_chans: int = 3
    encoder_width: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    decoder_width: int = 384
    decoder_depth: int = 4
    decoder_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    mask_ratio: float = 0.9
    mask_type: str = "tube"
    norm_pix_loss: bool = True
    # added to each tubelet's pixel std (pixels in [0, 1]) in the normalised target; the official 1e-6 makes a
    # near-flat patch's few levels of codec noise a unit-variance target; small, heavily compressed clips
    # (the CPU studies: 32 px, H.264 4:2:0) want ~0.01
    norm_pix_eps: float = 1e-6
    # classifier: mean over all tokens -> fc_norm (True, official default), or the encoder's final norm -> the first
    # token (False: official ``--use_cls``, HF ``use_mean_pooling=false``; there is no CLS token)
    use_mean_pooling: bool = True
    # with use_mean_pooling: "mean" over all T'*H'*W' tokens (official), or "time": a mean over space per temporal
    # slice, each slice fc_norm-ed, the T' slices concatenated in time order (head input T'*D). A mean over all
    # tokens also averages the order of events away; "time" keeps it for a small model that has not learnt to
    # write motion into every token (the CPU studies' motion classes). Not an official / HF layout.
    classifier_pool: str = "mean"
    # pretraining model: the encoder ends in a LayerNorm (official); HF use_mean_pooling=true pretraining has none
    encoder_norm: bool = True
    # VideoMAE V2 dual masking: "run_cell" decoders reconstruct only the tokens a data-side decoder mask keeps
    # (pipeline.loader.decoder_masking); "none" reconstructs every masked token (VideoMAE)
    decoder_mask_type: str = "none"
    decoder_mask_ratio: float = 0.0

    def __post_init__(self) -> None:
        positive = (
            "img_size patch_size num_frames tubelet_size in_chans encoder_width encoder_depth "
            "encoder_heads decoder_width decoder_depth decoder_heads"
        ).split()
        for name in positive:
            positive_int(f"model.{name}", getattr(self, name))
        if self.img_size % self.patch_size:
            raise ValueError(
                f"model.img_size ({self.img_size}) must be divisible by patch_size ({self.patch_size})"
            )
        if self.num_frames % self.tubelet_size:
            raise ValueError(
                f"model.num_frames ({self.num_frames}) must be divisible by tubelet_size ({self.tubelet_size})"
            )
        for side in ("encoder", "decoder"):
            width, heads = getattr(self, f"{side}_width"), getattr(self, f"{side}_heads")
            if width % heads:
                raise ValueError(f"model.{side}_width ({width}) must be divisible by {side}_heads ({heads})")
        for name in ("qkv_bias", "norm_pix_loss", "use_mean_pooling", "encoder_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"model.{name} must be a bool, got {getattr(self, name)!r}")
        if self.classifier_pool not in CLASSIFIER_POOLS:
            raise ValueError(
                f"model.classifier_pool must be one of {CLASSIFIER_POOLS}, got {self.classifier_pool!r}"
            )
        if self.classifier_pool != "mean" and not self.use_mean_pooling:
            raise ValueError(
                "model.classifier_pool='time' needs use_mean_pooling=true (it pools, then fc_norm)"
            )
        if not self.mlp_ratio > 0 or int(self.encoder_width * self.mlp_ratio) <= 0:
            raise ValueError(f"model.mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not self.norm_pix_eps > 0:
            raise ValueError(f"model.norm_pix_eps must be > 0, got {self.norm_pix_eps}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"model.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.mask_type not in MASK_TYPES:
            raise ValueError(f"model.mask_type must be one of {MASK_TYPES}, got {self.mask_type!r}")
        try:  # the mask ratio's range, the masked count and the decoder mask: checked where a clip is defined
            self.clip_spec()
        except ValueError as e:
            raise ValueError(f"model.{e}") from e

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid ``(T', H', W')`` (``pipeline.loader.masking.token_grid``)."""
        return token_grid(self.num_frames, self.img_size, self.patch_size, self.tubelet_size)

    @property
    def num_patches(self) -> int:
        """Tokens per clip, ``T' * H' * W'``."""
        return math.prod(self.grid)

    @property
    def patch_dim(self) -> int:
        """Pixels a token predicts: ``tubelet * patch * patch * in_chans``."""
        return self.tubelet_size * self.patch_size * self.patch_size * self.in_chans

    @property
    def num_masked(self) -> int:
        """Masked tokens per clip for ``mask_type``/``mask_ratio`` (exact; both mask types keep it fixed)."""
        return self.clip_spec().num_masked

    @property
    def num_decoded(self) -> int:
        """Tokens per clip the decoder reconstructs: every masked token, or those a decoder mask keeps."""
        return self.clip_spec().num_decoded

    def clip_spec(self, *, masking: bool = True) -> ClipSpec:
        """The clip this model consumes, for the loader: its size and, for pretraining (``masking``), its
        encoder mask and VideoMAE V2 decoder mask; finetuning and evaluation see whole clips (no masks)."""
        return ClipSpec(
            num_frames=self.num_frames,
            input_size=self.img_size,
            patch_size=self.patch_size,
            tubelet_size=self.tubelet_size,
            mask_ratio=self.mask_ratio if masking else 0.0,
            mask_type=self.mask_type if masking else "none",
            decoder_mask_type=self.decoder_mask_type if masking else "none",
            decoder_mask_ratio=self.decoder_mask_ratio if masking else 0.0,
        )

    @property
    def encoder_mlp_hidden(self) -> int:
        return int(self.encoder_width * self.mlp_ratio)

    @property
    def decoder_mlp_hidden(self) -> int:
        return int(self.decoder_width * self.mlp_ratio)


def _make(defaults: dict, overrides: dict) -> VideoMAEConfig:
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(VideoMAEConfig)})
    if unknown:
        raise ValueError(f"unknown model config field(s) {unknown}")
    return VideoMAEConfig(**{**defaults, **overrides})


def tiny(**overrides) -> VideoMAEConfig:
    """Debug size: 4x32x32 clips, patch 8, width 64, depth 2 — one CPU train step in milliseconds."""
    defaults = dict(
        img_size=32,
        patch_size=8,
        num_frames=4,
        tubelet_size=2,
        encoder_width=64,
        encoder_depth=2,
        encoder_heads=4,
        decoder_width=32,
        decoder_depth=1,
        decoder_heads=2,
        mask_ratio=0.75,
    )
    return _make(defaults, overrides)


def vit_s(**overrides) -> VideoMAEConfig:
    """ViT-S/16 (official ``pretrain_videomae_small_patch16_224``): width 384, depth 12, 6 heads; decoder 4 x 192,
    3 heads."""
    defaults = dict(encoder_width=384, encoder_depth=12, encoder_heads=6, decoder_width=192, decoder_heads=3)
    return _make(defaults, overrides)


def vit_b(**overrides) -> VideoMAEConfig:
    """ViT-B/16 (official ``pretrain_videomae_base_patch16_224``): width 768, depth 12, 12 heads; decoder 4 x 384, 6 heads."""
    return _make(dict(encoder_width=768, encoder_depth=12, encoder_heads=12), overrides)


def vit_l(**overrides) -> VideoMAEConfig:
    """ViT-L/16 (official ``pretrain_videomae_large_patch16_224``): width 1024, depth 24, 16 heads; decoder 4 x 512, 8 heads."""
    defaults = dict(
        encoder_width=1024, encoder_depth=24, encoder_heads=16, decoder_width=512, decoder_heads=8
    )
    return _make(defaults, overrides)


def vit_h(**overrides) -> VideoMAEConfig:
    """ViT-H/16 (official ``pretrain_videomae_huge_patch16_224``): width 1280, depth 32, 16 heads; decoder 4 x 640,
    8 heads (VideoMAE V2's ViT-H decoder is 512 wide: ``decoder_width=512``)."""
    defaults = dict(
        encoder_width=1280, encoder_depth=32, encoder_heads=16, decoder_width=640, decoder_heads=8
    )
    return _make(defaults, overrides)


def vit_g(**overrides) -> VideoMAEConfig:
    """ViT-g/14 (VideoMAE V2 ``pretrain_videomae_giant_patch14_224``): patch 14, width 1408, depth 40, 16 heads,
    MLP ratio 48/11 (hidden 6144); decoder 4 x 512, 8 heads. V2 pretrains it with ``decoder_mask_type="run_cell"``,
    ``decoder_mask_ratio=0.5`` (the loader draws the decoder masks from ``clip_spec()``)."""
    defaults = dict(
        patch_size=14,
        encoder_width=1408,
        encoder_depth=40,
        encoder_heads=16,
        mlp_ratio=48 / 11,
        decoder_width=512,
        decoder_heads=8,
    )
    return _make(defaults, overrides)


CONFIGS: dict[str, Callable[..., VideoMAEConfig]] = {
    "tiny": tiny,
    "vit_s": vit_s,
    "vit_b": vit_b,
    "vit_l": vit_l,
    "vit_h": vit_h,
    "vit_g": vit_g,
}


def get_config(name: str, **overrides) -> VideoMAEConfig:
    """Config ``name`` (a key of ``CONFIGS``) with field overrides, e.g. ``get_config("vit_b", mask_ratio=0.75)``."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}; known: {sorted(CONFIGS)}")
    return CONFIGS[name](**overrides)
