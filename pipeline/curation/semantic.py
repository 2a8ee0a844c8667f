"""Semantic near-duplicates and domain clusters from clip embeddings (``embeddings.parquet``), Ray-free.

Why embeddings as well as the perceptual hash: a pHash sees pixels, so it misses copies that were cropped,
recoloured, re-timed or re-shot, and it says nothing about *what* a clip shows. An encoder's embedding puts
clips that look alike to the model next to each other, which is what matters for the data a model trains
on: near-duplicates waste steps, and a domain that dominates the set dominates what is learned.

* Near-duplicates: two clips whose (centred, unit-length) embeddings have cosine similarity >=
  ``dup_threshold``; groups are the connected components. Exact over all pairs up to ``exact_max`` clips
  (blocked matrix products, ~N^2 D / 2 multiply-adds); above that, pairs are only compared inside k-means
  cells, each clip placed in its ``probe`` nearest cells (an inverted-file search, as faiss' IVF does),
  so a pair is missed only when its two clips share none of those cells.
* Domain clusters: spherical k-means (k-means++ seeding, cosine), ``k`` given or chosen by the best mean
  silhouette (cosine distance, on a seeded sample) over ``k_min..k_max``.

Centring (subtracting the set's mean vector) matters: mean-pooled, layer-normalised encoder features share
a large common component, so raw cosines of unrelated clips sit near 1 and no threshold separates them.

Shapes: ``N`` clips, ``D`` embedding width, ``k`` clusters. Group/cluster ids are int64; a group's id is its
smallest row index (the convention of ``dup_group`` in ``curation.parquet``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class SemanticConfig:
    """Thresholds and sizes of the duplicate search and the clustering."""

    dup_threshold: float = 0.98  # cosine (centred embeddings) at/above which two clips are near-duplicates
    center: bool = True  # subtract the set's mean embedding before cosines (see the module docstring)
    exact_max: int = 20000  # up to this many clips every pair is compared; above, only pairs sharing a cell
    cell_size: int = 1000  # clips per k-means cell of the approximate search (about)
    probe: int = 2  # cells each clip is placed in for the approximate search
    clusters: int = 0  # domain clusters k; 0: choose k in [k_min, k_max] by silhouette
    k_min: int = 2
    k_max: int = 10
    kmeans_iters: int = 50
    kmeans_restarts: int = 3  # best of this many seeded k-means runs (lowest inertia)
    silhouette_sample: int = 2000  # clips the silhouette is computed on (seeded sample; all when fewer)
    seed: int = 0

    def __post_init__(self) -> None:
        if not -1.0 <= self.dup_threshold <= 1.0:
            raise ValueError(f"semantic.dup_threshold must be a cosine in [-1, 1], got {self.dup_threshold}")
        if self.clusters < 0 or not 2 <= self.k_min <= self.k_max:
            raise ValueError(
                f"semantic.clusters must be >= 0 and 2 <= k_min <= k_max, got {self.clusters}, {self.k_min}, {self.k_max}"
            )
        for name in (
            "exact_max",
            "cell_size",
            "probe",
            "kmeans_iters",
            "kmeans_restarts",
            "silhouette_sample",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"semantic.{name} must be >= 1, got {getattr(self, name)}")


def unit_vectors(x_ND: np.ndarray, *, center: bool = True) -> np.ndarray:
    """float32 ``[N, D]``: optionally centred on the set's mean, then scaled to unit length (zero rows stay 0)."""
    x = np.asarray(x_ND, np.float32)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ValueError(f"embeddings must be a finite [N, D] array, got shape {x.shape}")
    if center and len(x):
        x = x - x.mean(axis=0, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected components of the graph on ``n`` nodes with edges ``(i[e], j[e])``: ``[N]`` int64, each node's
    component id = its smallest member (union-find, path halving)."""
    parent = np.arange(n)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(np.asarray(i).tolist(), np.asarray(j).tolist(), strict=True):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(x) for x in range(n)], np.int64)


def _pairs_above(u_ND: np.ndarray, rows: np.ndarray, threshold: float, block: int = 1024):
    """Edges ``(i, j)``, ``i < j`` among ``rows`` (indices into ``u``) with cosine >= ``threshold``."""
    sub = u_ND[rows]
    out_i, out_j = [], []
    for a in range(0, len(rows), block):
        sims = sub[a : a + block] @ sub.T  # [b, n]
        bi, bj = np.nonzero(sims >= threshold)
        keep = bj > bi + a
        out_i.append(rows[bi[keep] + a])
        out_j.append(rows[bj[keep]])
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_i), np.concatenate(out_j)


def duplicate_groups(u_ND: np.ndarray, cfg: SemanticConfig) -> np.ndarray:
    """Near-duplicate group of every clip ``[N]`` from unit vectors (see the module docstring)."""
    n = len(u_ND)
    if n <= cfg.exact_max:
        i, j = _pairs_above(u_ND, np.arange(n), cfg.dup_threshold)
        return components(n, i, j)
    cells = max(2, math.ceil(n / cfg.cell_size))
    rng = np.random.default_rng(cfg.seed)
    fit = rng.choice(n, min(n, 64 * cells), replace=False)  # cells are fitted on a sample, as IVF training is
    _, centers = kmeans(u_ND[fit], cells, seed=cfg.seed, iters=10, restarts=1)
    nearest = np.argsort(-(u_ND @ centers.T), axis=1)[:, : min(cfg.probe, cells)]  # [N, probe]
    edges_i, edges_j = [], []
    for c in range(cells):
        rows = np.nonzero((nearest == c).any(axis=1))[0]
        i, j = _pairs_above(u_ND, rows, cfg.dup_threshold)
        edges_i.append(i)
        edges_j.append(j)
    return components(n, np.concatenate(edges_i), np.concatenate(edges_j))


def kmeans(
    u_ND: np.ndarray, k: int, *, seed: int = 0, iters: int = 50, restarts: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means on unit vectors: ``(labels [N] int64, centres [k, D] unit)``, the run of lowest
    inertia (sum of ``1 - cos`` to the assigned centre) among ``restarts`` seeded k-means++ starts."""
    n = len(u_ND)
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of clips ({n}), got k={k}")
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for r in range(restarts):
        rng = np.random.default_rng((seed, r))
        centers = [u_ND[rng.integers(n)]]
        dist = 1.0 - u_ND @ centers[0]
        for _ in range(k - 1):  # k-means++: next centre drawn with probability ~ squared distance
            p = np.maximum(dist, 0) ** 2
            idx = rng.choice(n, p=p / p.sum()) if p.sum() > 0 else rng.integers(n)
            centers.append(u_ND[idx])
            dist = np.minimum(dist, 1.0 - u_ND @ u_ND[idx])
        c_kD = np.stack(centers)
        labels = np.full(n, -1)
        for _ in range(iters):
            new = np.argmax(u_ND @ c_kD.T, axis=1)
            if (new == labels).all():
                break
            labels = new
            for c in range(k):
                members = u_ND[labels == c]
                if len(members):  # an emptied cluster keeps its centre
                    m = members.sum(axis=0)
                    c_kD[c] = m / max(float(np.linalg.norm(m)), 1e-12)
        inertia = float((1.0 - (u_ND * c_kD[labels]).sum(axis=1)).sum())
        if best is None or inertia < best[0]:
            best = (inertia, labels.astype(np.int64), c_kD)
    assert best is not None
    return best[1], best[2]


def silhouette(u_ND: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette with cosine distance ``1 - cos``: per clip ``(b - a) / max(a, b)``, ``a`` the mean
    distance to its own cluster, ``b`` to the nearest other one; 0 for clips alone in their cluster."""
    labels = np.asarray(labels)
    ids = np.unique(labels)
    if len(ids) < 2:
        return 0.0
    d_NN = 1.0 - u_ND @ u_ND.T
    member_NK = labels[:, None] == ids[None, :]
    sums = d_NN @ member_NK  # [N, K]: summed distance to each cluster
    counts = member_NK.sum(axis=0).astype(np.float64)
    own = member_NK.argmax(axis=1)
    own_count = counts[own]
    a = sums[np.arange(len(labels)), own] / np.maximum(own_count - 1, 1)
    other = sums / counts[None, :]
    other[np.arange(len(labels)), own] = np.inf
    b = other.min(axis=1)
    s = np.where(own_count > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-12), 0.0)
    return float(s.mean())


def domain_clusters(u_ND: np.ndarray, cfg: SemanticConfig) -> tuple[np.ndarray, dict]:
    """``(cluster [N] int64, info)``: k-means with ``cfg.clusters``, or the k of best silhouette (``info``
    holds the chosen ``k`` and ``silhouette_by_k``). Fewer clips than ``k_min``: one cluster."""
    n = len(u_ND)
    rng = np.random.default_rng(cfg.seed)
    sample = (
        rng.choice(n, cfg.silhouette_sample, replace=False) if n > cfg.silhouette_sample else np.arange(n)
    )
    if cfg.clusters:
        labels, _ = kmeans(
            u_ND, min(cfg.clusters, n), seed=cfg.seed, iters=cfg.kmeans_iters, restarts=cfg.kmeans_restarts
        )
        return labels, {
            "k": int(len(np.unique(labels))),
            "silhouette": silhouette(u_ND[sample], labels[sample]),
        }
    if n <= cfg.k_min:
        return np.zeros(n, np.int64), {"k": 1, "silhouette_by_k": {}}
    scores, runs = {}, {}
    for k in range(cfg.k_min, min(cfg.k_max, n - 1) + 1):
        labels, _ = kmeans(u_ND, k, seed=cfg.seed, iters=cfg.kmeans_iters, restarts=cfg.kmeans_restarts)
        runs[k], scores[k] = labels, silhouette(u_ND[sample], labels[sample])
    k = max(scores, key=lambda q: (round(scores[q], 6), -q))  # ties: the smaller k
    return runs[k], {
        "k": k,
        "silhouette": scores[k],
        "silhouette_by_k": {str(q): round(v, 4) for q, v in scores.items()},
    }


def semantic_columns(vectors_ND: np.ndarray, cfg: SemanticConfig) -> tuple[dict[str, np.ndarray], dict]:
    """The curation columns of a set of embeddings: ``sem_group``, ``sem_group_size``, ``cluster``
    (int64 ``[N]``) and a summary (cluster sizes, chosen k, duplicate counts)."""
    u = unit_vectors(vectors_ND, center=cfg.center)
    groups = duplicate_groups(u, cfg)
    clusters, info = domain_clusters(u, cfg) if len(u) else (np.zeros(0, np.int64), {"k": 0})
    sizes = np.bincount(groups, minlength=len(groups))[groups] if len(groups) else groups
    info |= {
        "cluster_sizes": {
            str(c): int(s) for c, s in zip(*np.unique(clusters, return_counts=True), strict=True)
        },
        "sem_dup_groups": int((np.bincount(groups) > 1).sum()) if len(groups) else 0,
        "sem_removable": int(len(groups) - len(np.unique(groups))),
    }
    return {"sem_group": groups, "sem_group_size": sizes, "cluster": clusters}, info


def pair_agreement(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """How predicted groups match true groups, counted over pairs of clips: ``recall`` (true same-group
    pairs found together), ``false_merges`` (pairs put together that are not truly together) and
    ``true_pairs``. Ids are any per-clip labels; equal label = same group."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    same_p = pred[:, None] == pred[None, :]
    same_t = truth[:, None] == truth[None, :]
    upper = np.triu(np.ones_like(same_p), k=1)
    tp = int((same_p & same_t & upper).sum())
    true_pairs = int((same_t & upper).sum())
    return {
        "recall": tp / true_pairs if true_pairs else 1.0,
        "false_merges": int((same_p & ~same_t & upper).sum()),
        "true_pairs": true_pairs,
    }


def purity(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of clips whose cluster's most common true label is their own (1.0: every cluster pure)."""
    clusters, labels = np.asarray(clusters), np.asarray(labels)
    if not len(clusters):
        return 1.0
    hits = 0
    for c in np.unique(clusters):
        _, counts = np.unique(labels[clusters == c], return_counts=True)
        hits += int(counts.max())
    return hits / len(clusters)


__all__ = [
    "SemanticConfig",
    "components",
    "domain_clusters",
    "duplicate_groups",
    "kmeans",
    "pair_agreement",
    "purity",
    "semantic_columns",
    "silhouette",
    "unit_vectors",
]
