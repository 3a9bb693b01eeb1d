from pathlib import Path

import pytest

from fmnist_cluster.config import SpecError, TrialConfig, deep_merge, load_sweep, load_trial

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
EXPECTED = {"paper_cases.yaml": 10, "paper_cases_seeds.yaml": 30, "extra_grids.yaml": 81, "quick.yaml": 4,
            "beyond.yaml": 30, "search.yaml": 1, "n2d_protocol.yaml": 12, "n2d_candidates.yaml": 15,
            "shuffle_order.yaml": 12, "n2d_order.yaml": 6}


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


def test_seeds_vary_training_and_data_together():
    """Every case of the seeds sweep runs with data.seed 0, 1 and 2 (its split changes), each equal to
    its training seed; and the reference mixture, as the study used."""
    trials = load_sweep(SWEEPS / "paper_cases_seeds.yaml").expand()
    by_case: dict[str, set] = {}
    for t in trials:
        assert t.config.data.seed == t.config.seed
        assert t.config.gmm.impl == "sklearn"
        by_case.setdefault(t.name.rsplit("-seed", 1)[0], set()).add(t.config.data.seed)
    assert len(by_case) == 10 and all(seeds == {0, 1, 2} for seeds in by_case.values())
    # and the data really differ: the first training image of seed 0 and seed 1
    from fmnist_cluster.data import load_dataset

    a, b = load_dataset(seed=0, subset=50), load_dataset(seed=1, subset=50)
    assert not (a.y_train == b.y_train).all()


@pytest.mark.parametrize("name", ["paper_cases_seeds.yaml", "extra_grids.yaml", "beyond.yaml"])
def test_files_over_seeds_vary_the_data_split_too(name):
    """A sweep file "over 3 seeds" varies the training seed and the data split together."""
    trials = load_sweep(SWEEPS / name).expand()
    assert {(t.config.seed, t.config.data.seed) for t in trials} == {(0, 0), (1, 1), (2, 2)}


def test_beyond_shares_training_between_manifolds():
    from fmnist_cluster.sweep import group_trials

    trials = load_sweep(SWEEPS / "beyond.yaml").expand()
    groups = group_trials(trials)
    assert len(groups) == 4 * 3  # 4 encoders (the n2d rows at 50 and 200 epochs share one) x 3 seeds
    n2d = next(g for g in groups if g[-1].name == "n2d-manifold-none-seed0")  # the lead: first of the longest
    assert {t.name for t in n2d} == {"n2d-e50-manifold-none-seed0", "n2d-e50-manifold-umap-seed0",
                                     "n2d-manifold-none-seed0", "n2d-manifold-umap-seed0"}
    assert [t.config.epochs for t in n2d] == [50, 50, 200, 200]
    umap = load_trial(SWEEPS / "beyond.yaml", "case5-manifold-umap-seed1").manifold
    assert (umap.kind, umap.n_components, umap.n_neighbors, umap.min_dist, umap.metric) == ("umap", 10, 20, 0.0, "euclidean")
    assert all(t.config.eval_split == "all" for t in trials)
    assert len(group_trials(trials, share_training=False)) == len(trials)


def test_manifold_settings_are_validated_and_logged():
    c = TrialConfig(manifold={"kind": "umap", "n_neighbors": 15})
    assert c.flat()["manifold.kind"] == "umap" and c.flat()["manifold.n_neighbors"] == 15
    assert c.flat()["manifold.n_components"] == 10 and c.flat()["manifold.min_dist"] == 0.0
    assert TrialConfig().flat()["manifold.kind"] == "none" and "manifold.n_neighbors" not in TrialConfig().flat()
    assert TrialConfig(manifold={"kind": "pca", "n_components": 5}).manifold.n_neighbors is None
    for bad, message in [({"kind": "tsne"}, "Input should be 'none', 'umap' or 'pca'"),
                         ({"kind": "pca", "n_neighbors": 5}, "n_neighbors apply to kind umap, not pca"),
                         ({"kind": "none", "n_components": 2}, "kind none has no settings"),
                         ({"kind": "umap", "n_neighbors": 1}, "greater than or equal to 2"),
                         ({"kind": "umap", "metric": "hamming"}, "Input should be 'euclidean'")]:
        with pytest.raises(ValueError, match=message):
            TrialConfig(manifold=bad)
    with pytest.raises(ValueError, match="n_neighbors = 20 needs more than 15 images"):
        TrialConfig(manifold={"kind": "umap"}, data={"subset": 15}, batch_size=8)


def test_one_clusterer_alone_and_what_eval_every_scores():
    """A GMM-only (or KMeans-only) trial validates, with or without eval_every; eval_every scores the
    trial's own clusterers unless eval_clusterers picks some of them."""
    assert TrialConfig(clusterers=["gmm"]).scored_during_training() == ("gmm",)
    assert TrialConfig(clusterers=["gmm"], eval_every=2).scored_during_training() == ("gmm",)
    assert TrialConfig(eval_every=2).scored_during_training() == ("kmeans", "gmm")
    assert TrialConfig(eval_every=2, eval_clusterers=["kmeans"]).scored_during_training() == ("kmeans",)
    assert "eval_clusterers" not in TrialConfig(clusterers=["gmm"]).flat()
    assert TrialConfig(model={"kind": "none"}, clusterers=["gmm"]).model.latent_dim() == 784


def test_keys_survive_new_settings_and_training_keys_group():
    """Settings at their defaults stay out of the key: adding one (with an old-behaviour default)
    keeps recorded trials' keys. Trials differing only after training share a training key."""
    base = TrialConfig()
    assert base.key() == TrialConfig(manifold={"kind": "none"}, eval_every=0).key()
    assert base.key() != TrialConfig(manifold={"kind": "umap"}).key()
    same_training = [TrialConfig(epochs=25), TrialConfig(manifold={"kind": "pca"}), TrialConfig(eval_split="all"),
                     TrialConfig(clusterers=["kmeans"])]
    assert {c.training_key() for c in same_training} == {base.training_key()}
    for other in (TrialConfig(seed=1), TrialConfig(batch_size=64), TrialConfig(data={"seed": 2}),
                  TrialConfig(model={"kind": "conv", "filters": [64, 32, 16, 7], "latent_activation": "linear"})):
        assert other.training_key() != base.training_key()


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
    "select not a score": (GOOD + "select: {metric: gmm_purity}\n",
                           r"bad.yaml:\d+: select: metric 'gmm_purity' is not a clusterer's score or criterion; "
                           r"one of kmeans_acc.*gmm_bic"),
    "select mode": (GOOD + "select: {metric: kmeans_nmi, mode: up}\n",
                    r"bad.yaml:\d+: select.mode: Input should be 'max' or 'min'"),
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
    # the offending value is in the message
    "value named": (GOOD + "  - {name: c, clusterers: [kmeans, dbscan]}\n", r"or 'gmm', got 'dbscan'"),
    "kind value named": (GOOD + "  - {name: c, model: {kind: transformer}}\n",
                         r"bad.yaml:7: trials\[2\] \(c\): model.kind: Input should be 'conv', 'dense' or 'none', got 'transformer'"),
    "slash in name": (GOOD + "  - {name: a/b}\n", r"bad.yaml:7: trials\[2\].name: trial name 'a/b' cannot be a folder name"),
    "space in name": (GOOD + "  - {name: my trial}\n", r"bad.yaml:7: .*'my trial' cannot be a folder name"),
    "duplicate key": (GOOD + "experiment: u\n", r"bad.yaml:7: YAML syntax error: duplicate key 'experiment'"),
    "subset below clusters": (GOOD + "  - {name: c, data: {subset: 5}}\n",
                              r"bad.yaml:7: trials\[2\] \(c\): data.subset = 5 leaves 5 images to cluster into n_clusters = 10"),
    "batch above subset": (GOOD + "  - {name: c, data: {subset: 100}, batch_size: 128}\n",
                           r"batch_size = 128 is larger than the 100 training images"),
    "seeds and grid seed": (GOOD + "seeds: [0, 1]\ngrid:\n  seed: [0, 1]\n", r"bad.yaml:9: grid.seed: grid.seed and seeds"),
    "seeds and trial seed": (GOOD.replace("{name: b, epochs: 2}", "{name: b, seed: 3}") + "seeds: [0, 1]\n",
                             r"bad.yaml:6: trials\[1\].seed: seeds is set"),
    "eval without training": (GOOD + "  - {name: c, model: {kind: none}, eval_every: 2}\n",
                              r"eval_every = 2: raw pixels train nothing"),
    "eval clusterers without eval": (GOOD + "  - {name: c, eval_clusterers: [gmm]}\n",
                                     r"bad.yaml:7: trials\[2\] \(c\): eval_clusterers applies only with eval_every"),
    "eval clusterer not run": (GOOD + "  - {name: c, clusterers: [gmm], eval_every: 1, eval_clusterers: [kmeans]}\n",
                               r"eval_clusterers \['kmeans'\] must be among clusterers \['gmm'\]"),
    "pca above the code": (GOOD + "  - {name: c, model: {kind: dense, units: [16, 4]}, manifold: {kind: pca, n_components: 5}}\n",
                           r"bad.yaml:7: .*manifold.n_components = 5 is larger than the 4 features of the codes"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_malformed_files_name_file_line_and_key(tmp_path, case):
    text, pattern = BAD[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=pattern):
        load_sweep(path)


def test_seeds_expand_names_and_both_seeds(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(GOOD + "seeds: [4, 7]\n")
    trials = load_sweep(path).expand()
    assert [t.name for t in trials] == ["a-seed4", "a-seed7", "b-seed4", "b-seed7"]
    assert [(t.config.seed, t.config.data.seed) for t in trials] == [(4, 4), (7, 7), (4, 4), (7, 7)]


def test_not_utf8_is_a_spec_error(tmp_path, run_fmc):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(GOOD.encode() + "# caf\xe9\n".encode("latin-1"))
    with pytest.raises(SpecError, match=r"latin1.yaml:7: not UTF-8 text \(byte 0xe9"):
        load_sweep(path)
    res = run_fmc("sweep", path)
    assert res.returncode == 2 and "not UTF-8" in res.stderr and "Traceback" not in res.stderr


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
    assert "6 Ray trials" in res.stdout  # cases 1-4 share one training, cases 5-6 another
    some = run_fmc("sweep", SWEEPS / "paper_cases_seeds.yaml", "--dry-run", "--trials", "case1-*,raw-test-seed0")
    assert some.returncode == 0 and "4 trials" in some.stdout and "case2" not in some.stdout
    bad = run_fmc("sweep", SWEEPS / "paper_cases.yaml", "--dry-run", "--trials", "case9")
    assert bad.returncode == 2 and "case9 matches no trial" in bad.stderr
