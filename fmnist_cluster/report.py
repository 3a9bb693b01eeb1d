"""Study-style tables and a comparison chart from finished trial runs (plain dicts, no MLflow here).

Runs that differ only in their seeds form one row: mean and standard deviation over the seeds.
"""

from __future__ import annotations

import csv
import io
import json
import re
from importlib import resources
from statistics import mean, stdev
from typing import Any

CLUSTERERS = ("kmeans", "gmm")
SCORES = ("acc", "acc_majority", "nmi")
SEED_PARAMS = ("seed", "data.seed")


def study_reference() -> dict[str, dict[str, Any]]:
    """The reference study's figures (percent) by case name."""
    return json.loads(resources.files("fmnist_cluster").joinpath("study_reference.json").read_text())["cases"]


def _case_name(trial: str) -> str:
    return re.sub(r"(-data\.?seed\d+|-seed\d+)+$", "", trial)


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration (seeds pooled): case, model, epochs, eval_split, n, and for each
    ``{clusterer}_{score}`` the mean and std (fractions; std None for a single run)."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        key = tuple(sorted((k, v) for k, v in run["params"].items() if k not in SEED_PARAMS))
        groups.setdefault(key, []).append(run)
    rows = []
    for members in groups.values():
        first = members[0]
        params = first["params"]
        row = {"case": _case_name(first["tags"].get("fmc.trial", first["name"])),
               "model": first["tags"].get("fmc.model", params.get("model.kind")),
               "epochs": int(params.get("epochs", 0)), "eval_split": params.get("eval_split", "test"),
               "n": len(members)}
        for metric in [f"{c}_{s}" for c in CLUSTERERS for s in SCORES] + ["recon_mse"]:
            values = [m["metrics"][metric] for m in members if metric in m["metrics"]]
            row[f"{metric}_mean"] = mean(values) if values else None
            row[f"{metric}_std"] = stdev(values) if len(values) > 1 else None
        rows.append(row)
    # baselines first, then by architecture and epochs, as in the study
    rows.sort(key=lambda r: (r["model"] != "raw", r["model"], r["epochs"], r["case"]))
    return rows


def _cell(row: dict, metric: str) -> str:
    m, s = row.get(f"{metric}_mean"), row.get(f"{metric}_std")
    if m is None:
        return "-"
    return f"{100 * m:.2f}" + (f" ± {100 * s:.2f}" if s is not None else "")


def columns() -> list[tuple[str, str]]:
    """(header, key) of the displayed table; scores in percent like the study."""
    cols = [("case", "case"), ("model", "model"), ("epochs", "epochs"), ("split", "eval_split"), ("n", "n")]
    for c in CLUSTERERS:
        for s in SCORES:
            cols.append((f"{'KMeans' if c == 'kmeans' else 'GMM'} {s}", f"{c}_{s}"))
    cols += [("study KMeans acc_majority", "study_kmeans"), ("study GMM acc_majority", "study_gmm")]
    return cols


def display_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Rows of strings for the columns above, with the study's figures beside fmc's."""
    study = study_reference()
    out = []
    for row in rows:
        ref = study.get(row["case"], {})
        cells = []
        for _, key in columns():
            if key.startswith("study_"):
                v = ref.get(f"{key.removeprefix('study_')}_acc_majority")
                cells.append("-" if v is None else f"{v:.2f}")
            elif f"{key}_mean" in row:
                cells.append(_cell(row, key))
            else:
                cells.append(str(row[key]) if not (key == "epochs" and row["model"] == "raw") else "-")
        out.append(cells)
    return out


def to_markdown(rows: list[dict[str, Any]]) -> str:
    header = [h for h, _ in columns()]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in display_rows(rows)]
    return "\n".join(lines) + "\n\nScores in percent, mean ± std over seeds (n runs).\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    """Machine-readable: fractions, separate mean and std columns."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def comparison_chart(rows: list[dict[str, Any]]):
    """Bars per case: fmc's acc_majority (mean ± std) and Hungarian acc for KMeans and GMM, with the
    study's acc_majority as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    study = study_reference()
    labels = [f"{r['case']}\n{r['model']}" + (f" e{r['epochs']}" if r["model"] != "raw" else "") for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4.8))
    width = 0.2
    bars = [("kmeans_acc_majority", "KMeans acc_majority", "tab:blue"), ("kmeans_acc", "KMeans acc", "lightsteelblue"),
            ("gmm_acc_majority", "GMM acc_majority", "tab:orange"), ("gmm_acc", "GMM acc", "navajowhite")]
    for i, (metric, label, color) in enumerate(bars):
        means = [100 * (r[f"{metric}_mean"] or np.nan) if r[f"{metric}_mean"] is not None else np.nan for r in rows]
        stds = [100 * (r[f"{metric}_std"] or 0) for r in rows]
        ax.bar(x + (i - 1.5) * width, means, width, yerr=stds, label=f"fmc {label}", color=color, capsize=2)
    for i, (c, marker) in enumerate((("kmeans", "v"), ("gmm", "^"))):
        ys = [study.get(r["case"], {}).get(f"{c}_acc_majority") for r in rows]
        ax.scatter(x + (2 * i - 1.5) * width, [np.nan if y is None else y for y in ys], marker=marker, color="k",
                   zorder=3, label=f"study {'KMeans' if c == 'kmeans' else 'GMM'} acc_majority")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.set_title("fmc vs the reference study (error bars: std over seeds)")
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    fig.tight_layout()
    return fig
