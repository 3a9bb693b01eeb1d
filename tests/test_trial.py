import re

import numpy as np
import pytest

from fmnist_cluster.config import TrialConfig
from fmnist_cluster.data import load_dataset
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
