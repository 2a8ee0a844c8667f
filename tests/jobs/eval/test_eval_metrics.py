import math

import numpy as np
import pytest
import torch

from jobs.eval.metrics import ProbeConfig, aggregate_views, knn_predict, linear_probe, topk_accuracy


def test_topk_against_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 7, generator=g)
    labels = torch.randint(0, 7, (50,), generator=g)
    got = topk_accuracy(logits, labels, ks=(1, 3, 10))
    for k in (1, 3, 10):
        order = np.argsort(-logits.numpy(), axis=1)[:, : min(k, 7)]
        expect = np.mean([labels[i].item() in order[i] for i in range(50)])
        assert got[f"top{k}"] == pytest.approx(expect)


def test_aggregate_views_mean_softmax_independent():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, 5.0], [1.0, 3.0]])
    ids = ["b", "a", "b", "a"]
    vids, probs = aggregate_views(logits, ids)
    assert vids == ["a", "b"]

    def sm(row):
        e = [math.exp(v) for v in row]
        return [v / sum(e) for v in e]

    expect_a = [(x + y) / 2 for x, y in zip(sm([0.0, 1.0]), sm([1.0, 3.0]), strict=True)]
    expect_b = [(x + y) / 2 for x, y in zip(sm([2.0, 0.0]), sm([5.0, 5.0]), strict=True)]
    assert probs[0].tolist() == pytest.approx(expect_a)
    assert probs[1].tolist() == pytest.approx(expect_b)
    with pytest.raises(ValueError, match="video ids"):
        aggregate_views(logits, ["a"])


def test_knn_brute_force():
    g = torch.Generator().manual_seed(1)
    train = torch.randn(30, 5, generator=g)
    labels = torch.randint(0, 3, (30,), generator=g)
    test = torch.randn(8, 5, generator=g)
    scores = knn_predict(train, labels, test, num_classes=3, k=4, temperature=0.5, chunk=3)
    tn = train / train.norm(dim=1, keepdim=True)
    for i in range(8):
        q = test[i] / test[i].norm()
        sims = [(float(q @ tn[j]), j) for j in range(30)]
        sims.sort(reverse=True)
        expect = [0.0, 0.0, 0.0]
        for s, j in sims[:4]:
            expect[int(labels[j])] += math.exp(s / 0.5)
        assert scores[i].tolist() == pytest.approx(expect, rel=1e-5)


def test_linear_probe_separates_and_is_deterministic():
    g = torch.Generator().manual_seed(2)
    centers = torch.randn(4, 16, generator=g) * 3
    labels = torch.arange(4).repeat(25)
    feats = centers[labels] + torch.randn(100, 16, generator=g)
    test_labels = torch.arange(4).repeat(10)
    test = centers[test_labels] + torch.randn(40, 16, generator=g)
    cfg = ProbeConfig(epochs=100)
    logits = linear_probe(feats, labels, test, num_classes=4, cfg=cfg)
    assert topk_accuracy(logits, test_labels, ks=(1,))["top1"] > 0.9
    assert torch.equal(logits, linear_probe(feats, labels, test, num_classes=4, cfg=cfg))
    with pytest.raises(ValueError, match="epochs"):
        ProbeConfig(epochs=0)
