"""The report pools seeds into rows and sets them beside the study's figures (pure functions on run dicts)."""

import itertools
from statistics import mean, stdev

import pytest

from fmnist_cluster import report
from fmnist_cluster.config import TrialConfig


RUN_IDS = itertools.count()


def run(name: str, config: TrialConfig, **metrics) -> dict:
    return {"name": name, "run_id": f"{name}-{next(RUN_IDS)}", "params": {k: str(v) for k, v in config.flat().items()},
            "metrics": metrics, "tags": {"fmc.trial": name, "fmc.model": config.model.label()}}


CASE1 = [0.55, 0.58, 0.60]  # kmeans_acc_majority of three seeds; the study has 57.25


@pytest.fixture
def rows():
    runs = [run(f"case1-seed{s}", TrialConfig(seed=s, data={"seed": s}), kmeans_acc_majority=v, kmeans_acc=v - 0.05,
                kmeans_nmi=0.50 + s / 100, gmm_acc_majority=0.62, gmm_acc=0.58, gmm_nmi=0.60, recon_mse=0.005,
                latent_dead_units=40 + s)
            for s, v in enumerate(CASE1)]
    runs.append(run("case5", TrialConfig(model={"kind": "conv", "filters": [64, 32, 16, 7, 1]}),
                    kmeans_acc_majority=0.40, kmeans_acc=0.35, kmeans_nmi=0.30))
    # named like a study case but scored on another split: not comparable with the study
    runs.append(run("case1-seed0", TrialConfig(eval_split="all"), kmeans_acc_majority=0.5, kmeans_acc=0.45,
                    kmeans_nmi=0.5))
    return report.aggregate(runs)


def test_seeds_pool_into_one_row_with_mean_std_and_range(rows):
    case1 = next(r for r in rows if r["case"] == "case1" and r["eval_split"] == "test")
    assert case1["n"] == 3 and case1["epochs"] == 10 and case1["manifold"] == "none"
    assert case1["kmeans_acc_majority_mean"] == pytest.approx(mean(CASE1))
    assert case1["kmeans_acc_majority_std"] == pytest.approx(stdev(CASE1))
    assert (case1["kmeans_acc_majority_min"], case1["kmeans_acc_majority_max"]) == (0.55, 0.60)
    assert case1["latent_dead_units_mean"] == 41
    case5 = next(r for r in rows if r["case"] == "case5")
    assert case5["n"] == 1 and case5["kmeans_acc_majority_std"] is None and case5["gmm_acc_mean"] is None


def test_study_columns_give_difference_and_range(rows):
    case1 = next(r for r in rows if r["case"] == "case1" and r["eval_split"] == "test")
    # 57.25 lies in [55, 60]; fmc's mean 57.67 is 0.42 points above
    assert report._versus(case1, "kmeans_acc_majority") == "57.25 (+0.42, in)"
    # GMM 62.00 on every seed: the study's 61.03 is below the range
    assert report._versus(case1, "gmm_acc_majority") == "61.03 (+0.97, out)"
    assert report._versus(case1, "kmeans_nmi") == "56.26 (-5.26, out)"
    other_split = next(r for r in rows if r["eval_split"] == "all")
    assert report.study_figure(other_split, "kmeans_acc_majority") is None
    headers = [h for h, _ in report.columns(rows)]
    assert headers.count("study (Δ, in range)") == 4  # acc_majority and NMI of both clusterers


def test_markdown_lists_every_row_and_the_anchors(rows):
    text = report.to_markdown(rows)
    table = [ln for ln in text.splitlines() if ln.startswith("| case") or ln.startswith("| case1")
             or ln.startswith("| case5")]
    assert len(table) == 4  # header + case1 (test) + case1 (all) + case5
    assert "| case1 | 64-32-16-7 | 10 | test | 3 | 57.67 ± 2.52 | 57.25 (+0.42, in) |" in text
    assert "N2D (AE + UMAP + GMM) | 67.20 | 68.40" in text  # a row scored on all 70k brings the anchors


def test_rows_without_a_new_setting_group_with_rows_that_have_it_at_its_default():
    """Runs recorded before a setting existed (no manifold.* params) pool with runs that log it at its
    default value."""
    old = run("dense-seed0", TrialConfig(), kmeans_acc=0.5)
    del old["params"]["manifold.kind"]
    new = run("dense-seed1", TrialConfig(seed=1, data={"seed": 1}), kmeans_acc=0.6)
    (row,) = report.aggregate([old, new])
    assert row["n"] == 2 and row["kmeans_acc_mean"] == pytest.approx(0.55)


def test_charts_draw_both_views(rows):
    study = report.comparison_chart([r for r in rows if r["eval_split"] == "test"])
    literature = report.comparison_chart([r for r in rows if r["eval_split"] == "all"])
    assert "reference study" in study.axes[0].get_title()
    assert "published" in literature.axes[0].get_title()
    legend = [t.get_text() for t in literature.axes[0].get_legend().get_texts()]
    assert sum(a["method"] in text for a in report.anchors() for text in legend) == len(report.anchors())


def test_a_trial_logged_twice_counts_once_with_its_newest_run():
    """A trial key with two finished runs (a --rerun, or `fmc run` and a sweep) is one run in the row:
    the newest; n and the std do not count it twice."""
    old, new = (run("case1", TrialConfig(), kmeans_acc_majority=v, kmeans_acc=v, kmeans_nmi=v) for v in (0.50, 0.56))
    for r, start in ((old, 1000), (new, 2000)):
        r.update(run_id=f"run-{start}", start_time=start)
        r["tags"]["fmc.trial_key"] = TrialConfig().key()
    other = run("case1-seed1", TrialConfig(seed=1, data={"seed": 1}), kmeans_acc_majority=0.60, kmeans_acc=0.6,
                kmeans_nmi=0.6)
    (row,) = report.aggregate([new, other, old])
    assert row["n"] == 2 and row["kmeans_acc_majority_mean"] == pytest.approx(mean([0.56, 0.60]))


def test_subset_runs_are_not_set_beside_the_studys_full_data_figures():
    (row,) = report.aggregate([run("case1", TrialConfig(data={"subset": 1000}, batch_size=64),
                                   kmeans_acc_majority=0.5, kmeans_acc=0.45, kmeans_nmi=0.5)])
    assert row["subset"] == "1000" and report.study_figure(row, "kmeans_acc_majority") is None
    assert "study:kmeans_acc_majority" not in [key for _, key in report.columns([row])]
    assert ("subset", "subset") in report.columns([row])


def test_runs_recorded_before_a_default_changed_pool_with_later_ones():
    """case 5's seed 0 was recorded when eval_clusterers defaulted to ['kmeans'] (a param then), seed 1
    after the default became 'the trial's clusterers' (no param): one row, n = 2, as the final scores do
    not depend on which clusterers scored during training."""
    old = run("case5-seed0", TrialConfig(), kmeans_acc_majority=0.50, kmeans_acc=0.5, kmeans_nmi=0.5)
    old["params"]["eval_clusterers"] = "['kmeans']"
    new = run("case5-seed1", TrialConfig(seed=1, data={"seed": 1}), kmeans_acc_majority=0.56, kmeans_acc=0.5,
              kmeans_nmi=0.5)
    new["params"].pop("eval_clusterers", None)
    (row,) = report.aggregate([old, new])
    assert row["n"] == 2 and row["kmeans_acc_majority_mean"] == pytest.approx(0.53)


def test_encoders_trained_on_all_images_are_rows_of_their_own_apart_from_the_study():
    """fit_split: all (N2D's protocol) is not the study's training: its own row, a 'trained on' column,
    no study figure beside it; runs recorded before the setting existed (no param) are the study's."""
    older = run("case1", TrialConfig(), kmeans_acc_majority=0.57, kmeans_acc=0.5, kmeans_nmi=0.5)
    older["params"].pop("fit_split", None)
    whole = run("case1", TrialConfig(fit_split="all"), kmeans_acc_majority=0.6, kmeans_acc=0.55, kmeans_nmi=0.5)
    rows = report.aggregate([older, whole])
    assert sorted(r["fit_split"] for r in rows) == ["all", "train"]
    by = {r["fit_split"]: r for r in rows}
    assert report.study_figure(by["train"], "kmeans_acc_majority") is not None
    assert report.study_figure(by["all"], "kmeans_acc_majority") is None
    assert ("trained on", "fit_split") in report.columns(rows)
    assert ("trained on", "fit_split") not in report.columns([by["train"]])


def test_label_free_criteria_are_ranked_against_the_labels_scores():
    """Spearman's ρ of each criterion with the same clusterer's acc and NMI, over the runs that have
    both: a criterion that orders the runs as acc does gets +1, one that orders them backwards -1; a
    criterion on fewer than three runs gets no ρ."""
    accs = [0.50, 0.62, 0.55, 0.70]
    runs = [run(f"t{s}", TrialConfig(seed=s), gmm_acc=a, gmm_nmi=a, gmm_silhouette=a / 2, gmm_bic=-a * 1e5,
                gmm_loglik=(a - 0.6) ** 2, **({"kmeans_acc": a, "kmeans_nmi": a, "kmeans_inertia": a} if s < 2 else {}))
            for s, a in enumerate(accs)]
    rows = {(r["clusterer"], r["criterion"]): r for r in report.criteria(runs)}
    assert rows[("gmm", "silhouette")]["rho_acc"] == pytest.approx(1) and rows[("gmm", "bic")]["rho_nmi"] == pytest.approx(-1)
    assert rows[("gmm", "loglik")]["n"] == 4 and abs(rows[("gmm", "loglik")]["rho_acc"]) < 1
    assert rows[("kmeans", "inertia")]["n"] == 2 and rows[("kmeans", "inertia")]["rho_acc"] is None
    assert ("kmeans", "silhouette") not in rows  # no run has it


def test_report_pools_records_files_and_prints_the_criteria(run_fmc):
    """`fmc report --from A --from B --criteria`: both files' runs in one table, and the criteria's ρ
    as report.criteria computes them on the same records (the repository's own results)."""
    from conftest import ROOT

    from fmnist_cluster.records import read_records

    files = [ROOT / "results" / "beyond-amd.jsonl", ROOT / "results" / "n2d-protocol.jsonl"]
    res = run_fmc("report", "--from", files[0], "--from", files[1], "--criteria", "--format", "markdown")
    assert res.returncode == 0, res.stderr[-2000:]
    expected = report.criteria([r for f in files for r in read_records(f)])
    said = {line.split("|")[2].strip(): line for line in res.stdout.splitlines() if line.startswith("| GMM |")}
    for row in expected:
        if row["clusterer"] == "gmm":
            cells = [c.strip() for c in said[f"{row['criterion']} ({row['better']})"].split("|")[3:6]]
            assert cells == [str(row["n"]), f"{row['rho_acc']:+.2f}", f"{row['rho_nmi']:+.2f}"]
    assert "n2d-all-e100" in res.stdout and "n2d-e50" in res.stdout  # both files' rows


def test_two_cases_compare_seed_by_seed():
    """case6 against case5 on the seeds both have: the per-seed differences in points, their mean and
    std, and whether every seed moved the same way; a seed only one case has is left out."""
    runs = [run(f"case5-seed{s}", TrialConfig(seed=s, epochs=10), gmm_acc=0.50 + s / 100, kmeans_acc=0.40)
            for s in range(3)]
    runs += [run(f"case6-seed{s}", TrialConfig(seed=s, epochs=25), gmm_acc=0.52 + s / 50, kmeans_acc=0.40 + (s - 1) / 100)
             for s in range(4)]
    rows = {r["metric"]: r for r in report.compare(runs, "case5", "case6")}
    assert rows["gmm_acc"]["seeds"] == [0, 1, 2] and rows["gmm_acc"]["diffs"] == pytest.approx([2, 3, 4])
    assert rows["gmm_acc"]["mean"] == pytest.approx(3) and rows["gmm_acc"]["std"] == pytest.approx(1)
    assert rows["gmm_acc"]["same_sign"] and not rows["kmeans_acc"]["same_sign"]
    assert "gmm_nmi" not in rows  # neither case has it


def test_report_compare_prints_the_records_comparison_or_refuses_first(run_fmc):
    from conftest import ROOT

    from fmnist_cluster.records import read_records

    path = ROOT / "results" / "paper-cases-seeds.jsonl"
    res = run_fmc("report", "--from", path, "--compare", "case5,case6", "--format", "markdown")
    assert res.returncode == 0, res.stderr[-2000:]
    for row in report.compare(read_records(path), "case5", "case6"):
        assert " ".join(f"{d:+.2f}" for d in row["diffs"]) in res.stdout
    bad = run_fmc("report", "--from", path, "--compare", "case5,case9")
    assert bad.returncode == 2 and "no seed has runs of both cases" in bad.stderr and "case6" in bad.stderr
    assert bad.stdout == ""  # refused before any table


def test_rows_split_by_a_tag_keep_one_trial_run_on_each_cpu():
    """--by fmc.cpu_id: the same trial run on two CPUs counts once on each, in a row per CPU; runs
    without the tag form a '-' row; without --by the newest run of each trial key stands alone."""
    runs = [run(f"case1-seed{s}", TrialConfig(seed=s, data={"seed": s}), kmeans_acc=0.50 + s / 100) for s in range(3)]
    for r in runs:
        r["tags"].update({"fmc.trial_key": r["name"], "fmc.cpu_id": "intel"})
        r["start_time"] = 1
    again = run("case1-seed0", TrialConfig(seed=0, data={"seed": 0}), kmeans_acc=0.56)
    again["tags"].update({"fmc.trial_key": "case1-seed0", "fmc.cpu_id": "avx2"})
    again["start_time"] = 2
    untagged = run("case5", TrialConfig(model={"kind": "conv", "filters": [64, 32, 16, 7, 1]}), kmeans_acc=0.4)
    rows = {(r["case"], r["group"]): r for r in report.aggregate([*runs, again, untagged], by="fmc.cpu_id")}
    assert set(rows) == {("case1", "intel"), ("case1", "avx2"), ("case5", "-")}
    assert rows["case1", "intel"]["n"] == 3 and rows["case1", "intel"]["kmeans_acc_mean"] == pytest.approx(0.51)
    assert rows["case1", "avx2"]["n"] == 1 and rows["case1", "avx2"]["kmeans_acc_mean"] == pytest.approx(0.56)
    assert ("fmc.cpu_id", "group") in report.columns(list(rows.values()))
    pooled = {r["case"]: r for r in report.aggregate([*runs, again, untagged])}
    assert pooled["case1"]["n"] == 3 and "group" not in pooled["case1"]  # seed 0's newest run only
    assert pooled["case1"]["kmeans_acc_mean"] == pytest.approx(mean([0.56, 0.51, 0.52]))
    assert "fmc.cpu_id" not in [h for h, _ in report.columns(list(pooled.values()))]


def test_report_by_a_tag_from_the_records(run_fmc):
    """`fmc report --from ... --by fmc.cpu_id --format csv`: the rows the records give per CPU."""
    import csv
    import io

    from conftest import ROOT

    from fmnist_cluster.records import read_records

    path = ROOT / "results" / "paper-cases-seeds.jsonl"
    res = run_fmc("report", "--from", path, "--by", "fmc.cpu_id", "--format", "csv")
    assert res.returncode == 0, res.stderr[-2000:]
    said = {(r["case"], r["group"]): r for r in csv.DictReader(io.StringIO(res.stdout))}
    expected = report.aggregate(read_records(path), by="fmc.cpu_id")
    assert set(said) == {(r["case"], r["group"]) for r in expected}
    assert len({g for _, g in said}) >= 2  # the records hold runs of more than one CPU kind (and untagged ones)
    for r in expected:
        assert int(said[r["case"], r["group"]]["n"]) == r["n"]
