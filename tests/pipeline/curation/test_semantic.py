"""Semantic duplicates and clusters on planted embeddings, checked against brute-force computations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.curation.semantic import (
    SemanticConfig,
    components,
    domain_clusters,
    duplicate_groups,
    kmeans,
    pair_agreement,
    purity,
    semantic_columns,
    silhouette,
    unit_vectors,
)


def planted(n_domains: int = 4, per_domain: int = 30, dups: int = 10, d: int = 32, seed: int = 0):
    """Embeddings of ``n_domains`` well-separated domains (a shared offset, as encoder features have) plus
    ``dups`` near-copies of random clips. Returns (vectors, domain labels, true duplicate groups)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_domains, d)) * 3
    domain = np.repeat(np.arange(n_domains), per_domain)
    x = centres[domain] + rng.normal(size=(len(domain), d)) + 10.0  # common offset: centring must remove it
    src = rng.choice(len(x), dups, replace=False)
    copies = x[src] + rng.normal(scale=0.02, size=(dups, d))
    truth = np.concatenate([np.arange(len(x)), src])  # a copy belongs to its source's group
    return np.concatenate([x, copies]), np.concatenate([domain, domain[src]]), truth


def _brute_groups(u: np.ndarray, threshold: float) -> np.ndarray:
    """Reference: every pair by a Python loop, components by repeated relabelling to the minimum."""
    label = np.arange(len(u))
    edges = [(i, j) for i, j in itertools.combinations(range(len(u)), 2) if float(u[i] @ u[j]) >= threshold]
    changed = True
    while changed:
        changed = False
        for i, j in edges:
            m = min(label[i], label[j])
            if label[i] != m or label[j] != m:
                label[i] = label[j] = m
                changed = True
    return label


def test_exact_duplicates_match_brute_force_and_the_plant():
    x, _, truth = planted()
    cfg = SemanticConfig(dup_threshold=0.98)
    u = unit_vectors(x)
    groups = duplicate_groups(u, cfg)
    assert (groups == _brute_groups(u, 0.98)).all()
    score = pair_agreement(groups, truth)
    assert score == {"recall": 1.0, "false_merges": 0, "true_pairs": 10}
    raw = duplicate_groups(unit_vectors(x, center=False), cfg)  # without centring the offset merges all
    assert pair_agreement(raw, truth)["false_merges"] > 100


def test_approximate_search_agrees_with_exact():
    x, _, truth = planted(n_domains=6, per_domain=80, dups=40, seed=1)
    u = unit_vectors(x)
    exact = duplicate_groups(u, SemanticConfig())
    approx = duplicate_groups(u, SemanticConfig(exact_max=100, cell_size=60, probe=2))
    assert (approx == exact).all() and pair_agreement(approx, truth)["recall"] == 1.0


def test_kmeans_recovers_planted_domains_and_silhouette_picks_k():
    x, domain, _ = planted(seed=2)
    u = unit_vectors(x)
    labels, centres = kmeans(u, 4, seed=0)
    assert purity(labels, domain) == 1.0 and np.allclose(np.linalg.norm(centres, axis=1), 1, atol=1e-5)
    clusters, info = domain_clusters(u, SemanticConfig(k_min=2, k_max=8))
    assert info["k"] == 4 and purity(clusters, domain) == 1.0
    assert info["silhouette"] == pytest.approx(max(info["silhouette_by_k"].values()), abs=1e-4)


def test_silhouette_matches_a_direct_computation():
    rng = np.random.default_rng(3)
    u = unit_vectors(rng.normal(size=(25, 5)))
    labels = rng.integers(0, 3, 25)
    labels[0] = 4  # a singleton cluster scores 0
    ref = []
    for i in range(25):
        dist = [1 - float(u[i] @ u[j]) for j in range(25)]
        own = [dist[j] for j in range(25) if labels[j] == labels[i] and j != i]
        if not own:
            ref.append(0.0)
            continue
        a = np.mean(own)
        b = min(np.mean([dist[j] for j in range(25) if labels[j] == c]) for c in set(labels) - {labels[i]})
        ref.append((b - a) / max(a, b))
    assert silhouette(u, labels) == pytest.approx(np.mean(ref), abs=1e-5)


def test_semantic_columns_and_scores():
    x, domain, truth = planted(seed=4)
    cols, info = semantic_columns(x, SemanticConfig(clusters=4))
    assert set(cols) == {"sem_group", "sem_group_size", "cluster"}
    assert info["k"] == 4 and sorted(info["cluster_sizes"].values()) == sorted(
        np.bincount(cols["cluster"]).tolist()
    )
    assert info["sem_dup_groups"] == 10 and info["sem_removable"] == 10
    assert (cols["sem_group_size"][len(domain) - 10 :] == 2).all()
    assert components(4, np.array([3, 1]), np.array([2, 3])).tolist() == [0, 1, 1, 1]
    assert pair_agreement(np.array([0, 0, 0]), np.array([0, 0, 1])) == {
        "recall": 1.0,
        "false_merges": 2,
        "true_pairs": 1,
    }
    assert purity(np.array([0, 0, 1, 1]), np.array([5, 6, 7, 7])) == 0.75


def test_bad_input():
    with pytest.raises(ValueError, match=r"finite \[N, D\]"):
        unit_vectors(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="dup_threshold"):
        SemanticConfig(dup_threshold=2)
    with pytest.raises(ValueError, match="1 <= k"):
        kmeans(unit_vectors(np.eye(3)), 4)
