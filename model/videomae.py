"""VideoMAE (Tong et al., 2022): masked tubelet autoencoder for video, and the classifier that finetunes it.

Read top to bottom: patchify helpers -> encoder (visible tokens only) -> decoder (visible + mask tokens) ->
``VideoMAE`` (pretraining loss) -> ``VideoMAEClassifier`` (finetuning). Module names follow the official
MCG-NJU code (``encoder.blocks.N.attn.qkv``, ``encoder_to_decoder``, ``mask_token``, ``decoder.head`` ...).

Legend: ``B`` batch, ``C`` channels, ``T/H/W`` frames/pixels, ``L`` tokens per clip (``T'*H'*W'``), ``N``
visible tokens, ``M`` masked tokens, ``K`` tokens the decoder reconstructs (``M``, or those a VideoMAE V2 decoder
mask keeps), ``D`` encoder width, ``E`` decoder width, ``P`` pixels per token (``tubelet*patch*patch*C``). Masks
are bool ``[B, L]``, True = masked (decoder mask: True = not reconstructed), tokens ordered ``(t, h, w)``.
Videos are ImageNet-normalised (``(x/255 - mean) / std``) when ``C == 3``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from model.config import VideoMAEConfig
from model.layers import LN_EPS, PatchEmbed, make_blocks, sinusoid_table
from pipeline.checks import positive_int
from pipeline.loader.normalize import IMAGENET_MEAN, IMAGENET_STD


def patchify(video_BCTHW: torch.Tensor, *, patch_size: int, tubelet_size: int) -> torch.Tensor:
    """``[B, C, T, H, W] -> [B, L, P]`` with pixels of a token ordered ``(t, h, w, c)`` (official layout
    ``b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)``)."""
    return rearrange(
        video_BCTHW,
        "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)",
        p0=tubelet_size,
        p1=patch_size,
        p2=patch_size,
    )


def unpatchify(
    patches_BLP: torch.Tensor, *, grid: tuple[int, int, int], patch_size: int, tubelet_size: int
) -> torch.Tensor:
    """Inverse of ``patchify``: ``[B, L, P] -> [B, C, T, H, W]`` for token grid ``(T', H', W')``."""
    t, h, w = grid
    return rearrange(
        patches_BLP,
        "b (t h w) (p0 p1 p2 c) -> b c (t p0) (h p1) (w p2)",
        t=t,
        h=h,
        w=w,
        p0=tubelet_size,
        p1=patch_size,
        p2=patch_size,
    )


def _gather_tokens(x_BLD: torch.Tensor, idx_BN: torch.Tensor) -> torch.Tensor:
    return torch.gather(x_BLD, 1, idx_BN[:, :, None].expand(-1, -1, x_BLD.shape[-1]))


class VideoMAEEncoder(nn.Module):
    """Tubelet embedding + fixed sinusoid positions + ViT blocks, run on the visible tokens only."""

    def __init__(self, cfg: VideoMAEConfig, *, final_norm: bool = True) -> None:
        super().__init__()
        d = cfg.encoder_width
        self.patch_embed = PatchEmbed(
            in_chans=cfg.in_chans, dim=d, patch_size=cfg.patch_size, tubelet_size=cfg.tubelet_size
        )
        self.register_buffer("pos_embed", sinusoid_table(cfg.num_patches, d), persistent=False)
        self.blocks = make_blocks(
            dim=d,
            depth=cfg.encoder_depth,
            num_heads=cfg.encoder_heads,
            mlp_hidden=cfg.encoder_mlp_hidden,
            qkv_bias=cfg.qkv_bias,
            drop_path_rate=cfg.drop_path_rate,
        )
        self.norm = nn.LayerNorm(d, eps=LN_EPS) if final_norm else nn.Identity()

    def forward(self, video_BCTHW: torch.Tensor, visible_BN: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens ``[B, N, D]`` of the visible positions ``visible_BN`` (indices, token order), or all ``L``."""
        x_BLD = self.patch_embed(video_BCTHW)
        x_BLD = x_BLD + self.pos_embed.to(dtype=x_BLD.dtype)
        x_BND = x_BLD if visible_BN is None else _gather_tokens(x_BLD, visible_BN)
        for block in self.blocks:
            x_BND = block(x_BND)
        return self.norm(x_BND)


class VideoMAEDecoder(nn.Module):
    """Narrow ViT over the visible tokens and ``K`` mask tokens; predicts the pixels ``P`` of the last ``K``."""

    def __init__(self, cfg: VideoMAEConfig) -> None:
        super().__init__()
        e = cfg.decoder_width
        self.blocks = make_blocks(
            dim=e,
            depth=cfg.decoder_depth,
            num_heads=cfg.decoder_heads,
            mlp_hidden=cfg.decoder_mlp_hidden,
            qkv_bias=cfg.qkv_bias,
            drop_path_rate=cfg.drop_path_rate,
        )
        self.norm = nn.LayerNorm(e, eps=LN_EPS)
        self.head = nn.Linear(e, cfg.patch_dim)

    def forward(self, x_BSE: torch.Tensor, num_predicted: int) -> torch.Tensor:
        for block in self.blocks:
            x_BSE = block(x_BSE)
        return self.head(self.norm(x_BSE[:, -num_predicted:]))


def time_pool(x_BLD: torch.Tensor, num_slices: int) -> torch.Tensor:
    """Order-keeping clip feature ``[B, T'*D]``: tokens ``[B, L, D]`` (ordered ``(t, h, w)``) averaged over
    the ``H'*W'`` positions of each of the ``T' = num_slices`` temporal slices, each slice layer-normalised
    without affine parameters (as ``forward_features``), the slices concatenated in time order. Unlike the
    mean over all tokens it keeps *when* things happen, which motion classes need."""
    if x_BLD.ndim != 3 or num_slices < 1 or x_BLD.shape[1] % num_slices:
        raise ValueError(
            f"tokens must be [B, L, D] with L divisible by {num_slices}, got {list(x_BLD.shape)}"
        )
    x_BTD = rearrange(x_BLD, "b (t s) d -> b t s d", t=num_slices).mean(dim=2)
    x_BTD = F.layer_norm(x_BTD, (x_BTD.shape[-1],), eps=LN_EPS)
    return rearrange(x_BTD, "b t d -> b (t d)")


def _check_video(cfg: VideoMAEConfig, video: torch.Tensor) -> None:
    want = (cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size)
    if not isinstance(video, torch.Tensor) or video.ndim != 5 or tuple(video.shape[1:]) != want:
        got = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"video must be [B, C, T, H, W] = [B, {', '.join(map(str, want))}], got {got}")
    if not video.is_floating_point():
        raise ValueError(f"video must be a float tensor (ImageNet-normalised), got dtype {video.dtype}")


def _init_linear_ln(module: nn.Module, linear_init) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            linear_init(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class VideoMAE(nn.Module):
    """Masked autoencoder for pretraining: ``forward(video, mask) -> (loss, pred)``."""

    def __init__(self, cfg: VideoMAEConfig) -> None:
        super().__init__()
        if not isinstance(cfg, VideoMAEConfig):
            raise ValueError(f"cfg must be a VideoMAEConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.encoder = VideoMAEEncoder(cfg, final_norm=cfg.encoder_norm)
        self.encoder_to_decoder = nn.Linear(cfg.encoder_width, cfg.decoder_width, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_width))
        self.register_buffer(
            "decoder_pos_embed", sinusoid_table(cfg.num_patches, cfg.decoder_width), persistent=False
        )
        self.decoder = VideoMAEDecoder(cfg)
        _init_linear_ln(self, nn.init.xavier_uniform_)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    # ---- pixels <-> tokens -------------------------------------------------------------------------------
    def patchify(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        """``[B, C, T, H, W] -> [B, L, P]`` in the loss-target layout."""
        return patchify(video_BCTHW, patch_size=self.cfg.patch_size, tubelet_size=self.cfg.tubelet_size)

    def unpatchify(self, patches_BLP: torch.Tensor) -> torch.Tensor:
        """``[B, L, P] -> [B, C, T, H, W]``."""
        cfg = self.cfg
        return unpatchify(
            patches_BLP, grid=cfg.grid, patch_size=cfg.patch_size, tubelet_size=cfg.tubelet_size
        )

    def _unnormalize(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised -> ``[0, 1]`` pixels (3 channels); other channel counts are used as given."""
        if self.cfg.in_chans != 3:
            return video_BCTHW.float()
        mean = video_BCTHW.new_tensor(IMAGENET_MEAN, dtype=torch.float32)[None, :, None, None, None]
        std = video_BCTHW.new_tensor(IMAGENET_STD, dtype=torch.float32)[None, :, None, None, None]
        return video_BCTHW.float() * std + mean

    def _tubelets(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        """Unnormalised pixels per token and channel, ``[B, L, tubelet*patch*patch, C]`` (float32)."""
        patches_BLP = self.patchify(self._unnormalize(video_BCTHW))
        return patches_BLP.unflatten(-1, (-1, self.cfg.in_chans))

    @torch.no_grad()
    def target(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        """Regression target for every token, ``[B, L, P]`` float32: per-tubelet, per-channel normalised
        pixels (``norm_pix_loss``) or the raw unnormalised pixels."""
        x_BLKC = self._tubelets(video_BCTHW)
        if self.cfg.norm_pix_loss:
            mean = x_BLKC.mean(dim=-2, keepdim=True)
            std = x_BLKC.var(dim=-2, unbiased=True, keepdim=True).sqrt()
            x_BLKC = (x_BLKC - mean) / (std + self.cfg.norm_pix_eps)  # official: eps 1e-6
        return x_BLKC.flatten(-2)

    # ---- masking -----------------------------------------------------------------------------------------
    def _order(self, mask_BL: torch.Tensor, batch: int, name: str, what: str) -> tuple[torch.Tensor, int]:
        """Token indices ``[B, L]`` with the False positions first, each part in token order, and the number of
        True per sample (checked equal across the batch). Sorted where the mask lives (a CPU mask from the
        loader costs the GPU no sync)."""
        L = self.cfg.num_patches
        if (
            not isinstance(mask_BL, torch.Tensor)
            or mask_BL.dtype != torch.bool
            or mask_BL.shape != (batch, L)
        ):
            got = (tuple(mask_BL.shape), mask_BL.dtype) if isinstance(mask_BL, torch.Tensor) else mask_BL
            raise ValueError(
                f"{name} must be a bool tensor [B, L] = [{batch}, {L}] (True = {what}), got {got}"
            )
        counts_B = mask_BL.sum(dim=1)
        count = int(counts_B[0])
        if not bool((counts_B == count).all()):
            raise ValueError(
                f"{name} must mask the same number of tokens in every sample, got {counts_B.tolist()}"
            )
        return torch.argsort(mask_BL.to(torch.uint8), dim=1, stable=True), count

    def _split(
        self, mask_BL: torch.Tensor, batch: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of visible ``[B, N]`` and masked ``[B, M]`` tokens on ``device``, each in token order."""
        L = self.cfg.num_patches
        order_BL, num_masked = self._order(mask_BL, batch, "mask", "masked")
        if not 0 < num_masked < L:
            raise ValueError(
                f"mask must mask between 1 and L-1 = {L - 1} tokens per sample, got {num_masked}"
            )
        # non_blocking: the indices are sorted on the host, where the loader drew the mask, and a pageable
        # host->device copy queued this way is staged at once without waiting for the GPU (a blocking .to()
        # would make every step wait for the previous one: a host sync).
        order_BL = order_BL.to(device, non_blocking=True)
        return order_BL[:, : L - num_masked], order_BL[:, L - num_masked :]

    def _decoded(
        self, mask_BL: torch.Tensor, decoder_mask_BL: torch.Tensor, batch: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """VideoMAE V2 dual masking: indices ``[B, K]`` of the tokens the decoder mask keeps (token order) and
        their loss weights ``[B, K]`` (1 where the encoder did not see the token, else 0)."""
        L = self.cfg.num_patches
        order_BL, dropped = self._order(decoder_mask_BL, batch, "decoder_mask", "not reconstructed")
        if dropped == L:
            raise ValueError("decoder_mask must keep at least one token per sample, it drops all")
        kept_BK = order_BL[:, : L - dropped]
        weight_BK = torch.gather(mask_BL.to(kept_BK.device), 1, kept_BK)
        if not bool(weight_BK.any()):
            raise ValueError("decoder_mask keeps none of the masked tokens: nothing to reconstruct")
        return kept_BK.to(device, non_blocking=True), weight_BK.to(device, non_blocking=True)  # as in _split

    # ---- forward -----------------------------------------------------------------------------------------
    def forward(
        self, video_BCTHW: torch.Tensor, mask_BL: torch.Tensor, decoder_mask_BL: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(loss, pred)``: scalar MSE (float32) and predictions ``[B, K, P]`` in token order.

        Without ``decoder_mask`` the decoder reconstructs every masked token (``K = M``). With one (VideoMAE V2,
        ``pipeline.loader.decoder_masking``) it runs on the visible tokens plus mask tokens at the ``K`` positions the
        decoder mask keeps, and the loss is the mean over those kept positions the encoder did not see."""
        _check_video(self.cfg, video_BCTHW)
        B = video_BCTHW.shape[0]
        visible_BN, masked_BM = self._split(mask_BL, B, video_BCTHW.device)
        decoded_BK, weight_BK = masked_BM, None
        if decoder_mask_BL is not None:
            decoded_BK, weight_BK = self._decoded(mask_BL, decoder_mask_BL, B, video_BCTHW.device)
        return self.forward_indexed(video_BCTHW, visible_BN, decoded_BK, weight_BK)

    def forward_indexed(
        self,
        video_BCTHW: torch.Tensor,
        visible_BN: torch.Tensor,
        decoded_BK: torch.Tensor,
        weight_BK: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` after the masks became device indices: encoder on ``visible_BN``, decoder predicting
        ``decoded_BK``, target and loss (``weight_BK`` as in ``forward_loss``). Tensor work only, every shape
        fixed by the config, no host sync: the region ``model.parallelize(compile="model")`` compiles whole
        (the mask sorting before it reads token counts on the host, a graph break inside a compiled region)."""
        B = video_BCTHW.shape[0]
        x_BND = self.encoder(video_BCTHW, visible_BN)
        x_BNE = self.encoder_to_decoder(x_BND)
        pos_BLE = self.decoder_pos_embed.to(dtype=x_BNE.dtype).expand(B, -1, -1)
        x_BSE = torch.cat(
            [
                x_BNE + _gather_tokens(pos_BLE, visible_BN),
                self.mask_token.to(x_BNE.dtype) + _gather_tokens(pos_BLE, decoded_BK),
            ],
            dim=1,
        )
        pred_BKP = self.decoder(x_BSE, decoded_BK.shape[1])
        target_BKP = _gather_tokens(self.target(video_BCTHW), decoded_BK)
        return self.forward_loss(pred_BKP, target_BKP, weight_BK), pred_BKP

    @staticmethod
    def forward_loss(
        pred_BKP: torch.Tensor, target_BKP: torch.Tensor, weight_BK: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean squared error (float32) over all predicted tokens, or over the tokens with ``weight`` 1."""
        if weight_BK is None:
            return F.mse_loss(pred_BKP.float(), target_BKP)
        per_token_BK = (pred_BKP.float() - target_BKP).pow(2).mean(dim=-1)
        weight_BK = weight_BK.to(per_token_BK.dtype)
        return (per_token_BK * weight_BK).sum() / weight_BK.sum()

    def forward_features(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        """Clip embedding ``[B, D]`` for probing: encoder over all tokens, mean-pooled, then layer-normalised
        without affine parameters (what the classifier's freshly initialised ``fc_norm`` computes)."""
        _check_video(self.cfg, video_BCTHW)
        pooled_BD = self.encoder(video_BCTHW).mean(dim=1)
        return F.layer_norm(pooled_BD, (pooled_BD.shape[-1],), eps=LN_EPS)

    def forward_tokens(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        """Encoder output over all ``L`` tokens ``[B, L, D]``, unpooled (order ``(t, h, w)``), for probes
        that pool differently from ``forward_features`` (e.g. :func:`time_pool`)."""
        _check_video(self.cfg, video_BCTHW)
        return self.encoder(video_BCTHW)

    @torch.no_grad()
    def reconstruct(
        self,
        video_BCTHW: torch.Tensor,
        pred_BMP: torch.Tensor,
        mask_BL: torch.Tensor,
        *,
        oracle_stats: bool = False,
    ) -> torch.Tensor:
        """Video ``[B, C, T, H, W]`` in unnormalised pixel units (``[0, 1]`` for RGB, not clamped): visible
        tubelets copied from the input, masked ones from ``pred`` (of every masked token: a forward without
        decoder mask).

        With ``norm_pix_loss`` the prediction is per-tubelet normalised; it is mapped back with the mean of the
        visible tubelets' per-channel means and stds (no ground truth leaks), or, with ``oracle_stats``, with
        each masked tubelet's own true statistics (as the official visualisation script)."""
        _check_video(self.cfg, video_BCTHW)
        B, C = video_BCTHW.shape[:2]
        visible_BN, masked_BM = self._split(mask_BL, B, video_BCTHW.device)
        if pred_BMP.shape != (*masked_BM.shape, self.cfg.patch_dim):
            raise ValueError(
                f"pred must be [B, M, P] = {[*masked_BM.shape, self.cfg.patch_dim]}, got {list(pred_BMP.shape)}"
            )
        x_BLKC = self._tubelets(video_BCTHW)
        pred_BMKC = pred_BMP.float().unflatten(-1, (-1, C))
        if self.cfg.norm_pix_loss:
            mean_BLC = x_BLKC.mean(dim=-2)
            std_BLC = x_BLKC.var(dim=-2, unbiased=True).sqrt() + self.cfg.norm_pix_eps
            if oracle_stats:
                mean_BMC, std_BMC = _gather_tokens(mean_BLC, masked_BM), _gather_tokens(std_BLC, masked_BM)
            else:
                mean_BMC = _gather_tokens(mean_BLC, visible_BN).mean(dim=1, keepdim=True)
                std_BMC = _gather_tokens(std_BLC, visible_BN).mean(dim=1, keepdim=True)
            pred_BMKC = pred_BMKC * std_BMC[:, :, None] + mean_BMC[:, :, None]
        x_BLP = x_BLKC.flatten(-2).scatter(
            1, masked_BM[:, :, None].expand(-1, -1, self.cfg.patch_dim), pred_BMKC.flatten(-2)
        )
        return self.unpatchify(x_BLP)


class VideoMAEClassifier(nn.Module):
    """Finetuning model: the same ``encoder``, pooled, dropout, linear ``head``; ``forward(video) -> logits
    [B, num_classes]``. ``use_mean_pooling`` (official default): no final encoder norm, mean over all tokens,
    ``fc_norm``; with ``classifier_pool="time"`` a mean over space per temporal slice, ``fc_norm`` per slice,
    the ``T'`` slices concatenated (``[B, T' * D]``). Otherwise (official ``--use_cls``): final encoder norm,
    then the first token (no CLS token)."""

    def __init__(
        self, cfg: VideoMAEConfig, num_classes: int, *, head_drop: float = 0.0, init_scale: float = 0.001
    ) -> None:
        super().__init__()
        if not isinstance(cfg, VideoMAEConfig):
            raise ValueError(f"cfg must be a VideoMAEConfig, got {type(cfg).__name__}")
        positive_int("num_classes", num_classes)
        if not 0.0 <= head_drop < 1.0:
            raise ValueError(f"head_drop must be in [0, 1), got {head_drop}")
        self.cfg = cfg
        self.num_classes = num_classes
        self.encoder = VideoMAEEncoder(cfg, final_norm=not cfg.use_mean_pooling)
        self.fc_norm = nn.LayerNorm(cfg.encoder_width, eps=LN_EPS) if cfg.use_mean_pooling else None
        self.head_drop = nn.Dropout(head_drop)
        slices = cfg.grid[0] if cfg.classifier_pool == "time" else 1
        self.head = nn.Linear(cfg.encoder_width * slices, num_classes)
        _init_linear_ln(self, lambda w: nn.init.trunc_normal_(w, std=0.02))
        with torch.no_grad():
            self.head.weight.mul_(init_scale)

    def forward_features(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        """Pooled, normalised clip embedding ``[B, D]`` (``[B, T' * D]`` with ``classifier_pool="time"``)."""
        _check_video(self.cfg, video_BCTHW)
        x_BLD = self.encoder(video_BCTHW)
        if self.fc_norm is None:
            return x_BLD[:, 0]
        if self.cfg.classifier_pool == "time":  # tokens are in (t, h, w) order
            x_BTD = x_BLD.unflatten(1, (self.cfg.grid[0], -1)).mean(dim=2)
            return self.fc_norm(x_BTD).flatten(1)
        return self.fc_norm(x_BLD.mean(dim=1))

    def forward_tokens(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        """Encoder output over all ``L`` tokens ``[B, L, D]`` (final norm only without mean pooling)."""
        _check_video(self.cfg, video_BCTHW)
        return self.encoder(video_BCTHW)

    def forward(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.forward_features(video_BCTHW)))

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """timm's parameter-grouping hook, which ``timm.optim.param_groups_layer_decay`` reads: the tubelet
        embedding is layer 0, encoder block ``i`` layer ``i + 1``; what matches neither (``fc_norm``, ``head``)
        is the last layer, as in BEiT/VideoMAE's layer-wise lr decay."""
        return {"stem": r"^encoder\.patch_embed", "blocks": r"^encoder\.blocks\.(\d+)"}

    def from_pretrained_encoder(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Copy encoder weights from a ``VideoMAE.state_dict()`` (keys ``encoder.*``); returns the keys it
        ignored (decoder; ``encoder.norm`` under mean pooling, where ``fc_norm`` replaces it as in the official
        finetuning). Raises ``ValueError`` naming missing encoder keys or shape mismatches."""
        own = {k: v for k, v in self.state_dict().items() if k.startswith("encoder.")}
        missing = sorted(set(own) - set(state))
        if missing:
            raise ValueError(
                f"pretrained state lacks encoder key(s) {missing[:8]}{'...' if len(missing) > 8 else ''}"
            )
        bad = [
            f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}"
            for k, v in own.items()
            if state[k].shape != v.shape
        ]
        if bad:
            raise ValueError(f"pretrained encoder shapes do not match this config: {bad[:8]}")
        self.load_state_dict({k: state[k] for k in own}, strict=False)
        return sorted(set(state) - set(own))
