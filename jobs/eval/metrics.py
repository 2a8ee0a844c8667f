"""Evaluation maths, free of Ray and I/O: top-k accuracy, multi-view aggregation, kNN and linear probes.

Shapes: ``N`` samples (videos), ``V`` views per video, ``C`` classes, ``D`` feature width.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


def topk_accuracy(
    logits_NC: torch.Tensor, labels_N: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """Fraction of samples whose label is among the top-k scores; k is capped at C."""
    if logits_NC.ndim != 2 or labels_N.shape != (logits_NC.shape[0],):
        raise ValueError(
            f"expected logits [N, C] and labels [N], got {tuple(logits_NC.shape)} and {tuple(labels_N.shape)}"
        )
    n, c = logits_NC.shape
    out = {}
    for k in ks:
        kk = min(k, c)
        top = logits_NC.topk(kk, dim=1).indices
        out[f"top{k}"] = (top == labels_N[:, None]).any(dim=1).float().mean().item() if n else float("nan")
    return out


def aggregate_views(
    logits: torch.Tensor, video_ids: list[str] | tuple[str, ...]
) -> tuple[list[str], torch.Tensor]:
    """Multi-view testing: average the softmax probabilities of every view of a video (as the official
    VideoMAE ``merge``). ``logits``: [M, C] for M views in any order; ``video_ids``: the video of each row.
    Returns (sorted video ids, probs [N, C])."""
    if len(video_ids) != logits.shape[0]:
        raise ValueError(f"{len(video_ids)} video ids for {logits.shape[0]} rows of logits")
    ids = sorted(set(video_ids))
    pos = {v: i for i, v in enumerate(ids)}
    index = torch.tensor([pos[v] for v in video_ids], dtype=torch.long)
    probs = logits.float().softmax(dim=1)
    sums = torch.zeros(len(ids), logits.shape[1]).index_add_(0, index, probs)
    counts = torch.zeros(len(ids)).index_add_(0, index, torch.ones(len(video_ids)))
    return ids, sums / counts[:, None]


def knn_predict(
    train_feats_ND: torch.Tensor,
    train_labels_N: torch.Tensor,
    test_feats_MD: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted kNN on cosine similarity (the DINO/InstDisc protocol). Returns class scores [M, C]."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, train_feats_ND.shape[0])
    train = F.normalize(train_feats_ND.float(), dim=1)
    test = F.normalize(test_feats_MD.float(), dim=1)
    scores = []
    for start in range(0, test.shape[0], chunk):
        sim = test[start : start + chunk] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        onehot = F.one_hot(train_labels_N[top_idx], num_classes).float()
        scores.append((weights[..., None] * onehot).sum(dim=1))
    return torch.cat(scores) if scores else torch.zeros(0, num_classes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """Linear probe on frozen features: standardised inputs, full-batch AdamW, fixed epochs (deterministic)."""

    epochs: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"probe.epochs must be >= 1, got {self.epochs}")
        if self.lr <= 0:
            raise ValueError(f"probe.lr must be > 0, got {self.lr}")


def linear_probe(
    train_feats_ND: torch.Tensor,
    train_labels_N: torch.Tensor,
    test_feats_MD: torch.Tensor,
    *,
    num_classes: int,
    cfg: ProbeConfig = ProbeConfig(),
) -> torch.Tensor:
    """Fit a softmax classifier on frozen features; return test logits [M, C]."""
    if train_feats_ND.shape[0] != train_labels_N.shape[0]:
        raise ValueError("train features and labels differ in length")
    mean = train_feats_ND.float().mean(0, keepdim=True)
    std = train_feats_ND.float().std(0, keepdim=True).clamp_min(1e-6)
    x = (train_feats_ND.float() - mean) / std
    gen = torch.Generator().manual_seed(cfg.seed)
    layer = torch.nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.01)
        layer.bias.zero_()
    opt = torch.optim.AdamW(layer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in range(cfg.epochs):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(layer(x), train_labels_N).backward()
        opt.step()
    with torch.no_grad():
        return layer((test_feats_MD.float() - mean) / std)
