"""Search and early stopping beyond grids: Ray Tune's search algorithms and ASHA, on a real local Ray
and a real MLflow server on loopback. The sweep files are validated like the rest (file, line, key)."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml
from mlflow import MlflowClient

from conftest import FMC, ROOT
from fmnist_cluster.config import SpecError, load_sweep

SWEEPS = ROOT / "sweeps"

BASE = """\
experiment: bad-search
data: {subset: 300}
defaults: {model: {kind: conv, filters: [16, 8, 4]}, epochs: 3, batch_size: 32}
trials:
  - {name: base}
"""


def problems(tmp_path, text: str) -> str:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_sweep(path)
    return str(info.value)


def test_bad_distributions_name_file_line_key_and_value(tmp_path):
    text = BASE + """\
search: {algorithm: random, metric: gmm_bic, num_samples: 2}
space:
  learning_rate: {loguniform: [0, 1.0e-2]}
  epochs: {randint: [1, 2.5]}
  gmm.n_init: {normal: [1, 2]}
  batch_size: {choice: []}
  kmeans.max_iter: {uniform: [5, 1]}
"""
    msg = problems(tmp_path, text)
    path = tmp_path / "s.yaml"
    assert f"{path}:8: space.learning_rate: loguniform needs low > 0, got [0, 0.01]" in msg, msg
    assert f"{path}:9: space.epochs: randint takes two integers, got [1, 2.5]" in msg, msg
    assert f"{path}:10: space.gmm.n_init: a distribution is one of" in msg and "{'normal': [1, 2]}" in msg, msg
    assert f"{path}:11: space.batch_size: choice takes a non-empty list, got []" in msg, msg
    assert f"{path}:12: space.kmeans.max_iter: uniform: low must be below high, got [5, 1]" in msg, msg


def test_a_sampled_value_that_makes_the_trial_invalid_is_named(tmp_path):
    text = BASE + """\
search: {algorithm: optuna, metric: gmm_silhouette, num_samples: 2}
space:
  batch_size: {choice: [16, 1000]}
  model.filters: {choice: [[16, 8, 4], [8, 8]]}
  learning_rate: {loguniform: [1e-4, 1e-2]}
"""
    msg = problems(tmp_path, text)
    assert ":8: space.batch_size: batch_size = 1000 makes trial 'base' invalid: batch_size = 1000 is larger " \
           "than the 300 training images" in msg, msg
    assert ":9: space.model.filters: model.filters = [8, 8] makes trial 'base' invalid: kind conv needs " \
           "filters with at least 3 layers" in msg, msg
    assert "learning_rate" not in msg, msg  # 1e-4 (YAML text without a dot) is the number meant


@pytest.mark.parametrize("extra, expected", [
    ("space: {learning_rate: {uniform: [0.001, 0.01]}}\n", ":6: space: space is sampled by a search"),
    ("search: {num_samples: 2}\n", ":6: search: a search needs a space: section"),
    ("search: {num_samples: 2}\nspace: {learning_rate: {uniform: [0.001, 0.01]}}\nseeds: [0, 1]\n",
     ":8: seeds: seeds applies to grid sweeps"),
    ("search: {num_samples: 2, metric: val_loss}\nspace: {learning_rate: {uniform: [0.001, 0.01]}}\n",
     ":6: search.metric: metric 'val_loss' is not a trial's final value"),
    ("scheduler: {kind: asha, grace_period: 3}\n", ":6: scheduler.grace_period: grace_period = 3 leaves no epoch"),
    ("scheduler: {kind: asha, max_t: 9}\n", ":6: scheduler.max_t: max_t = 9 is past the trials' 3 epochs"),
    ("scheduler: {kind: hyperband}\n", ":6: scheduler.kind: Input should be 'asha'"),
    ("  - {name: whole, fit_split: all}\nscheduler: {kind: asha}\n",
     ":7: scheduler.metric: metric val_loss: trial 'whole' trains on all images (fit_split: all) and holds none out"),
])
def test_search_and_scheduler_sections_are_validated(tmp_path, extra, expected):
    msg = problems(tmp_path, BASE + extra)
    assert expected in msg, msg


def test_the_search_metric_decides_supervised_selection_and_direction():
    from fmnist_cluster.config import Search

    assert Search(metric="gmm_nmi").supervised and Search(metric="gmm_nmi").mode == "max"
    assert not Search(metric="gmm_bic").supervised and Search(metric="gmm_bic").mode == "min"
    assert Search(metric="kmeans_silhouette").mode == "max" and Search(metric="recon_mse").mode == "min"


# ---------------------------------------------------------------- on a real Ray and MLflow server

def _sweep(spec, env, cwd, *args, timeout=900):
    return subprocess.run(FMC + ["sweep", str(spec), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _children(client, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.`fmc.role` = 'trial'", max_results=1000)


@pytest.mark.slow
@pytest.mark.usefixtures("on_shared_ray")
def test_asha_stops_the_trailing_trial_which_finishes_scored_at_the_epoch_reached(mlflow_server, tmp_path):
    """Two trials one at a time, the second with a learning rate that barely moves the weights: ASHA
    stops it at its first rung (its validation loss trails the first trial's there); its run ends
    FINISHED, tagged, with its scores at epoch 1. Without the scheduler both would train 3 epochs."""
    spec = tmp_path / "asha.yaml"
    spec.write_text("""\
experiment: it-asha
data: {subset: 200}
defaults: {model: {kind: conv, filters: [16, 8, 4]}, epochs: 3, batch_size: 32, kmeans: {n_init: 2},
           gmm: {impl: fast, n_init: 1, covariance_type: diag}}
trials:
  - {name: learns, learning_rate: 3.0e-3}
  - {name: stalls, learning_rate: 1.0e-7}
scheduler: {kind: asha, metric: val_loss, mode: min, grace_period: 1, reduction_factor: 2}
resources: {cpu: 1}
max_concurrent: 1
""")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": mlflow_server}
    res = _sweep(spec, env, tmp_path, "--no-system-metrics")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = res.stdout[res.stdout.rindex("sweep finished"):]
    assert "stopped early at epoch 1" in table, table
    client = MlflowClient(mlflow_server)
    runs = {r.info.run_name: r for r in _children(client, "it-asha")}
    assert {n: r.info.status for n, r in runs.items()} == {"learns": "FINISHED", "stalls": "FINISHED"}
    stalls, learns = runs["stalls"], runs["learns"]
    assert stalls.data.tags["fmc.stopped_early"] == "true" and stalls.data.tags["fmc.epochs_trained"] == "1"
    assert "fmc.stopped_early" not in learns.data.tags
    assert [m.step for m in client.get_metric_history(stalls.info.run_id, "val_loss")] == [1]
    assert [m.step for m in client.get_metric_history(learns.info.run_id, "val_loss")] == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(stalls.info.run_id, "gmm_acc")] == [1]
    assert stalls.data.metrics["gmm_silhouette"] == stalls.data.metrics["gmm_silhouette"]  # a number, logged
    parent = client.get_run(stalls.data.tags["mlflow.parentRunId"])
    assert parent.data.params["scheduler.kind"] == "asha" and parent.data.params["scheduler.grace_period"] == "1"


@pytest.mark.slow
@pytest.mark.usefixtures("on_shared_ray")
@pytest.mark.parametrize("algorithm", ["optuna", "random"])
def test_the_shipped_search_runs_on_a_subset_and_resumes_by_drawing_again(mlflow_server, tmp_path, algorithm):
    """sweeps/search.yaml on a subset: Ray Tune draws the trials from the space (values within their
    distributions), each a child run with its label-free objective; the parent says the selection is
    label-free; (optuna) the same command again draws the same samples and runs none of them twice."""
    spec = yaml.safe_load((SWEEPS / "search.yaml").read_text())
    spec.update(experiment=f"it-search-{algorithm}", data={"subset": 200})
    spec["defaults"].update(epochs=2, batch_size=32, kmeans={"n_init": 2},
                            gmm={"impl": "fast", "n_init": 1, "covariance_type": "diag"})
    n = 3 if algorithm == "optuna" else 2
    spec["search"].update(algorithm=algorithm, num_samples=n)
    spec["space"]["batch_size"] = {"choice": [16, 32]}
    spec["space"]["model.filters"] = {"choice": [[16, 8, 4], [8, 8, 4]]}
    if algorithm == "optuna":
        spec["scheduler"].update(grace_period=1)
    else:  # the cheaper run: one epoch, no early stopping (the ASHA test above has it)
        spec["defaults"]["epochs"] = 1
        del spec["scheduler"]
    spec["resources"] = {"cpu": 1}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": mlflow_server}
    first = _sweep(path, env, tmp_path, "--no-system-metrics", "--max-concurrent", "2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    runs = _children(client, spec["experiment"])
    assert len(runs) == n and all(r.info.status == "FINISHED" for r in runs), [r.info for r in runs]
    for r in runs:
        assert 3.0e-4 <= float(r.data.params["learning_rate"]) <= 3.0e-3, r.data.params
        assert r.data.params["batch_size"] in ("16", "32") and r.data.params["model.filters"] in (
            "[16, 8, 4]", "[8, 8, 4]"), r.data.params
        assert r.info.run_name.startswith("conv-") and r.data.tags["fmc.trial_key"][:8] in r.info.run_name
        assert -1 <= r.data.metrics["gmm_silhouette"] <= 1
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert parent.data.tags["fmc.selection"] == "label-free"
    assert parent.data.params["search.algorithm"] == algorithm and parent.data.params["search.num_samples"] == str(n)
    assert "models:/" in first.stdout and f"it-search-{algorithm}@best" in first.stdout, first.stdout[-2000:]
    if algorithm == "random":
        return  # resuming draws again the same way for both algorithms: checked once, below, for optuna

    again = _sweep(path, env, tmp_path, "--no-system-metrics", "--max-concurrent", "2")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    table = again.stdout[again.stdout.rindex("sweep finished"):]
    assert table.count("SKIPPED") == n and "finished earlier" in table, table
    assert len(_children(client, spec["experiment"])) == n  # nothing ran twice
