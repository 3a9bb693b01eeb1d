"""Study-style tables and charts from finished trial runs (plain dicts, no MLflow here).

Runs that differ only in their seeds form one row: n, mean, standard deviation and range over the
seeds. A row named like a study case (``case1``, ``raw-test``, ...) and scored on the study's split
is set beside the study's figure: the difference in points and whether the study's figure lies within
the range of fmc's seeds. Rows scored on all 70,000 images are set beside the published label-free
results (Hungarian acc and NMI).
"""

from __future__ import annotations

import csv
import io
import json
import re
import textwrap
from functools import lru_cache
from importlib import resources
from statistics import mean, stdev
from typing import Any

from fmnist_cluster.metrics import CLUSTERERS, score_names

SCORES = ("acc", "acc_majority", "nmi")  # the scores the tables show
SEED_PARAMS = ("seed", "data.seed")
# params that do not change a trial's final scores: which clusterers score the codes during training
# (eval_every); runs recorded before its default changed carry it, later ones do not
NOT_RESULT_PARAMS = ("eval_clusterers",)
EXTRA = ("recon_mse", "latent_dead_units", "manifold_seconds", "total_seconds")
LABEL = {"kmeans": "KMeans", "gmm": "GMM"}


@lru_cache(maxsize=1)
def _reference() -> dict[str, Any]:
    return json.loads(resources.files("fmnist_cluster").joinpath("study_reference.json").read_text())


def study_reference() -> dict[str, dict[str, Any]]:
    """The reference study's figures (percent) by case name."""
    return _reference()["cases"]


def anchors() -> list[dict[str, Any]]:
    """Published label-free results on all 70,000 images: {method, acc, nmi, source} (fractions)."""
    return _reference()["anchors"]


def case_name(trial: str) -> str:
    """A trial's case: its name without the seed suffixes."""
    return re.sub(r"(-data\.?seed\d+|-seed\d+)+$", "", trial)


def _default_params() -> dict[str, str]:
    """Params of settings added to fmc after some runs were recorded, at the value those runs had."""
    from fmnist_cluster.config import TrialConfig

    return {k: str(v) for k, v in TrialConfig().flat().items() if not k.startswith("model.")}


def group_of(run: dict[str, Any], by: str | None) -> str | None:
    """The value of tag ``by`` on ``run`` (``-`` where the run lacks it); None without ``by``."""
    return None if by is None else run["tags"].get(by) or "-"


def newest_per_trial(runs: list[dict[str, Any]], by: str | None = None) -> list[dict[str, Any]]:
    """One run per trial key, the newest (a trial run again with ``--rerun``, or logged by ``fmc run``
    and by a sweep, counts once: its latest result); with ``by``, one per trial key and value of that
    tag (the same trial on two CPUs counts once on each)."""
    newest: dict[tuple, dict[str, Any]] = {}
    for run in runs:
        key = (run["tags"].get("fmc.trial_key") or run.get("run_id") or run["name"], group_of(run, by))
        if key not in newest or (run.get("start_time") or 0) > (newest[key].get("start_time") or 0):
            newest[key] = run
    return sorted(newest.values(), key=lambda r: (r.get("start_time") or 0, r.get("run_id") or ""))


def aggregate(runs: list[dict[str, Any]], by: str | None = None) -> list[dict[str, Any]]:
    """One row per configuration (seeds pooled; the newest run of each trial key): case, model, epochs,
    eval_split, manifold, subset, n, and for each score ``{metric}_mean``, ``_std`` (None for one run),
    ``_min`` and ``_max`` (fractions). With ``by`` (a tag, e.g. ``fmc.cpu_id``), one row per
    configuration and value of that tag, the value under ``group`` and the tag under ``group_tag``."""
    defaults = _default_params()
    groups: dict[tuple, list[dict]] = {}
    for run in newest_per_trial(runs, by):
        params = {**defaults, **run["params"]}
        key = tuple(sorted((k, v) for k, v in params.items() if k not in SEED_PARAMS + NOT_RESULT_PARAMS))
        key += (group_of(run, by),)
        groups.setdefault(key, []).append({**run, "params": params})
    rows = []
    for members in groups.values():
        first = members[0]
        params = first["params"]
        row = {"case": case_name(first["tags"].get("fmc.trial", first["name"])),
               "model": first["tags"].get("fmc.model", params.get("model.kind")),
               "epochs": int(params.get("epochs", 0)), "eval_split": params.get("eval_split", "test"),
               "manifold": params.get("manifold.kind", "none"), "fit_split": params.get("fit_split", "train"),
               "subset": params.get("data.subset"),
               **({} if by is None else {"group_tag": by, "group": group_of(first, by)}),
               "n": len(members)}
        for metric in score_names(scores=SCORES) + list(EXTRA):
            values = [m["metrics"][metric] for m in members if metric in m["metrics"]]
            row[f"{metric}_mean"] = mean(values) if values else None
            row[f"{metric}_std"] = stdev(values) if len(values) > 1 else None
            row[f"{metric}_min"] = min(values) if values else None
            row[f"{metric}_max"] = max(values) if values else None
        rows.append(row)
    # baselines first, then by architecture and epochs, as in the study
    rows.sort(key=lambda r: (r["model"] != "raw", r["model"], r["epochs"], r["manifold"], r["case"],
                             r.get("group", "")))
    return rows


def study_figure(row: dict[str, Any], metric: str) -> float | None:
    """The study's figure (percent) for ``metric`` of a row named like a study case, on the study's data
    (all of it, no ``data.subset``) and split; None when the study has none or the row is not comparable."""
    ref = study_reference().get(row["case"])
    if (ref is None or ref.get("eval_split", "test") != row["eval_split"] or row["manifold"] != "none"
            or row.get("fit_split", "train") != "train" or row.get("subset") not in (None, "None")):
        return None
    return ref.get(metric)


def _pct(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def _versus(row: dict[str, Any], metric: str) -> str:
    """'57.25 (-5.2, out)': the study's figure, fmc's mean minus it in points, and whether it lies
    within [min, max] of fmc's seeds."""
    ref = study_figure(row, metric)
    if ref is None or row.get(f"{metric}_mean") is None:
        return "-"
    diff = 100 * row[f"{metric}_mean"] - ref
    inside = 100 * row[f"{metric}_min"] - 1e-9 <= ref <= 100 * row[f"{metric}_max"] + 1e-9
    return f"{ref:.2f} ({diff:+.2f}, {'in' if inside else 'out'})"


def columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(header, key) of the displayed table; scores in percent like the study. Keys ``study:{metric}``
    hold the study's figure beside fmc's; the manifold column appears when a row has one."""
    cols = [("case", "case"), ("model", "model"), ("epochs", "epochs"), ("split", "eval_split")]
    if any(r.get("fit_split", "train") != "train" for r in rows):
        cols.append(("trained on", "fit_split"))
    if any(r["manifold"] != "none" for r in rows):
        cols.append(("manifold", "manifold"))
    if any(r.get("subset") for r in rows):
        cols.append(("subset", "subset"))
    if rows and "group" in rows[0]:
        cols.append((rows[0]["group_tag"], "group"))
    cols.append(("n", "n"))
    compare = any(study_figure(r, f"{c}_{s}") is not None for r in rows for c in CLUSTERERS for s in SCORES)
    for c in CLUSTERERS:
        for s in ("acc_majority", "acc", "nmi"):
            cols.append((f"{LABEL[c]} {s}", f"{c}_{s}"))
            if compare and s != "acc":  # the study reports acc_majority and NMI
                cols.append(("study (Δ, in range)", f"study:{c}_{s}"))
    cols += [("recon MSE", "recon_mse"), ("dead units", "latent_dead_units")]
    return cols


def display_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Rows of strings for :func:`columns`."""
    out = []
    for row in rows:
        cells = []
        for _, key in columns(rows):
            if key.startswith("study:"):
                cells.append(_versus(row, key.removeprefix("study:")))
            elif key == "recon_mse":
                cells.append("-" if row["recon_mse_mean"] is None else f"{row['recon_mse_mean']:.5f}")
            elif key == "latent_dead_units":
                cells.append("-" if row[f"{key}_mean"] is None else f"{row[f'{key}_mean']:.1f}")
            elif f"{key}_mean" in row:
                cells.append(_pct(row[f"{key}_mean"], row[f"{key}_std"]))
            elif key == "epochs" and row["model"] == "raw":
                cells.append("-")
            elif key == "subset":
                cells.append(str(row["subset"] or "all"))
            else:
                cells.append(str(row[key]))
        out.append(cells)
    return out


def anchor_rows() -> list[list[str]]:
    return [[a["method"], _pct(a["acc"]), _pct(a["nmi"]), a["source"]] for a in anchors()]


def markdown_table(headers, cells: list[list[str]]) -> str:
    """A markdown table of ``cells`` under ``headers``, ending in a newline."""
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells]) + "\n"


def to_markdown(rows: list[dict[str, Any]]) -> str:
    cols = columns(rows)
    text = markdown_table([h for h, _ in cols], display_rows(rows)) + "\nScores in percent: mean ± std over seeds (n runs)."
    if any(k.startswith("study:") for _, k in cols):
        text += (" Study: the reference study's figure, (fmc's mean minus it in points, and whether it lies"
                 " within the range of fmc's seeds).")
    text += "\n"
    if any(r["eval_split"] == "all" for r in rows):
        text += ("\nPublished label-free results on all 70,000 images:\n\n| method | acc | nmi | source |\n"
                 "| --- | --- | --- | --- |\n" + "\n".join("| " + " | ".join(c) + " |" for c in anchor_rows()) + "\n")
    return text


def to_csv(rows: list[dict[str, Any]]) -> str:
    """Machine-readable: fractions, separate mean, std, min and max columns."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def _label(row: dict[str, Any]) -> str:
    """A tick label: case, model and epochs, manifold, each line wrapped at hyphens so that neighbours
    do not run into each other."""
    lines = [row["case"]] if row["model"] == "raw" else [row["case"], f"{row['model']} e{row['epochs']}"]
    lines += [] if row["manifold"] == "none" else [f"+{row['manifold']}"]
    lines += [row["group"]] if "group" in row else []
    return "\n".join(textwrap.fill(line, width=18) for line in lines)


def comparison_chart(rows: list[dict[str, Any]]):
    """Bars per row: fmc's scores (mean, error bars: std over seeds) for KMeans and GMM. Rows comparable
    with the study show acc_majority and acc, the study's acc_majority as markers; rows scored on all
    70,000 images show acc and NMI, the published results as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    literature = all(r["eval_split"] == "all" for r in rows)
    second = "nmi" if literature else "acc_majority"
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(7, 1.25 * len(rows) + 2), 5.2))
    width = 0.2
    bars = [("kmeans_acc", "KMeans acc", "tab:blue"), (f"kmeans_{second}", f"KMeans {second}", "lightsteelblue"),
            ("gmm_acc", "GMM acc", "tab:orange"), (f"gmm_{second}", f"GMM {second}", "navajowhite")]
    for i, (metric, label, color) in enumerate(bars):
        means = [np.nan if r[f"{metric}_mean"] is None else 100 * r[f"{metric}_mean"] for r in rows]
        stds = [100 * (r[f"{metric}_std"] or 0) for r in rows]
        ax.bar(x + (i - 1.5) * width, means, width, yerr=stds, label=f"fmc {label}", color=color, capsize=2)
    if literature:
        for a, style in zip(anchors(), ("-", "--", "-.", ":", (0, (5, 1)))):
            ax.axhline(100 * a["acc"], color="grey", lw=1, ls=style, label=f"{a['method']}: acc {100 * a['acc']:.1f}")
        title = "fmc on all 70,000 images vs published label-free results (error bars: std over seeds)"
    else:
        for i, c in enumerate(CLUSTERERS):
            ys = [study_figure(r, f"{c}_acc_majority") for r in rows]
            ax.scatter(x + (2 * i - 0.5) * width, [np.nan if y is None else y for y in ys], marker="v^"[i],
                       color="k", zorder=3, label=f"study {LABEL[c]} acc_majority")
        title = "fmc vs the reference study (error bars: std over seeds)"
    labels = [_label(r) for r in rows]
    ax.set_xticks(x, labels, fontsize=7)
    ax.set(ylabel="score (%)", ylim=(0, 100), title=title)
    # the legend goes under the axes (inside it covered the bars), below the tallest tick label
    depth = max(label.count("\n") for label in labels) + 1
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.06 - 0.045 * depth), frameon=False)
    fig.tight_layout()
    return fig


def criteria(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """How well each label-free criterion ranks the runs as the labels do: Spearman's rank correlation
    of ``{clusterer}_{criterion}`` with the same clusterer's Hungarian ``acc`` and its ``nmi``, over the
    runs that have both (the newest run of each trial key). Rows: clusterer, criterion, better (max or
    min: the direction a selection rule would take), n, rho_acc, rho_nmi (None below 3 runs or for a
    constant column)."""
    from scipy.stats import spearmanr

    from fmnist_cluster.metrics import LABEL_FREE

    runs = newest_per_trial(runs)
    rows = []
    for clusterer, named in LABEL_FREE.items():
        for criterion, better in named.items():
            row = {"clusterer": clusterer, "criterion": criterion, "better": better}
            for score in ("acc", "nmi"):
                pairs = [(r["metrics"][f"{clusterer}_{criterion}"], r["metrics"][f"{clusterer}_{score}"]) for r in runs
                         if f"{clusterer}_{criterion}" in r["metrics"] and f"{clusterer}_{score}" in r["metrics"]]
                rho = None
                if len(pairs) >= 3 and len({p[0] for p in pairs}) > 1 and len({p[1] for p in pairs}) > 1:
                    rho = float(spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic)
                row["n"], row[f"rho_{score}"] = len(pairs), rho
            if row["n"]:
                rows.append(row)
    return rows


def criteria_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Display cells: clusterer, criterion (better), n, ρ with acc, ρ with NMI."""
    def show(rho):
        return "-" if rho is None else f"{rho:+.2f}"
    return [[LABEL.get(r["clusterer"], r["clusterer"]), f"{r['criterion']} ({r['better']})", str(r["n"]),
             show(r["rho_acc"]), show(r["rho_nmi"])] for r in rows]


CRITERIA_HEADERS = ("clusterer", "criterion (better)", "n", "ρ with acc", "ρ with NMI")


def compare(runs: list[dict[str, Any]], first: str, second: str) -> list[dict[str, Any]]:
    """Case ``second`` against case ``first`` seed by seed (the study's epoch question: cases 5 -> 6):
    for each score, the difference second - first (points) on every seed both have, its mean and
    standard deviation, and whether every seed moved the same way. Rows: metric, seeds, diffs, mean,
    std (None for one seed), same_sign; the cases are trial names without their ``-seedN``."""
    def by_seed(case: str) -> dict[str, dict[str, Any]]:
        return {run["params"].get("seed", "0"): run for run in newest_per_trial(runs)
                if case_name(run["tags"].get("fmc.trial", run["name"])) == case}

    a, b = by_seed(first), by_seed(second)
    seeds = sorted(set(a) & set(b), key=int)
    rows = []
    for metric in score_names(scores=SCORES):
        pairs = [(s, a[s]["metrics"][metric], b[s]["metrics"][metric]) for s in seeds
                 if metric in a[s]["metrics"] and metric in b[s]["metrics"]]
        if not pairs:
            continue
        diffs = [100 * (y - x) for _, x, y in pairs]
        rows.append({"metric": metric, "seeds": [int(s) for s, _, _ in pairs], "diffs": diffs, "mean": mean(diffs),
                     "std": stdev(diffs) if len(diffs) > 1 else None,
                     "same_sign": all(d > 0 for d in diffs) or all(d < 0 for d in diffs)})
    return rows
