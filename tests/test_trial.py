import json
import re

import numpy as np
import pytest

from fmnist_cluster.config import TrialConfig
from fmnist_cluster.data import load_dataset
from fmnist_cluster.machine import cpu_id
from fmnist_cluster.trial import run_trial

SCORES = ["acc", "acc_majority", "nmi", "ari"]


@pytest.fixture(scope="module")
def small():
    return load_dataset(seed=0, subset=300)


@pytest.fixture(autouse=True)
def close_figures():
    """run_trial hands its figures to the caller (the tracking adapter closes them after logging);
    here the test is the caller."""
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def tiny(**kw):
    return TrialConfig(**{"epochs": 1, "data": {"subset": 300}, "kmeans": {"n_init": 2},
                          "gmm": {"n_init": 1, "covariance_type": "diag"}, **kw})


@pytest.mark.parametrize("model", [{"kind": "conv", "filters": [64, 32, 16, 7]},
                                   {"kind": "dense", "units": [128, 64, 32]}, {"kind": "none"}],
                         ids=["conv", "dense", "none"])
def test_trial_end_to_end(small, model):
    epochs = []
    result = run_trial(tiny(model=model), data=small, threads=2, on_epoch=lambda e, v: epochs.append((e, v)))
    for c in ("kmeans", "gmm"):
        for s in SCORES:
            value = result.metrics[f"{c}_{s}"]
            assert isinstance(value, float) and -0.5 <= value <= 1
        assert result.metrics[f"{c}_acc"] <= result.metrics[f"{c}_acc_majority"]
        assert result.confusion[f"{c}_hungarian"].sum() == 300
        assert result.metrics[f"{c}_acc"] > 0.2  # far above chance (0.1) even on 300 images
    assert "pca" in result.figures and "confusion_gmm_majority" in result.figures
    if model["kind"] == "none":
        assert "recon_mse" not in result.metrics and "autoencoder" not in result.models
        assert result.config.epochs == 0
    else:
        assert [e for e, _ in epochs] == [1] and len(result.history["loss"]) == 1
        assert 0 < result.metrics["recon_mse"] < 0.5
        assert result.timings["train_seconds"] > 0
        assert result.figures.keys() >= {"reconstructions", "loss"}


def test_same_seed_same_metrics(small):
    a = run_trial(tiny(seed=3), data=small, threads=2, figures=False)
    b = run_trial(tiny(seed=3), data=small, threads=2, figures=False)
    assert a.metrics == b.metrics
    assert a.history["loss"] == b.history["loss"]


def test_eval_split_all_scores_every_image(small):
    result = run_trial(tiny(model={"kind": "none"}, eval_split="all", clusterers=["kmeans"]), data=small,
                       figures=False)
    assert result.info["n_eval"] == 300 + 75 + 300
    assert result.confusion["kmeans_majority"].sum() == 675


def test_fit_split_all_trains_on_every_image_and_holds_none_out(small):
    """N2D's protocol: the autoencoder fits all 70,000 images (here the subset's 675), so there is no
    val_loss; the study's default fits the 300 training images and reports val_loss on the 75 held out."""
    default = run_trial(tiny(clusterers=["kmeans"]), data=small, threads=2, figures=False)
    assert (default.info["n_train"], default.info["n_val"]) == (300, 75) and len(default.history["val_loss"]) == 1
    epochs = []
    whole = run_trial(tiny(clusterers=["kmeans"], fit_split="all"), data=small, threads=2, figures=False,
                      on_epoch=lambda e, v: epochs.append(v))
    assert (whole.info["n_train"], whole.info["n_val"]) == (675, 0)
    assert "val_loss" not in whole.history and "val_loss" not in epochs[0] and epochs[0]["loss"] > 0
    assert whole.history["loss"] != default.history["loss"]  # other images, other weights
    assert whole.config.key() != default.config.key() and whole.config.training_key() != default.config.training_key()
    # raw pixels train nothing: the setting is moot and does not split their key
    assert tiny(model={"kind": "none"}, fit_split="all").key() == tiny(model={"kind": "none"}).key()


def test_diverged_codes_are_reported(small):
    from fmnist_cluster.clustering import fit_predict

    codes = np.zeros((20, 4))
    codes[3, 1] = np.nan
    with pytest.raises(FloatingPointError, match="NaN"):
        fit_predict("kmeans", tiny(), codes)


# the prefix of a line from TensorFlow's C++ core (absl logging): 'I0000 00:00:1796150775.545295    5056 file.cc:31] '.
# What those lines say depends on the CPU (oneDNN on Intel, "Could not find cuda drivers" on AMD), their form does not.
CPP_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:[\d.]+\s+\d+ [\w.-]+:\d+\] ")


def test_run_is_quiet_off_a_terminal(run_fmc):
    """Off a terminal `fmc run` writes one line per epoch and none of the backend's C++ log lines;
    --verbose lets those through."""
    args = ["run", "--kind", "dense", "--units", "32,8", "--epochs", "3", "--subset", "200", "--no-track"]
    res = run_fmc(*args)
    assert res.returncode == 0, res.stderr[-2000:]
    said = res.stdout + res.stderr
    assert not [line for line in said.splitlines() if CPP_LOG_LINE.match(line)], said[-2000:]
    assert sum("loss:" in line for line in said.splitlines()) == 3  # one line per epoch, no progress bar
    assert "━" not in res.stderr and "\r" not in said
    loud = run_fmc(*args, "--verbose")
    assert loud.returncode == 0 and any(CPP_LOG_LINE.match(line) for line in loud.stderr.splitlines()), \
        loud.stderr[-2000:]


def test_a_single_clusterer_runs_with_eval_every(run_fmc):
    """`fmc run --clusterers gmm` (a GMM-only trial) scores the mixture alone, also during training."""
    res = run_fmc("run", "--kind", "dense", "--units", "32,8", "--epochs", "2", "--subset", "200",
                  "--clusterers", "gmm", "--eval-every", "1", "--gmm-n-init", "1", "--no-track")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line.split()[1] for line in res.stdout.splitlines() if line.startswith("│")]
    assert rows == ["gmm"], res.stdout


def test_a_trials_scoring_failure_during_training_fails_that_trial_only(small, monkeypatch):
    """In a group sharing one training, scoring one trial's codes during eval_every fails (as a mixture
    whose component collapses would): that trial is handed over once as failed, the other is scored at
    every epoch and finishes, and training stops once no trial needs more epochs."""
    from fmnist_cluster import trial
    from fmnist_cluster.trial import run_group

    score = trial._score_codes

    def collapsing(config, state, clusterers):
        if config.manifold.kind == "pca":
            raise ValueError("Fitting the mixture model failed: ill-defined empirical covariance")
        return score(config, state, clusterers)

    monkeypatch.setattr(trial, "_score_codes", collapsing)
    base = {"model": {"kind": "dense", "units": [32, 8]}, "eval_every": 1, "clusterers": ["kmeans"]}
    short, failing = tiny(**base, epochs=2), tiny(**base, epochs=4, manifold={"kind": "pca", "n_components": 4})
    handed, epochs = [], []
    run_group([short, failing], data=small, threads=2, figures=False, on_epoch=lambda e, v: epochs.append(e),
              on_result=lambda config, result, error: handed.append((config.epochs, result, error)))
    (failed,) = [(e, err) for e, r, err in handed if err is not None]
    assert failed[0] == 4 and "ill-defined" in str(failed[1])
    ((_, result, _),) = [h for h in handed if h[2] is None]
    assert result.config == short and sorted(result.evals) == [1, 2]
    assert epochs == [1, 2]  # the failed trial's two remaining epochs were not trained


def test_an_interrupted_training_goes_on_from_its_checkpoint(small, tmp_path):
    """A group of two trials (2 and 4 epochs) is interrupted in its fourth epoch: the 2-epoch trial is
    scored, the epoch-2 checkpoint (a trial ends there) and the last one (3) are kept. Run again, the
    2-epoch trial resumes at its own epoch and trains nothing; the 4-epoch trial goes on from epoch 3
    with the weights and the optimizer's state of the checkpoint, its first three epochs' losses and
    scores replayed as they were; its checkpoints go when it has finished."""
    from fmnist_cluster.checkpoints import TrainingCheckpoints
    from fmnist_cluster.trial import run_group

    base = {"model": {"kind": "dense", "units": [32, 8]}, "eval_every": 1, "clusterers": ["kmeans"],
            "batch_size": 64}
    short, long = tiny(**base, epochs=2), tiny(**base, epochs=4)
    ckpt = TrainingCheckpoints(tmp_path, long.training_key())
    first, handed, scored = [], [], {}

    def stop():  # Ctrl-C during epoch 4
        return "interrupt" if len(first) == 3 else None

    with pytest.raises(KeyboardInterrupt):
        run_group([short, long], data=small, threads=2, figures=False, checkpoint_dir=tmp_path, stop=stop,
                  on_epoch=lambda e, v: first.append(v), on_result=lambda c, r, err: handed.append((c, r, err)),
                  on_eval=lambda c, e, s: scored.update({e: s}) if c == long else None)
    assert [(c.epochs, err) for c, _, err in handed] == [(2, None)]
    assert ckpt.epochs() == [2, 3]  # epoch 1 dropped once epoch 2 was written; 2 is a trial's end
    meta = ckpt.folder / "epoch-0003.json"
    saved = json.loads(meta.read_text())
    assert saved["epoch_cpus"] == [cpu_id()] * 3  # the CPU of every epoch trained
    other = "family 0 model 0 stepping 0, none"  # as if another machine had trained these three epochs
    meta.write_text(json.dumps({**saved, "epoch_cpus": [other] * 3}))

    again = []
    run_group([short], data=small, threads=2, figures=False, checkpoint_dir=tmp_path,
              on_epoch=lambda e, v: again.append(e), on_result=lambda c, r, err: handed.append((c, r, err)))
    _, rerun, error = handed[-1]
    assert error is None and rerun.info["resumed_from_epoch"] == 2 and again == [1, 2]
    assert rerun.info["trained_on"] == f"1-2 {cpu_id()}"
    assert rerun.history["loss"] == [v["loss"] for v in first[:2]]

    replayed, evals = [], {}
    result = run_trial(long, data=small, threads=2, figures=False, checkpoint_dir=tmp_path,
                       on_epoch=lambda e, v: replayed.append((e, v)), on_eval=lambda e, s: evals.update({e: s}))
    assert result.info["resumed_from_epoch"] == 3
    assert result.info["trained_on"] == f"1-3 {other}; 4 {cpu_id()}"  # which machine trained which epochs
    assert [e for e, _ in replayed] == [1, 2, 3, 4] and [v for _, v in replayed[:3]] == first
    assert result.history["loss"][:3] == [v["loss"] for v in first] and len(result.history["val_loss"]) == 4
    assert evals == scored and sorted(evals) == [1, 2, 3]  # the scores during training, replayed
    assert sorted(result.evals) == [1, 2, 3, 4] and result.evals[3] == scored[3]
    steps = -(-len(small.y_train) // 64)  # batches per epoch
    assert int(result.models["autoencoder"].optimizer.iterations) == 4 * steps  # Adam went on from 3 epochs
    assert not ckpt.folder.exists()


def test_an_unreadable_checkpoint_is_named_and_nothing_trains(run_fmc, tmp_path):
    """`fmc run --checkpoint-dir` over a checkpoint that is not a Keras file: exit 1, one message that
    names the file and what to remove."""
    config = TrialConfig(model={"kind": "dense", "units": [32, 8]}, epochs=3, data={"subset": 200})
    folder = tmp_path / "ckpt" / config.training_key()
    folder.mkdir(parents=True)
    (folder / "epoch-0001.keras").write_bytes(b"not a zip")
    (folder / "epoch-0001.json").write_text('{"epoch": 1, "history": {}, "evals": {}, "eval_seconds": 0}')
    res = run_fmc("run", "--kind", "dense", "--units", "32,8", "--epochs", "3", "--subset", "200", "--no-track",
                  "--checkpoint-dir", tmp_path / "ckpt")
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert "epoch-0001.keras cannot be read" in res.stderr and f"remove {folder}" in " ".join(res.stderr.split())
    assert "loss:" not in res.stdout


def test_entropy_merge_joins_the_components_the_mixture_tells_apart_least():
    """Four components: 0 and 1 share their images half and half (the mixture cannot tell them apart),
    2 and 3 overlap a little, and each is sure elsewhere. Merged into 3: {0, 1}; into 2: {0, 1}, {2, 3}."""
    from fmnist_cluster.clustering import entropy_merge

    sure = np.eye(4)[np.repeat(np.arange(4), 50)]  # 200 images, 50 sure of each component
    halves = np.tile([0.5, 0.5, 0.0, 0.0], (40, 1))
    little = np.tile([0.0, 0.0, 0.8, 0.2], (10, 1))
    proba = np.concatenate([sure, halves, little])
    assert entropy_merge(proba, 3).tolist() == [0, 0, 1, 2]
    assert entropy_merge(proba, 2).tolist() == [0, 0, 1, 1]
    assert entropy_merge(proba, 4).tolist() == [0, 1, 2, 3]


def test_more_mixture_components_merge_into_the_clusters_and_serve_so(small, tmp_path):
    """gmm.components: 20 fits twenty components and merges them into ten clusters without labels;
    the logged model (skops) keeps the twenty and the merge, and the served model answers the trial's
    own clusters with ten probabilities that sum to one."""
    from types import SimpleNamespace

    import skops.io

    from tracking.pyfunc_model import EncoderClusterer

    config = tiny(model={"kind": "none"}, gmm={"n_init": 1, "covariance_type": "diag", "components": 20})
    result = run_trial(config, data=small, figures=False)
    gmm = result.models["gmm"]
    assert gmm.n_components == 20 and sorted(set(gmm.fmc_merged_into_.tolist())) == list(range(10))
    assert set(result.labels["gmm"].tolist()) <= set(range(10)) and result.confusion["gmm_hungarian"].shape == (10, 10)
    assert {"gmm_acc", "gmm_nmi", "gmm_bic", "gmm_loglik"} <= set(result.metrics)
    path = tmp_path / "gmm.skops"
    skops.io.dump(gmm, path)
    served = EncoderClusterer()
    served.load_context(SimpleNamespace(artifacts={"clusterer": str(path)}))
    x_eval, _ = small.split(config.eval_split)
    out = served.predict(None, x_eval.reshape(len(x_eval), 784))
    assert out["cluster"].tolist() == result.labels["gmm"].tolist()
    probs = out[[f"prob_{k}" for k in range(10)]].to_numpy()
    assert probs.shape[1] == 10 and np.allclose(probs.sum(axis=1), 1)
    assert result.metrics["gmm_components"] == 20
    with pytest.raises(ValueError, match="fewer than n_clusters"):
        tiny(gmm={"components": 5})


def test_bic_chooses_how_many_components_are_merged(small):
    """gmm.components as a list: a mixture of each size is fitted and the one of lowest BIC is merged
    into the clusters; the trial says which size it took."""
    from fmnist_cluster.clustering import make_clusterer

    sizes = [10, 12, 16]
    config = tiny(model={"kind": "none"}, clusterers=["gmm"],
                  gmm={"n_init": 1, "covariance_type": "diag", "components": sizes})
    result = run_trial(config, data=small, figures=False)
    x_eval, _ = small.split(config.eval_split)
    codes = x_eval.reshape(len(x_eval), -1).astype(np.float64)
    bics = {k: make_clusterer("gmm", config, components=k).fit(codes).bic(codes) for k in sizes}
    chosen = min(bics, key=bics.get)
    assert result.models["gmm"].n_components == result.metrics["gmm_components"] == chosen
    assert set(result.labels["gmm"].tolist()) <= set(range(10))
    for bad in ([], [12, 12], [8, 12]):
        with pytest.raises(ValueError):
            tiny(gmm={"components": bad})


def test_trials_of_a_group_share_one_manifold_fit_and_score_as_alone(small):
    """Two trials on one training, the same UMAP settings, different mixtures: UMAP is fitted once for
    both (the same reducer), and the plain trial's scores are those it gets alone."""
    from fmnist_cluster.trial import run_group

    base = {"model": {"kind": "dense", "units": [32, 8]}, "clusterers": ["gmm"], "epochs": 2,
            "manifold": {"kind": "umap", "n_neighbors": 10}}
    plain, merged = tiny(**base), tiny(**{**base, "gmm": {"n_init": 1, "covariance_type": "diag", "components": 12}})
    results = {}
    run_group([plain, merged], data=small, threads=2, figures=False,
              on_result=lambda c, r, err: results.update({c.key(): (r, err)}))
    (a, err_a), (b, err_b) = results[plain.key()], results[merged.key()]
    assert err_a is None and err_b is None
    assert a.models["manifold"] is b.models["manifold"] and a.timings["manifold_seconds"] == b.timings["manifold_seconds"]
    alone = run_trial(plain, data=small, threads=2, figures=False)
    assert {k: v for k, v in alone.metrics.items() if k.startswith("gmm_")} == \
        {k: v for k, v in a.metrics.items() if k.startswith("gmm_")}


def test_dec_refines_a_copy_of_the_encoder_and_its_codes_are_clustered(small):
    """dec.epochs: the encoder's copy trains on the clustering loss after the autoencoder; the trial
    clusters the refined codes (they differ from the pretrained ones) and keeps the pretrained
    encoder untouched for the other trials of its training; the refinement's iterations are logged."""
    from fmnist_cluster.trial import run_group

    base = {"model": {"kind": "dense", "units": [32, 8]}, "clusterers": ["kmeans"], "epochs": 2, "batch_size": 32}
    plain, dec = tiny(**base), tiny(**base, dec={"epochs": 3, "update_interval": 5})
    results = {}
    run_group([dec, plain], data=small, threads=2, figures=False,  # dec scored first: plain must not see it
              on_result=lambda c, r, err: results.update({c.key(): (r, err)}))
    (a, err_a), (b, err_b) = results[plain.key()], results[dec.key()]
    assert err_a is None and err_b is None, (err_a, err_b)
    x_eval, _ = small.split("test")
    pretrained = a.models["encoder"].predict(x_eval, verbose=0)
    refined = b.models["encoder"].predict(x_eval, verbose=0)
    assert b.models["encoder"] is not a.models["encoder"] and not np.allclose(pretrained, refined)
    assert b.models["autoencoder"] is a.models["autoencoder"]  # the autoencoder stays the pretrained one
    steps = -(-len(x_eval) // 32)
    assert 0 < b.metrics["dec_iterations"] <= 3 * steps and b.metrics["dec_epochs"] == b.metrics["dec_iterations"] / steps
    assert b.timings["dec_seconds"] > 0 and "dec_iterations" not in a.metrics
    alone = run_trial(plain, data=small, threads=2, figures=False)
    assert alone.metrics["kmeans_acc"] == a.metrics["kmeans_acc"]  # the other trial saw the pretrained codes
    for bad in ({"model": {"kind": "none"}, "dec": {"epochs": 1}}, {"dec": {"epochs": 1}, "eval_every": 1}):
        with pytest.raises(ValueError):
            tiny(**bad)


def test_keras_draws_one_training_order_per_fit_under_a_seed():
    """What ``shuffle: once`` (the default) is: Keras' TensorFlow backend, with fmc's seeding, shuffles
    fit()'s arrays once, and every epoch sees the same batches in the same order. docs/results.md and
    the README say so; a Keras that reshuffles each epoch fails this test and changes what `once` means."""
    import keras

    seen = []

    class Record(keras.layers.Layer):
        def call(self, x):
            seen.append(np.asarray(x).ravel().tolist())
            return x

    keras.utils.set_random_seed(3)
    x = np.arange(20, dtype="float32").reshape(20, 1)
    model = keras.Sequential([keras.Input((1,)), Record(), keras.layers.Dense(1)])
    model.compile("adam", "mse", run_eagerly=True)
    model.fit(x, x, batch_size=5, epochs=3, shuffle=True, verbose=0)
    epochs = [sum(seen[e * 4:(e + 1) * 4], []) for e in range(3)]
    assert sorted(epochs[0]) == list(range(20)) and epochs[0] != list(range(20))  # shuffled, once
    assert epochs[0] == epochs[1] == epochs[2]


def test_shuffle_epoch_gives_every_epoch_its_own_order_and_resumes_exactly(small, tmp_path):
    """``shuffle: epoch``: each epoch's order is drawn from the seed and the epoch, so the training
    differs from ``once`` and a training interrupted after epoch 2 and resumed from its checkpoint
    ends with the losses and weights of an unbroken one. The default's training key is unchanged."""
    from fmnist_cluster.trial import epoch_order, run_group

    orders = [epoch_order(0, e, 300) for e in range(3)]
    assert all(sorted(o) == list(range(300)) for o in orders)
    assert not np.array_equal(orders[0], orders[1]) and np.array_equal(orders[1], epoch_order(0, 1, 300))

    base = {"model": {"kind": "dense", "units": [32, 8]}, "clusterers": ["kmeans"], "batch_size": 64, "epochs": 3}
    once, each = tiny(**base), tiny(**base, shuffle="epoch")
    assert "shuffle" not in once.training() and once.training_key() != each.training_key()
    assert once.key() == tiny(**base, shuffle="once").key()
    unbroken = run_trial(each, data=small, threads=2, figures=False)
    fixed = run_trial(once, data=small, threads=2, figures=False)
    assert len(unbroken.history["loss"]) == 3 and unbroken.history["loss"] != fixed.history["loss"]

    losses = []
    with pytest.raises(KeyboardInterrupt):
        run_group([each], data=small, threads=2, figures=False, checkpoint_dir=tmp_path,
                  stop=lambda: "interrupt" if len(losses) == 2 else None,
                  on_epoch=lambda e, v: losses.append(v["loss"]), on_result=lambda c, r, err: None)
    assert losses == unbroken.history["loss"][:2]
    resumed = run_trial(each, data=small, threads=2, figures=False, checkpoint_dir=tmp_path)
    assert resumed.info["resumed_from_epoch"] == 2
    assert resumed.history["loss"] == unbroken.history["loss"] and resumed.metrics == unbroken.metrics
    for a, b in zip(resumed.models["autoencoder"].get_weights(), unbroken.models["autoencoder"].get_weights()):
        np.testing.assert_array_equal(a, b)
