"""The curation report (``vmae curate --report``): one Markdown page to look at before training on a subset.

Why: every filter of a subset rule is a threshold on a number; a person should see what the numbers mean
on this data before trusting them. The page shows a histogram of every metric of ``curation.parquet``
(and of ``embeddings.parquet`` when it lies beside it), the size of every embedding cluster with a strip of
its clips, and for each metric a strip of the clips it ranks worst (lowest quality, least motion, most
black, easiest and hardest to reconstruct, ...), each thumbnail captioned with its key and value.

Layout (next to the curation table): ``report/report.md``, ``report/histograms.png``,
``report/cluster_{c}.png``, ``report/worst_{metric}_{low|high}.png``. Thumbnails are the middle frame of
each clip, read from the shards named in the curation table (a few hundred clips at most, Ray-free).
"""

from __future__ import annotations

import io
import json
import math
import re

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry

from pipeline import storage
from pipeline.curation.quality import read_frames
from pipeline.ingest import manifest
from pipeline.loader.decode import iter_shard

REPORT_DIR = "report"
METRICS = (  # curation.parquet, then embeddings.parquet columns; (column, caption)
    ("quality_score", "combined quality score (0..1)"), ("motion", "mean abs. luma change between sampled frames (levels)"),
    ("moving_fraction", "fraction of moving pixels"), ("sharpness", "variance of Laplacian (levels^2)"),
    ("exposure", "mean luma / 255"), ("black_fraction", "fraction of black frames"),
    ("dup_group_size", "pHash near-duplicate group size"), ("duration", "clip length (s)"),
    ("recon_loss", "reconstruction loss (learnability)"), ("recon_baseline", "mean-predictor loss"),
    ("sem_group_size", "semantic near-duplicate group size"),
)  # fmt: skip
WORST = (  # (column, which end is worst)
    ("quality_score", "low"), ("motion", "low"), ("sharpness", "low"), ("exposure", "low"),
    ("black_fraction", "high"), ("dup_group_size", "high"), ("sem_group_size", "high"),
    ("recon_loss", "low"), ("recon_loss", "high"),
)  # fmt: skip


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def histograms(df: pd.DataFrame, columns: list[tuple[str, str]]) -> bytes:
    """One PNG with a histogram per metric (decodable clips only; NaN left out)."""
    cols = 3
    rows = max(1, math.ceil(len(columns) / cols))
    fig = Figure(figsize=(4 * cols, 2.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (name, caption) in zip(axes.flat, columns, strict=False):
        values = pd.to_numeric(df[name], errors="coerce").dropna().to_numpy(float)
        ax.hist(values, bins=min(30, max(5, len(values) // 3)), color="#4477aa")
        ax.set_title(f"{name}\n{caption}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(columns) :]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def strip(thumbs: list[tuple[str, np.ndarray]], title: str) -> bytes:
    """A row of captioned thumbnails ``(caption, frame [H, W, 3] uint8)``."""
    n = max(1, len(thumbs))
    fig = Figure(figsize=(1.6 * n, 2.0))
    axes = fig.subplots(1, n, squeeze=False)
    for ax, (caption, frame) in zip(axes[0], thumbs, strict=False):
        ax.imshow(frame)
        ax.set_title(caption, fontsize=6)
    for ax in axes[0]:
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    return _png(fig)


def middle_frames(manifest_url: str, where: dict[str, str]) -> dict[str, np.ndarray]:
    """key -> middle frame of the clip, for keys ``where`` maps to their shard name (each shard read once)."""
    m = manifest.read_manifest(manifest_url)
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(where.values())):
        want = {k for k, s in where.items() if s == shard}
        for sample in iter_shard(m.shard_url(shard), want=want.__contains__, on_error=lambda _: None):
            if sample["__key__"] in want and "mp4" in sample:
                try:
                    frames, _, _ = read_frames(sample["mp4"], 3, key=sample["__key__"])
                except ValueError:
                    continue
                out[sample["__key__"]] = frames[len(frames) // 2]
    return out


def load_tables(curation_url: str, embeddings_url: str | None = None) -> tuple[pd.DataFrame, dict]:
    """The curation table joined with ``embeddings.parquet`` (if present beside it), and its metadata."""
    table = manifest.read_table(curation_url)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    df = table.to_pandas()
    base = curation_url.rsplit("/", 1)[0] if "/" in curation_url else "."
    embeddings_url = embeddings_url or storage.join(base, "embeddings.parquet")
    if storage.exists(embeddings_url):
        emb = manifest.read_table(embeddings_url).to_pandas().drop(columns=["shard", "vector", "error"])
        df = df.merge(emb, on="key", how="left")
        meta["embeddings"] = embeddings_url
    return df, meta


def _caption(key: str) -> str:
    """A thumbnail's caption: the key without its 8-hex source hash, in lines of 16 characters."""
    short = re.sub(r"-[0-9a-f]{8}(?=_c\d{3}$|$)", "", key)
    return "\n".join(short[i : i + 16] for i in range(0, min(len(short), 48), 16))


def write_report(curation_url: str, *, embeddings_url: str | None = None, per_strip: int = 8) -> str:
    """Write the report beside ``curation_url``; returns the URL of ``report.md``."""
    if per_strip < 1:
        raise ValueError(f"per_strip must be >= 1, got {per_strip}")
    df, meta = load_tables(curation_url, embeddings_url)
    if "source_manifest" not in meta:
        raise ValueError(
            f"{curation_url!r} has no source_manifest in its metadata; is it a vmae curation.parquet?"
        )
    base = curation_url.rsplit("/", 1)[0] if "/" in curation_url else "."
    out = storage.join(base, REPORT_DIR)
    ok = df[df["error"].fillna("") == ""]
    columns = [(c, cap) for c, cap in METRICS if c in ok.columns and ok[c].notna().any()]
    storage.write_bytes_atomic(storage.join(out, "histograms.png"), histograms(ok, columns))

    strips: list[tuple[str, str, pd.DataFrame, str | None]] = []  # (file, title, rows, value column)
    if "cluster" in ok.columns and (ok["cluster"] >= 0).any():
        for c, rows in ok[ok["cluster"] >= 0].groupby("cluster"):
            strips.append(
                (f"cluster_{int(c)}.png", f"cluster {int(c)} ({len(rows)} clips)", rows.head(per_strip), None)
            )
    for col, end in WORST:
        if col in ok.columns and ok[col].notna().any():
            rows = (
                ok.dropna(subset=[col])
                .sort_values([col, "key"], ascending=[end == "low", True])
                .head(per_strip)
            )
            strips.append((f"worst_{col}_{end}.png", f"{end}est {col}", rows, col))
    wanted = {k: s for _, _, rows, _ in strips for k, s in zip(rows["key"], rows["shard"], strict=True)}
    frames = middle_frames(meta["source_manifest"], wanted)
    for name, title, rows, col in strips:
        thumbs = [
            (_caption(k) + (f"\n{v:.3g}" if col else ""), frames[k])
            for k, v in zip(rows["key"], rows[col] if col else rows["key"], strict=True)
            if k in frames
        ]
        storage.write_bytes_atomic(storage.join(out, name), strip(thumbs, title))

    summary = json.loads(meta.get("summary", "{}"))
    lines = [
        "# Curation report", "",
        f"Shard set: `{meta['source_manifest']}`; curation: `{curation_url}`"
        + (f"; embeddings: `{meta['embeddings']}`" if "embeddings" in meta else "") + ".", "",
        f"{len(df)} clips, {len(df) - len(ok)} undecodable; static {summary.get('static', '?')}, dark "
        f"{summary.get('dark', '?')}, with black frames {summary.get('with_black_frames', '?')}, removable pHash "
        f"duplicates {summary.get('removable_duplicates', '?')}.", "",
        "## Metrics", "", "| metric | meaning | min | median | max |", "| --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for c, cap in columns:
        v = pd.to_numeric(ok[c], errors="coerce").dropna()
        lines.append(f"| `{c}` | {cap} | {v.min():.4g} | {v.median():.4g} | {v.max():.4g} |")
    lines += ["", "![histograms](histograms.png)", ""]
    if "cluster" in ok.columns and (ok["cluster"] >= 0).any():
        sizes = ok[ok["cluster"] >= 0].groupby("cluster").size()
        lines += ["## Embedding clusters", "", "| cluster | clips | domains |", "| --- | --- | --- |"]
        for c, n in sizes.items():
            doms = ok[ok["cluster"] == c]["domain"].value_counts().to_dict() if "domain" in ok.columns else {}
            lines.append(f"| {int(c)} | {int(n)} | {', '.join(f'{d}: {k}' for d, k in doms.items())} |")
        lines.append("")
        lines += [f"![cluster {int(c)}](cluster_{int(c)}.png)" for c in sizes.index] + [""]
    lines += ["## Worst clips by metric", ""]
    lines += [f"### {title}\n\n![{title}]({name})\n" for name, title, _, col in strips if col]
    url = storage.join(out, "report.md")
    storage.write_bytes_atomic(url, "\n".join(lines).encode())
    return url
