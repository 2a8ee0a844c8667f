"""Why the model-curated subset is what it is: its semantic near-duplicate groups, re-derived from the study's
own embeddings at several cosine thresholds with the project's own functions, against the synthetic set's
ground truth (labels.csv: each clip's planted defect and the original of each planted copy).

    PYTHONPATH=. .venv/bin/python docs/studies/model_curation/dedup_diagnostic.py studies/_cpu_shared

Writes dedup_diagnostic.json beside this file. Ground truth is read here only; no subset rule sees it.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline.curation.semantic import SemanticConfig, duplicate_groups, unit_vectors
from pipeline.curation.subset import SubsetRule, select

DEFECTS = ("black", "dark", "static", "blur", "duplicate", "near_duplicate")


def one(pattern: str) -> str:
    hits = glob.glob(pattern)
    if len(hits) != 1:
        raise SystemExit(f"expected one match for {pattern!r}, found {len(hits)}")
    return hits[0]


def main(cache: str) -> dict:
    data = os.path.join(cache, "data")
    raw = one(os.path.join(data, "raw-*"))
    shards = one(os.path.join(data, "shards-*"))
    labels = pd.read_csv(os.path.join(raw, "labels.csv")).fillna("")
    index = pq.read_table(os.path.join(shards, "index.parquet")).to_pandas()
    key_of = {os.path.relpath(s, raw): k for k, s in zip(index["key"], index["source"], strict=True)}
    defect = {key_of[p]: (d or "clean") for p, d in zip(labels["path"], labels["defect"], strict=True)}
    curation = pq.read_table(one(os.path.join(shards, "curation-*.parquet"))).to_pandas()
    emb = pq.read_table(one(os.path.join(shards, "embed", "embeddings-*", "embeddings.parquet"))).to_pandas()
    pool = set(pq.read_table(one(os.path.join(shards, "subsets", "all-*.parquet"))).column("key").to_pylist())
    held_out = frozenset(set(curation["key"]) - pool)  # the labelled target clips, never pretrained on
    study_subset = pq.read_table(one(os.path.join(shards, "subsets", "model_curated-*.parquet")))
    vectors = np.stack(emb["vector"].to_numpy())

    u = unit_vectors(vectors).astype(np.float64)  # centred, unit length: what the dedup compares
    row = {k: i for i, k in enumerate(emb["key"])}
    copies = {}
    for kind in ("duplicate", "near_duplicate"):
        sel = labels[labels["defect"] == kind]
        sims = np.array([u[row[key_of[a]]] @ u[row[key_of[b]]] for a, b in zip(sel["path"], sel["duplicate_of"],
                         strict=True) if key_of.get(a) in row and key_of.get(b) in row])  # fmt: skip
        copies[kind] = {"pairs": len(sims), "cos_p5": round(float(np.percentile(sims, 5)), 4),
                        "cos_median": round(float(np.median(sims)), 4)}  # fmt: skip
    clean = np.array([defect[k] == "clean" for k in emb["key"]])
    s = u[clean] @ u[clean].T
    np.fill_diagonal(s, -1.0)
    nearest = s.max(axis=1)  # each clean clip's most similar *other* clean clip (no planted copy among them)

    out = {"pool": {"clips": len(pool), **collections.Counter(defect[k] for k in pool)}, "copies": copies,
           "clean_nearest_other_clean_cos_median": round(float(np.median(nearest)), 4), "thresholds": {}}  # fmt: skip
    for thr in (0.98, 0.99, 0.995, 0.999):
        groups = duplicate_groups(
            u.astype(np.float32), SemanticConfig(dup_threshold=thr)
        )  # as `vmae embed` does
        table = curation.merge(emb[["key", "recon_loss"]].assign(sem_group=groups), on="key")
        rows = {"clean_with_a_neighbour_at_or_above": round(float((nearest >= thr).mean()), 3),
                "largest_group": int(np.bincount(groups).max())}  # fmt: skip
        for name, rule in (("semantic_dedup", SubsetRule(name="s", semantic_dedup=True)),
                           ("model_curated", SubsetRule(name="m", semantic_dedup=True, min_recon_pct=25))):  # fmt: skip
            keys = select(table, rule, held_out)
            kept = collections.Counter(defect[k] for k in keys)
            rows[name] = {"clips": len(keys), "clean": kept["clean"], **{d: kept[d] for d in DEFECTS}}
            if thr == 0.98 and name == "model_curated":  # the study's threshold: must be the study's subset
                rows[name]["equals_the_study_subset"] = sorted(keys) == sorted(
                    study_subset.column("key").to_pylist()
                )
        out["thresholds"][str(thr)] = rows
    return out


if __name__ == "__main__":
    result = main(sys.argv[1] if len(sys.argv) > 1 else "studies/_cpu_shared")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dedup_diagnostic.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
