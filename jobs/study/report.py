"""A study's report: ``results.parquet`` (one row per cell and seed), ``results.md`` (mean ± std over seeds per
cell, the chance level, each finding's verdict, wall time and start-up overhead per cell) and PNG plots.

A finding is "reproduced" only when the difference of the two groups' means exceeds two standard errors of the
difference (``se = sqrt(s1²/n1 + s2²/n2)``, sample standard deviations over seeds; for ``not_worse`` claims,
when the difference exceeds minus two standard errors); otherwise it is reported "not reproduced" with the
numbers. With fewer than two seeds per group no verdict is possible and it says so.

Plots: ``summary.png`` (every cell's mean ± std per metric, chance as a dashed line) and, when the cells span
two or more masking ratios, ``masking_ratio.png`` (mean ± std against the ratio, one line per mask type).
Accuracies are fractions in [0, 1] as the evaluator reports them.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import pandas as pd
import pyarrow as pa
from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry

from jobs.train.lineage import flat as lineage_columns
from pipeline import storage
from pipeline.ingest import manifest as mf

# a study's named cell parameters (jobs.study.study: grid axes, cells, findings): each a column of the results;
# any other parameter is a <job>.<key> override
NAMED_PARAMS = ("subset", "target", "init", "mask_ratio", "mask_type")


def results_frame(results: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per cell and seed: ids, named parameters, other overrides (JSON), subset/target facts, chance,
    every numeric metric (its flattened key), wall times and overhead (s), losses, checkpoint."""
    rows = []
    for r in results:
        p, s, t, pre = r["params"], r["subset"], r["target"], r["pretrain"]
        extra = {k: v for k, v in p.items() if k not in NAMED_PARAMS}
        row = {
            "cell_id": r["cell_id"], "eval_id": r.get("eval_id", r["cell_id"]), "seed": int(r.get("seed", 0)), "subset": p["subset"], "target": p["target"],
            "init": p["init"], "mask_ratio": float("nan") if p.get("mask_ratio") is None else float(p["mask_ratio"]),
            "mask_type": p.get("mask_type") or "", "overrides": json.dumps(extra, sort_keys=True),
            "subset_size": int(s["size"]), "subset_mean_quality": float(s["mean_quality"]),
            "subset_flagged_frac": float(s["flagged_frac"]), "subset_domains": ",".join(s["domains"]),
            "target_domains": ",".join(t["domains"]), "target_train_size": int(t["train_size"]),
            "target_test_size": int(t["test_size"]), "chance": float(t.get("chance", float("nan"))),
            **{k: float(v) for k, v in r["metrics"].items() if isinstance(v, int | float)},
            "pretrain_steps": int(pre.get("steps") or 0),
            "pretrain_loss": float("nan") if pre.get("final_loss") is None else float(pre["final_loss"]),
            "pretrain_wall_s": float(pre.get("wall_s") or 0.0),
            "pretrain_overhead_s": float(pre.get("overhead_s") or 0.0),
            "finetune_wall_s": float(r.get("finetune_wall_s") or 0.0), "eval_wall_s": float(r["eval_wall_s"]),
            "checkpoint": r["checkpoint"], **lineage_columns(r.get("lineage")),
        }  # fmt: skip
        rows.append(row)
    return pd.DataFrame(rows)


def pick_metrics(df: pd.DataFrame, wanted: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The metric columns to show: ``wanted`` (each must exist), else every column ending in ``top1``."""
    if wanted:
        missing = [m for m in wanted if m not in df.columns]
        if missing:
            known = [c for c in df.columns if c.endswith("top1")]
            raise ValueError(f"report.metrics {missing} are not among the evaluation results {known}")
        return list(wanted)
    order = ("finetune", "linear_probe", "knn")
    found = [c for c in df.columns if c.endswith("top1")]
    return sorted(found, key=lambda c: (next((i for i, o in enumerate(order) if c.startswith(o)), 9), c))


def cell_label(row: pd.Series) -> str:
    """A readable name of a cell: its init, subset, mask and overrides."""
    if row["init"] == "scratch":
        parts = ["scratch"]
    else:
        parts = [f"{row['subset']}"]
        if not math.isnan(row["mask_ratio"]) or row["mask_type"]:
            parts.append(
                f"{row['mask_type'] or 'mask'} {'' if math.isnan(row['mask_ratio']) else row['mask_ratio']}"
            )
    if row["overrides"] != "{}":
        parts.append(", ".join(f"{k.split('.')[-1]}={v}" for k, v in json.loads(row["overrides"]).items()))
    return " ".join(parts) + f" -> {row['target']}"


def summarize(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One row per cell: label, seeds, mean/std of every metric over seeds, sizes, chance, mean walls."""
    rows = []
    for cell_id, g in df.groupby("cell_id", sort=False):
        first = g.iloc[0]
        row = {"cell_id": cell_id, "label": cell_label(first), "seeds": len(g), "init": first["init"],
               "subset": first["subset"], "target": first["target"], "mask_ratio": first["mask_ratio"],
               "mask_type": first["mask_type"], "subset_size": int(first["subset_size"]),
               "subset_flagged_frac": float(first["subset_flagged_frac"]), "chance": float(first["chance"]),
               "pretrain_wall_s": float(g["pretrain_wall_s"].mean()),
               "pretrain_overhead_s": float(g["pretrain_overhead_s"].mean()),
               "finetune_wall_s": float(g["finetune_wall_s"].mean()), "eval_wall_s": float(g["eval_wall_s"].mean())}  # fmt: skip
        for m in metrics:
            row[f"{m}.mean"] = float(g[m].mean())
            row[f"{m}.std"] = float(g[m].std(ddof=1)) if len(g) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


PRETRAIN_PARAMS = ("subset", "mask_ratio", "mask_type")  # what only a pretrained cell has


def _matching(df: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
    """Rows of ``df`` with every parameter of ``params``. A selector on a pretraining parameter (subset, mask)
    that does not name ``init`` matches pretrained rows only: a scratch cell carries the study's default subset
    (its row says what the cell would have pretrained on) but was never pretrained on it."""
    mask = pd.Series(True, index=df.index)
    if "init" not in params and any(k in PRETRAIN_PARAMS for k in params):
        mask &= df["init"] != "scratch"
    for k, v in params.items():
        if k in NAMED_PARAMS:
            col = df[k]
            mask &= (col - float(v)).abs() < 1e-9 if k == "mask_ratio" else col == v
        else:
            mask &= df["overrides"].map(lambda o, k=k, v=v: json.loads(o).get(k) == v)
    return df[mask]


def finding_verdicts(df: pd.DataFrame, findings: tuple[Any, ...]) -> list[dict[str, Any]]:
    """Each finding's groups (mean, std, n over cells x seeds), difference, its standard error and verdict."""
    out = []
    df = df.drop_duplicates("eval_id")  # cells that resolve to the same runs count once
    for f in findings:
        a, b = _matching(df, f.better), _matching(df, f.worse)
        row: dict[str, Any] = {"name": f.name, "metric": f.metric, "kind": f.kind, "better": f.better,
                               "worse": f.worse, "n_better": len(a), "n_worse": len(b)}  # fmt: skip
        if f.metric not in df.columns or len(a) < 2 or len(b) < 2:
            row.update(
                verdict="no verdict (fewer than 2 runs in a group)", diff=float("nan"), se=float("nan")
            )
            out.append(row)
            continue
        ma, mb, sa, sb = (
            a[f.metric].mean(),
            b[f.metric].mean(),
            a[f.metric].std(ddof=1),
            b[f.metric].std(ddof=1),
        )
        se = math.sqrt(sa**2 / len(a) + sb**2 / len(b))
        diff = ma - mb
        ok = diff > 2 * se if f.kind == "greater" else diff > -2 * se
        row.update(mean_better=ma, std_better=sa, mean_worse=mb, std_worse=sb, diff=diff, se=se,
                   verdict="reproduced" if ok else "not reproduced")  # fmt: skip
        out.append(row)
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def markdown_report(df: pd.DataFrame, summary: pd.DataFrame, metrics: list[str], verdicts: list[dict], *,
                    title: str, wall_s: float | None = None) -> str:  # fmt: skip
    """The report as Markdown: the per-cell table (mean ± std over seeds), then the findings."""
    seeds = sorted(df["seed"].unique().tolist()) if len(df) else []
    lines = [f"# {title}: {len(summary)} cells x seeds {seeds}", ""]
    if wall_s is not None:
        lines += [f"Study wall time {wall_s:.0f} s (this invocation; cells already done were not rerun).", ""]
    cols = ["cell", "seeds", *[f"{m} (mean ± std)" for m in metrics], "chance", "subset size",
            "pretrain s (overhead)", "finetune + eval s"]  # fmt: skip
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    key = f"{metrics[0]}.mean" if metrics else None
    for _, r in (summary.sort_values(key, ascending=False, kind="stable") if key else summary).iterrows():
        accs = [f"{r[f'{m}.mean']:.3f} ± {_fmt(r[f'{m}.std']) or '-'}" for m in metrics]
        cells = [r["label"], str(r["seeds"]), *accs, _fmt(r["chance"]), str(r["subset_size"]),
                 f"{r['pretrain_wall_s']:.0f} ({r['pretrain_overhead_s']:.0f})",
                 f"{r['finetune_wall_s'] + r['eval_wall_s']:.0f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    if verdicts:
        lines += ["", "## Findings", "", "| finding | metric | better | worse | difference ± SE | verdict |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for v in verdicts:
            side = lambda k, v=v: (f"{v[f'mean_{k}']:.3f} ± {v[f'std_{k}']:.3f} (n={v[f'n_{k}']})"  # noqa: E731
                                   if f"mean_{k}" in v else f"n={v[f'n_{k}']}")  # fmt: skip
            diff = "" if math.isnan(v["diff"]) else f"{v['diff']:+.3f} ± {v['se']:.3f}"
            lines.append(f"| {v['name']} | {v['metric']} | {json.dumps(v['better'])}: {side('better')} | "
                         f"{json.dumps(v['worse'])}: {side('worse')} | {diff} | **{v['verdict']}** |")  # fmt: skip
        lines += ["", "Reproduced = the difference of means exceeds 2 standard errors of the difference "
                  "(`not_worse`: exceeds -2 SE); SE from the standard deviations over seeds."]  # fmt: skip
    if "lineage_code" in df.columns and len(df):
        lines += ["", "## Lineage", "", "What each cell's models were trained from (recorded in every checkpoint "
                  "and export; sha256 prefixes of the shard-set manifest and the pretraining subset manifest).", "",
                  "| cell | code | shards sha256 | subset sha256 | subset rule |", "|---|---|---|---|---|"]  # fmt: skip
        for _, g in df.groupby("cell_id", sort=False):
            first = g.iloc[0]
            codes = ", ".join(sorted(set(g["lineage_code"]) - {""})) or "-"
            lines.append(
                f"| {cell_label(first)} | {codes} | {first['pretrain_shards_sha256'][:12] or '-'} | "
                f"{first['pretrain_subset_sha256'][:12] or '-'} | {first['pretrain_subset_rule'] or '-'} |"
            )
    return "\n".join(lines) + "\n"


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def make_plots(summary: pd.DataFrame, metrics: list[str]) -> dict[str, bytes]:
    """PNG bytes of each plot that applies (see the module docstring), keyed by plot name."""
    out: dict[str, bytes] = {}
    if not metrics or summary.empty:
        return out
    fig = Figure(figsize=(max(5.0, 0.9 * len(summary)) * len(metrics) / 1.5, 4.2), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        xs = range(len(summary))
        ax.bar(xs, summary[f"{m}.mean"], yerr=summary[f"{m}.std"].fillna(0), capsize=4,
               color=["grey" if i == "scratch" else "tab:blue" for i in summary["init"]])  # fmt: skip
        chance = summary["chance"].dropna()
        if len(chance):
            ax.axhline(float(chance.iloc[0]), color="k", ls="--", lw=1, label="chance")
            ax.legend(fontsize=8)
        ax.set_xticks(list(xs), summary["label"], rotation=35, ha="right", fontsize=7)
        ax.set_ylabel(f"{m} (mean ± std over seeds)")
        ax.grid(alpha=0.3, axis="y")
    out["summary"] = _png(fig)
    pre = summary[summary["init"] != "scratch"].dropna(subset=["mask_ratio"])
    if pre["mask_ratio"].nunique() >= 2:
        fig = Figure(figsize=(5.5 * len(metrics), 3.8), layout="constrained")
        axes = fig.subplots(1, len(metrics), squeeze=False)
        for ax, m in zip(axes[0], metrics, strict=True):
            for kind, g in pre.groupby("mask_type", sort=True):
                g = g.sort_values("mask_ratio")
                ax.errorbar(g["mask_ratio"], g[f"{m}.mean"], yerr=g[f"{m}.std"].fillna(0), marker="o", capsize=4,
                            label=kind or "mask")  # fmt: skip
            scratch = summary[summary["init"] == "scratch"]
            if len(scratch):
                ax.axhline(float(scratch[f"{m}.mean"].mean()), color="grey", ls="--", label="scratch")
            if summary["chance"].notna().any():
                ax.axhline(float(summary["chance"].dropna().iloc[0]), color="k", ls=":", label="chance")
            ax.set_xlabel("masking ratio")
            ax.set_ylabel(f"{m} (mean ± std)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        out["masking_ratio"] = _png(fig)
    return out


def write_report(
    results: list[dict[str, Any]], output: str, *, report: Any = None, title: str = "study",
    wall_s: float | None = None,
) -> dict[str, str]:  # fmt: skip
    """Write results.parquet, results.md and plots/*.png under ``output``; returns name -> URL."""
    df = results_frame(results)
    wanted = tuple(report.metrics) if report is not None else ()
    findings = tuple(report.findings) if report is not None else ()
    shown = pick_metrics(df, wanted) if len(df) else []
    summary = summarize(df, shown) if len(df) else pd.DataFrame()
    verdicts = finding_verdicts(df, findings) if len(df) else []
    files = {"results.parquet": storage.join(output, "results.parquet")}
    mf.write_table_atomic(files["results.parquet"], pa.Table.from_pandas(df, preserve_index=False))
    files["results.md"] = storage.join(output, "results.md")
    text = markdown_report(df, summary, shown, verdicts, title=title, wall_s=wall_s)
    storage.write_bytes_atomic(files["results.md"], text.encode())
    files["findings.json"] = storage.join(output, "findings.json")
    storage.write_bytes_atomic(files["findings.json"], json.dumps(verdicts, indent=1, default=float).encode())
    for name, png in make_plots(summary, shown).items():
        files[name] = storage.join(output, "plots", f"{name}.png")
        storage.write_bytes_atomic(files[name], png)
    return files
