"""A study's report: ``results.parquet`` (one row per cell), ``results.md`` (a Markdown table) and PNG plots.

Plots (each written when its x axis takes at least two values among the cells):

- ``acc_vs_subset_size.png``: accuracy against the number of pretraining samples, one line per init;
- ``quality_vs_quantity.png``: accuracy against subset size, each subset a point coloured by its mean
  curation quality score (small clean sets vs large unfiltered ones);
- ``domain_shift.png``: accuracy per pretraining subset (source domains), one bar per target set;
- ``masking_ratio.png``: accuracy against the masking ratio, one line per subset.

Accuracies are fractions in [0, 1] as the evaluator reports them.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import pandas as pd
import pyarrow as pa

from pipeline import manifest as mf
from pipeline import storage

PLOTS = ("acc_vs_subset_size", "quality_vs_quantity", "domain_shift", "masking_ratio")


def results_frame(results: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per cell: id, named parameters, other overrides (JSON), subset/target sizes and quality,
    every numeric evaluation metric (its flattened key), wall times (s), final pretraining loss, checkpoint."""
    rows = []
    for r in results:
        p, s, t, pre = r["params"], r["subset"], r["target"], r["pretrain"]
        extra = {k: v for k, v in p.items() if k not in ("subset", "target", "init", "mask_ratio")}
        row = {
            "cell_id": r["cell_id"], "subset": p["subset"], "target": p["target"], "init": p["init"],
            "mask_ratio": float("nan") if p["mask_ratio"] is None else float(p["mask_ratio"]),
            "overrides": json.dumps(extra, sort_keys=True), "subset_size": int(s["size"]),
            "subset_mean_quality": float(s["mean_quality"]), "subset_flagged_frac": float(s["flagged_frac"]),
            "subset_domains": ",".join(s["domains"]), "target_domains": ",".join(t["domains"]),
            "target_train_size": int(t["train_size"]), "target_test_size": int(t["test_size"]),
            **{k: float(v) for k, v in r["metrics"].items()},
            "pretrain_steps": int(pre.get("steps") or 0),
            "pretrain_loss": float("nan") if pre.get("final_loss") is None else float(pre["final_loss"]),
            "pretrain_wall_s": float(pre.get("wall_s") or 0.0), "eval_wall_s": float(r["eval_wall_s"]),
            "wall_s": float(r["wall_s"]), "checkpoint": r["checkpoint"],
        }  # fmt: skip
        rows.append(row)
    return pd.DataFrame(rows)


def pick_metrics(df: pd.DataFrame, wanted: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The metric columns to show: ``wanted`` (each must exist), else every column ending in ``top1``."""
    if wanted:
        missing = [m for m in wanted if m not in df.columns]
        if missing:
            known = [c for c in df.columns if "." in c or c.endswith("top1")]
            raise ValueError(f"report.metrics {missing} are not among the evaluation results {known}")
        return list(wanted)
    found = [c for c in df.columns if c.endswith("top1")]
    return sorted(found, key=lambda c: (not c.startswith("linear_probe"), not c.startswith("knn"), c))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def markdown_table(df: pd.DataFrame, metrics: list[str], *, title: str = "study") -> str:
    """The results as a Markdown table, best cell first by the first metric."""
    cols = ["cell_id", "subset", "target", "init", "mask_ratio", "subset_size", "subset_mean_quality",
            *metrics, "pretrain_loss", "wall_s"]  # fmt: skip
    if (df["overrides"] != "{}").any():
        cols.insert(5, "overrides")
    d = df.sort_values(metrics[0], ascending=False, kind="stable") if metrics else df
    lines = [f"# {title}: {len(df)} cells", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(row[c]) for c in cols) + " |" for _, row in d.iterrows()]
    return "\n".join(lines) + "\n"


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def make_plots(df: pd.DataFrame, metrics: list[str]) -> dict[str, bytes]:
    """PNG bytes of each plot that applies (see the module docstring), keyed by plot name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    if not metrics or df.empty:
        return out

    def figure(name: str, draw: Any, xlabel: str) -> None:
        fig, axes = plt.subplots(
            1, len(metrics), figsize=(5.5 * len(metrics), 3.8), squeeze=False, layout="constrained"
        )
        for ax, m in zip(axes[0], metrics, strict=True):
            draw(ax, m)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(m)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        fig.suptitle(name.replace("_", " "))
        out[name] = _png(fig)
        plt.close(fig)

    scratch = df[df["init"] == "scratch"]

    def lines(x: str, series: str, frame: pd.DataFrame, baseline: bool) -> Any:
        def draw(ax: Any, m: str) -> None:
            for key, g in frame.groupby(series, sort=True):
                g = g.groupby(x, as_index=False)[m].mean().sort_values(x)
                ax.plot(g[x], g[m], marker="o", label=f"{series}={key}")
            if baseline and len(scratch):  # scratch weights do not depend on x: one reference level
                ax.axhline(scratch[m].mean(), color="grey", ls="--", label="scratch")

        return draw

    if df["subset_size"].nunique() >= 2:
        figure("acc_vs_subset_size", lines("subset_size", "init", df, False), "pretraining samples")
    if df["subset"].nunique() >= 2:

        def quality(ax: Any, m: str) -> None:
            pre = (
                df[df["init"] != "scratch"]
                .groupby("subset", as_index=False)
                .agg(size=("subset_size", "first"), q=("subset_mean_quality", "first"), acc=(m, "mean"))
            )
            sc = ax.scatter(pre["size"], pre["acc"], c=pre["q"], cmap="viridis", s=60, vmin=0, vmax=1)
            for _, r in pre.iterrows():
                ax.annotate(r["subset"], (r["size"], r["acc"]), fontsize=8, xytext=(4, 4),
                            textcoords="offset points")  # fmt: skip
            if (df["init"] == "scratch").any():  # no pretraining: one baseline, whatever the subset
                ax.axhline(df[df["init"] == "scratch"][m].mean(), color="grey", ls="--", label="scratch")
            ax.figure.colorbar(sc, ax=ax, label="mean quality score", fraction=0.05)

        figure("quality_vs_quantity", quality, "pretraining samples")
    if df["subset_domains"].nunique() >= 2 or df["target"].nunique() >= 2:

        def bars(ax: Any, m: str) -> None:
            src = df.apply(lambda r: "scratch" if r["init"] == "scratch" else
                           f"{r['subset']}\n({r['subset_domains']})", axis=1)  # fmt: skip
            pivot = df.assign(source=src).groupby(["source", "target"])[m].mean().unstack("target")
            width = 0.8 / max(1, pivot.shape[1])
            for j, target in enumerate(pivot.columns):
                xs = [i + j * width for i in range(len(pivot.index))]
                ax.bar(xs, pivot[target].to_numpy(), width, label=f"target={target}")
            ax.set_xticks(
                [i + 0.4 - width / 2 for i in range(len(pivot.index))], list(pivot.index), fontsize=8
            )

        figure("domain_shift", bars, "pretraining subset (source)")
    pre = df[df["init"] != "scratch"]
    if pre["mask_ratio"].dropna().nunique() >= 2:
        figure("masking_ratio", lines("mask_ratio", "subset", pre, True), "masking ratio")
    return out


def write_report(
    results: list[dict[str, Any]], output: str, *, metrics: tuple[str, ...] = (), title: str = "study"
) -> dict[str, str]:
    """Write results.parquet, results.md and plots/*.png under ``output``; returns name -> URL."""
    df = results_frame(results)
    shown = pick_metrics(df, metrics) if len(df) else []
    files = {"results.parquet": storage.join(output, "results.parquet")}
    mf.write_table_atomic(files["results.parquet"], pa.Table.from_pandas(df, preserve_index=False))
    files["results.md"] = storage.join(output, "results.md")
    storage.write_bytes_atomic(files["results.md"], markdown_table(df, shown, title=title).encode())
    for name, png in make_plots(df, shown).items():
        files[name] = storage.join(output, "plots", f"{name}.png")
        storage.write_bytes_atomic(files[name], png)
    return files
