from pathlib import Path

import pytest

from fmnist_cluster.config import SpecError, TrialConfig, deep_merge, load_sweep, load_trial

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
EXPECTED = {"paper_cases.yaml": 10, "paper_cases_seeds.yaml": 30, "extra_grids.yaml": 81, "quick.yaml": 4}


def test_every_shipped_sweep_validates_and_expands():
    files = sorted(p.name for p in SWEEPS.glob("*.yaml"))
    assert set(files) == set(EXPECTED), "a new sweep file needs its expected trial count here"
    for name in files:
        trials = load_sweep(SWEEPS / name).expand()
        assert len(trials) == EXPECTED[name], name
        assert len({t.name for t in trials}) == len(trials)
        assert len({t.config.key() for t in trials}) == len(trials)


def test_paper_cases_match_the_study():
    trials = {t.name: t.config for t in load_sweep(SWEEPS / "paper_cases.yaml").expand()}
    assert trials["case4"].model.filters == (64, 32, 16, 7) and trials["case4"].epochs == 100
    assert trials["case6"].model.filters == (64, 32, 16, 7, 1) and trials["case6"].epochs == 25
    assert trials["case7"].model.filters == (32, 16, 7) and trials["case7"].epochs == 100
    assert trials["dense"].model.units == (128, 64, 32)
    assert trials["raw-train"].model.kind == "none" and trials["raw-train"].eval_split == "train"
    assert trials["raw-test"].model.filters is None  # kind none replaced the conv default
    for c in trials.values():
        assert (c.kmeans.n_init, c.kmeans.max_iter, c.gmm.n_init, c.gmm.covariance_type) == (10, 300, 10, "full")
        assert c.data.subset is None and c.batch_size == 128


def test_grid_names_and_seeds():
    trials = load_sweep(SWEEPS / "paper_cases_seeds.yaml").expand()
    assert [t.name for t in trials[:3]] == ["raw-train-seed0", "raw-train-seed1", "raw-train-seed2"]
    assert [t.config.seed for t in trials[:3]] == [0, 1, 2]
    assert load_trial(SWEEPS / "paper_cases_seeds.yaml", "case3-seed2").epochs == 50


def test_key_is_stable_and_sensitive():
    a, b = TrialConfig(), TrialConfig(seed=0, epochs=10)
    assert a.key() == b.key() and a.key() != TrialConfig(seed=1).key()
    assert a.flat()["model.filters"] == "[64, 32, 16, 7]"


def test_deep_merge_replaces_on_kind_change():
    base = {"model": {"kind": "conv", "filters": [1, 2, 3]}, "gmm": {"n_init": 10, "max_iter": 300}}
    out = deep_merge(base, {"model": {"kind": "none"}, "gmm": {"n_init": 2}})
    assert out == {"model": {"kind": "none"}, "gmm": {"n_init": 2, "max_iter": 300}}


GOOD = """\
experiment: t
defaults:
  epochs: 1
trials:
  - {name: a}
  - {name: b, epochs: 2}
"""

BAD = {
    "syntax": ("experiment: t\ntrials: [ {name: a}\n", r"bad.yaml:\d+: YAML syntax error"),
    "unknown key": (GOOD + "colour: blue\n", r"bad.yaml:7: colour: Extra inputs are not permitted"),
    "unknown trial key": (GOOD.replace("{name: b, epochs: 2}", "{name: b, epoch: 2}"),
                          r"bad.yaml:6: trials\[1\] \(b\): epoch: Extra inputs are not permitted"),
    "wrong type": (GOOD.replace("epochs: 2", "epochs: two"),
                   r"bad.yaml:6: trials\[1\] \(b\): epochs: Input should be a valid integer"),
    "negative epochs": (GOOD.replace("  epochs: 1", "  epochs: -1"),
                        r"bad.yaml:3: trials\[0\] \(a\): epochs: Input should be greater than or equal to 0"),
    "duplicate names": (GOOD.replace("{name: b,", "{name: a,"), r"bad.yaml:6: trials\[1\]\.name: duplicate trial name 'a'"),
    "unknown clusterer": (GOOD + "  - {name: c, clusterers: [kmeans, dbscan]}\n",
                          r"bad.yaml:7: trials\[2\] \(c\): clusterers\[1\]: Input should be 'kmeans' or 'gmm'"),
    "empty grid": (GOOD + "grid:\n  seed: []\n", r"bad.yaml:8: grid.seed: empty list"),
    "same settings": (GOOD + "  - {name: c, epochs: 2}\n", r"bad.yaml:7: trials\[2\]: trial 'c' has the same settings as 'b'"),
    "no trials": ("experiment: t\ntrials: []\n", r"bad.yaml:2: trials: Tuple should have at least 1 item"),
    "bad architecture": (GOOD + "  - {name: c, model: {kind: conv, filters: [8]}}\n",
                         r"bad.yaml:7: trials\[2\] \(c\): model: kind conv needs filters"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_malformed_files_name_file_line_and_key(tmp_path, case):
    text, pattern = BAD[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=pattern):
        load_sweep(path)


def test_good_file_loads(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    assert [t.name for t in load_sweep(path).expand()] == ["a", "b"]


def test_cli_malformed_file_exit_2_starts_nothing(run_fmc, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD["unknown clusterer"][0])
    res = run_fmc("sweep", path)
    assert res.returncode == 2, res.stderr
    assert "bad.yaml:7" in res.stderr and "dbscan" not in res.stdout and "Traceback" not in res.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()


def test_cli_dry_run_lists_trials(run_fmc):
    res = run_fmc("sweep", SWEEPS / "paper_cases.yaml", "--dry-run", "--gpu", "0.25")
    assert res.returncode == 0, res.stderr
    assert "10 trials" in res.stdout and "0.25 GPU" in res.stdout and "case7" in res.stdout
