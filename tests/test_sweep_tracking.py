"""Sweeps on a real local Ray, tracked in a real MLflow server on loopback (no mocks)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import FMC, ROOT, free_port, stop, wait_http
from tracking.store import cpu_id, cpu_model

# real Ray and MLflow servers, minutes (`make test-fast` leaves these out); sweeps join one shared Ray
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("on_shared_ray")]

SWEEP = """\
experiment: {experiment}
data: {{subset: 200, seed: 0}}
defaults:
  model: {{kind: conv, filters: [16, 8, 4]}}
  epochs: 2
  kmeans: {{n_init: 2}}
  gmm: {{n_init: 1, covariance_type: diag}}
trials:
  # the fast mixture's model logs and serves like scikit-learn's; scored during training too
  - {{name: conv, gmm: {{impl: fast}}, eval_every: 1, eval_clusterers: [kmeans]}}
  # differs from conv only in its epochs: scored on conv's training, at epoch 1
  - {{name: conv-short, gmm: {{impl: fast}}, eval_every: 1, epochs: 1}}
  # a UMAP stage before the clusterers; also on conv's training (it differs only after training)
  - {{name: conv-umap, gmm: {{impl: fast}}, eval_every: 1, manifold: {{kind: umap, n_neighbors: 10}}}}
  - {{name: raw, model: {{kind: none}}}}
  # one clusterer alone (the mixture): no KMeans anywhere in its run
  - {{name: raw-gmm, model: {{kind: none}}, clusterers: [gmm]}}
  # a learning rate this large makes the loss NaN: a trial that validates but crashes at run time
  - {{name: broken, model: {{kind: dense, units: [16, 8, 4]}}, learning_rate: 1.0e+30, epochs: 1}}
resources: {{cpu: 1}}
max_concurrent: 2
"""
SCORE_METRICS = [f"{c}_{s}" for c in ("kmeans", "gmm") for s in ("acc", "acc_majority", "nmi", "ari")]


def runs_by_name(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    out = {}
    for r in runs:
        out.setdefault(r.info.run_name, []).append(r)
    return out


@pytest.fixture(scope="module")
def tracked_sweep(mlflow_server, on_shared_ray, tmp_path_factory):
    """One sweep of 3 tiny trials, 2 at a time, against the server; one trial crashes."""
    cwd = tmp_path_factory.mktemp("sweep")
    spec = cwd / "it.yaml"
    spec.write_text(SWEEP.format(experiment="it-sweep"))
    # system metrics every second: these trials last seconds, not the default 10
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": mlflow_server,
           "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    res = subprocess.run(FMC + ["sweep", str(spec), "--max-concurrent", "2"], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=900)
    return res, spec, cwd, env


def test_failing_trial_does_not_stop_the_others(tracked_sweep):
    res, *_ = tracked_sweep
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    table = res.stdout[res.stdout.rindex("sweep finished"):]
    rows = [line for line in table.splitlines() if line.startswith("│")]
    assert [r.split("│")[1].strip() for r in rows] == ["conv", "conv-short", "conv-umap", "raw", "raw-gmm", "broken"]
    assert sum("FINISHED" in r for r in rows) == 5 and sum("FAILED" in r for r in rows) == 1
    # the trial's own error, not Ray's wrapper, in full on one line below the table
    (said,) = [line for line in table.splitlines() if line.startswith("FAILED broken:")]
    assert "training loss is nan" in said


def test_runs_layout_metrics_and_artifacts(tracked_sweep, mlflow_server):
    client = MlflowClient(mlflow_server)
    runs = runs_by_name(client, "it-sweep")
    parents = [r for rs in runs.values() for r in rs if r.data.tags.get("fmc.role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    parent_id = parents[0].info.run_id
    conv, raw, broken = runs["conv"][0], runs["raw"][0], runs["broken"][0]
    for r in (conv, raw, broken):
        assert r.data.tags["mlflow.parentRunId"] == parent_id
        assert r.data.tags["fmc.sweep"] == "it-sweep" and len(r.data.tags["fmc.trial_key"]) == 16
        assert r.data.tags["fmc.cpu"] == cpu_model()  # the CPU kind changes the training: on every record
        assert r.data.tags["fmc.cpu_id"] == cpu_id() and cpu_id().startswith("family ")
        assert r.data.tags["fmc.host"] and r.data.tags["fmc.keras_backend"] == ("none" if r is raw else "tensorflow")
    assert conv.info.status == "FINISHED" and raw.info.status == "FINISHED"
    assert broken.info.status == "FAILED" and "diverged" in broken.data.tags["fmc.error"]
    assert "error/traceback.txt" in [a.path for a in client.list_artifacts(broken.info.run_id, "error")]

    m = conv.data.metrics
    for name in SCORE_METRICS:
        assert name in m and -0.5 <= m[name] <= 1 and name in raw.data.metrics
    for name in ("recon_mse", "train_seconds", "kmeans_seconds", "gmm_seconds"):
        assert name in m
    loss = client.get_metric_history(conv.info.run_id, "loss")
    assert sorted(x.step for x in loss) == [1, 2]
    assert len(client.get_metric_history(conv.info.run_id, "val_loss")) == 2
    assert conv.data.params["model.filters"] == "[16, 8, 4]" and conv.data.params["epochs"] == "2"
    assert conv.data.params["data.subset"] == "200"

    files = {a.path for d in ("confusion", "plots") for a in client.list_artifacts(conv.info.run_id, d)}
    assert {"confusion/kmeans_hungarian.json", "confusion/kmeans_hungarian.png", "confusion/gmm_majority.png",
            "plots/pca.png", "plots/reconstructions.png", "plots/loss.png"} <= files
    path = client.download_artifacts(conv.info.run_id, "confusion/kmeans_majority.json")
    matrix = np.array(json.load(open(path))["matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 200
    assert "summary.json" in [a.path for a in client.list_artifacts(parent_id)]
    assert "plots/comparison.png" in [a.path for a in client.list_artifacts(parent_id, "plots")]
    # the parent carries the sweep's best scores, so that MLflow's table sorts sweeps
    best = parents[0].data.metrics
    assert best["best_gmm_acc"] == max(r.data.metrics["gmm_acc"] for name in ("conv", "raw", "conv-short", "conv-umap",
                                                                             "raw-gmm") for r in runs[name])
    gmm_only = runs["raw-gmm"][0]
    assert gmm_only.info.status == "FINISHED" and not [k for k in gmm_only.data.metrics if k.startswith("kmeans")]
    assert all(f"gmm_{s}" in gmm_only.data.metrics for s in ("acc", "acc_majority", "nmi", "ari"))


def test_runs_show_their_datasets_and_models_their_scores(tracked_sweep, mlflow_server):
    """Every trial logs what it read as MLflow dataset inputs (the runs table's Dataset column), with a
    digest from the files' checksums and the split; each clusterer model carries its scores, so that
    search_logged_models (the Models page) orders models by a score."""
    import mlflow

    from fmnist_cluster.data import dataset_inputs

    client = MlflowClient(mlflow_server)
    runs = runs_by_name(client, "it-sweep")
    expected = dataset_inputs(0, 200, "test")
    assert [d["context"] for d in expected] == ["training", "evaluation"]
    for name in ("conv", "raw", "broken"):  # a failed trial too: it read the same images
        run = client.get_run(runs[name][0].info.run_id)
        got = sorted((d.dataset.name, d.dataset.digest, {t.key: t.value for t in d.tags}["mlflow.data.context"])
                     for d in run.inputs.dataset_inputs)
        assert got == sorted((d["name"], d["digest"], d["context"]) for d in expected), (name, got)
    # another split is another digest: the same name never hides different images
    digests = {d["digest"] for seed, subset in ((0, 200), (1, 200), (0, 400), (0, None))
               for d in dataset_inputs(seed, subset, "test")}
    assert len(digests) == 8

    mlflow.set_tracking_uri(mlflow_server)
    exp = runs["conv"][0].info.experiment_id
    models = mlflow.search_logged_models(experiment_ids=[exp], filter_string="name = 'gmm_clusterer'",
                                         order_by=[{"field_name": "metrics.gmm_nmi", "ascending": False}],
                                         output_format="list")
    by_run = {r.info.run_id: r for rs in runs.values() for r in rs}
    scored = [(by_run[m.source_run_id].info.run_name, {x.key: x.value for x in m.metrics}) for m in models]
    assert sorted(name for name, _ in scored) == ["conv", "conv-short", "conv-umap", "raw", "raw-gmm"]
    values = [metrics["gmm_nmi"] for _, metrics in scored]
    assert values == sorted(values, reverse=True)
    for name, metrics in scored:  # the model's scores are its trial's
        run = runs[name][0]
        assert all(metrics[k] == run.data.metrics[k] for k in SCORE_METRICS if k.startswith("gmm_")), name
    # on the images it clustered
    # (MLflow also copies onto a model whatever the run logged at the model's step, such as a system-metrics sample)
    (m,) = [m for m in models if m.source_run_id == runs["raw"][0].info.run_id]
    on = {(x.dataset_name, x.dataset_digest) for x in m.metrics if x.key.startswith("gmm_")}
    assert on == {(expected[1]["name"], expected[1]["digest"])}


def test_shared_training_scores_each_trial_at_its_epochs(tracked_sweep, mlflow_server):
    """conv-short (1 epoch) is scored on conv's training (2 epochs) at epoch 1, in its own child run."""
    client = MlflowClient(mlflow_server)
    runs = runs_by_name(client, "it-sweep")
    conv, short = runs["conv"][0], runs["conv-short"][0]
    assert conv.data.tags["fmc.trained_in"] == "conv" and short.data.tags["fmc.trained_in"] == "conv"
    assert runs["raw"][0].data.tags["fmc.trained_in"] == "raw"
    assert [m.step for m in client.get_metric_history(short.info.run_id, "loss")] == [1]
    conv_loss = {m.step: m.value for m in client.get_metric_history(conv.info.run_id, "loss")}
    assert client.get_metric_history(short.info.run_id, "loss")[0].value == conv_loss[1]
    assert short.data.params["epochs"] == "1" and short.data.tags["fmc.trial_key"] != conv.data.tags["fmc.trial_key"]
    # eval_every: 1 scored conv's codes at epoch 1 (step 1); its final scores are the latest (step 2)
    history = {m.step: m.value for m in client.get_metric_history(conv.info.run_id, "kmeans_acc")}
    assert sorted(history) == [1, 2] and history[2] == conv.data.metrics["kmeans_acc"]
    assert [m.step for m in client.get_metric_history(conv.info.run_id, "gmm_acc")] == [2]  # eval_clusterers: kmeans
    assert history[1] == short.data.metrics["kmeans_acc"]  # the same codes, the same KMeans
    assert "eval_seconds" in conv.data.metrics
    assert "plots/clustering_vs_epoch.png" in [a.path for a in client.list_artifacts(conv.info.run_id, "plots")]


def test_a_shared_trial_scores_as_if_run_alone(tracked_sweep, mlflow_server, run_fmc):
    """`fmc run SPEC --trial conv` in a fresh process (one thread, as the Ray trial had) gives the scores
    that conv got as its group's lead, which scored conv-short and conv-umap and its own eval_every on
    the way. (conv-short, scored on the way, is rerun alone in test_rerun_runs_the_selected_trials_again.)"""
    _, spec, cwd, env = tracked_sweep
    trial = "conv"
    # a short outage bound: heartbeats every second, so that the test sees `fmc run` refresh its claim
    res = run_fmc("run", spec, "--trial", trial, "--threads", "1", "--experiment", f"alone-{trial}",
                  env={"MLFLOW_TRACKING_URI": mlflow_server, "FMC_TRACKING_OUTAGE_SECONDS": "10"})
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    (alone,) = runs_by_name(client, f"alone-{trial}")[trial]
    shared = runs_by_name(client, "it-sweep")[trial][0]
    assert alone.data.tags["fmc.trial_key"] == shared.data.tags["fmc.trial_key"]
    for name in SCORE_METRICS + ["recon_mse"]:
        assert alone.data.metrics[name] == shared.data.metrics[name], name
    # `fmc run` keeps its claim alive like a sweep's trial: its heartbeat was refreshed while it ran
    assert float(alone.data.tags["fmc.heartbeat"]) >= alone.info.start_time / 1000 + 3


def test_logged_clusterer_model_predicts_clusters(tracked_sweep, mlflow_server):
    import mlflow

    from fmnist_cluster.data import load_dataset

    mlflow.set_tracking_uri(mlflow_server)
    client = MlflowClient(mlflow_server)
    conv = runs_by_name(client, "it-sweep")["conv"][0]
    models = {m.name: m for m in mlflow.search_logged_models(
        experiment_ids=[conv.info.experiment_id], filter_string=f"source_run_id = '{conv.info.run_id}'",
        output_format="list")}
    assert {"autoencoder", "kmeans_clusterer", "gmm_clusterer"} <= set(models)
    images = load_dataset(seed=1, subset=50).x_test[:5]  # (5, 28, 28, 1) in [0, 1]
    kmeans = mlflow.pyfunc.load_model(models["kmeans_clusterer"].model_uri)
    out = kmeans.predict(images.reshape(5, 784))
    assert len(out) == 5 and out["cluster"].between(0, 9).all()
    gmm = mlflow.pyfunc.load_model(models["gmm_clusterer"].model_uri)
    out = gmm.predict((images[..., 0] * 255).astype(np.uint8))  # 28x28 images in 0..255 work too
    assert out["cluster"].between(0, 9).all()
    probs = out[[f"prob_{k}" for k in range(10)]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1) and (probs.argmax(axis=1) == out["cluster"]).all()


def test_umap_trial_logs_its_manifold_and_serves_raw_images(tracked_sweep, mlflow_server, tmp_path):
    """The UMAP stage: params manifold.*, manifold_seconds, the same score names; its clusterer model
    embeds new images with UMAP's transform, loaded directly and served by `mlflow models serve`."""
    import mlflow

    from fmnist_cluster.data import load_dataset

    client = MlflowClient(mlflow_server)
    run = runs_by_name(client, "it-sweep")["conv-umap"][0]
    assert run.info.status == "FINISHED" and run.data.tags["fmc.trained_in"] == "conv"
    p, m = run.data.params, run.data.metrics
    assert (p["manifold.kind"], p["manifold.n_neighbors"], p["manifold.n_components"], p["manifold.min_dist"],
            p["manifold.metric"]) == ("umap", "10", "10", "0.0", "euclidean")
    assert m["manifold_seconds"] > 0 and all(name in m for name in SCORE_METRICS)
    mlflow.set_tracking_uri(mlflow_server)
    (model,) = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], output_format="list",
        filter_string=f"source_run_id = '{run.info.run_id}' and name = 'gmm_clusterer'")
    images = load_dataset(seed=3, subset=50).x_test[:6]
    local = mlflow.pyfunc.load_model(model.model_uri).predict(images.reshape(6, 784))
    assert local["cluster"].between(0, 9).all()

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model.model_uri,
                             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, cwd=tmp_path, stdout=open(tmp_path / "serve.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, timeout=180)
        pixels = (images[..., 0] * 255).astype(int)  # 28x28 images, 0..255, as a client would send them
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": pixels.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            served = json.load(response)["predictions"]
    finally:
        stop(proc)
    assert [row["cluster"] for row in served] == local["cluster"].tolist()
    assert all(abs(sum(row[f"prob_{k}"] for k in range(10)) - 1) < 1e-6 for row in served)


def test_served_umap_clusters_are_the_trials_own_and_do_not_depend_on_the_batch(tracked_sweep, mlflow_server):
    """The trial's own images (its evaluation split) get the trial's own clusters from the logged UMAP
    model; a new image gets the same cluster alone as inside any batch."""
    import mlflow

    from fmnist_cluster.data import load_dataset

    client = MlflowClient(mlflow_server)
    run = runs_by_name(client, "it-sweep")["conv-umap"][0]
    labels = json.load(open(client.download_artifacts(run.info.run_id, "labels.json")))
    assert labels["split"] == "test"
    mlflow.set_tracking_uri(mlflow_server)
    (model,) = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], output_format="list",
        filter_string=f"source_run_id = '{run.info.run_id}' and name = 'gmm_clusterer'")
    served = mlflow.pyfunc.load_model(model.model_uri)
    own = load_dataset(seed=0, subset=200).x_test  # the trial's data: subset 200, seed 0
    assert served.predict(own.reshape(len(own), 784))["cluster"].tolist() == labels["gmm"]
    new = load_dataset(seed=5, subset=300).x_train[:12]
    batch = served.predict(new.reshape(12, 784))["cluster"].tolist()
    alone = [served.predict(new[i:i + 1].reshape(1, 784))["cluster"].item() for i in (0, 5, 11)]
    assert alone == [batch[0], batch[5], batch[11]]
    again = served.predict(np.concatenate([new[5:6], own[:40]]).reshape(41, 784))["cluster"].tolist()
    assert again[0] == batch[5] and again[1:] == labels["gmm"][:40]


def test_the_best_clusterer_is_registered_and_the_alias_moves_only_when_beaten(tracked_sweep, mlflow_server):
    """The sweep registers its best trial's mixture (select's default: gmm_nmi, max) as models:/it-sweep@best,
    which loads and clusters raw images; the same runs again keep the alias, a better one moves it."""
    import mlflow

    from fmnist_cluster.data import load_dataset
    from tracking import Tracker

    res = tracked_sweep[0]
    assert "Model registry: registered" in res.stdout and "models:/it-sweep@best" in res.stdout, res.stdout[-2000:]
    client = MlflowClient(mlflow_server)
    trials = [r for rs in runs_by_name(client, "it-sweep").values() for r in rs
              if r.info.status == "FINISHED" and "gmm_nmi" in r.data.metrics]
    top = max(r.data.metrics["gmm_nmi"] for r in trials)  # raw and raw-gmm tie: the same mixture on the same pixels
    best = min((r for r in trials if r.data.metrics["gmm_nmi"] == top), key=lambda r: r.info.start_time)
    held = client.get_model_version_by_alias("it-sweep", "best")
    assert (held.version, held.run_id, held.tags["fmc.trial"]) == ("1", best.info.run_id, best.info.run_name)
    assert float(held.tags["fmc.value"]) == top
    mlflow.set_tracking_uri(mlflow_server)
    images = load_dataset(seed=1, subset=50).x_test[:5]
    out = mlflow.pyfunc.load_model("models:/it-sweep@best").predict(images.reshape(5, 784))
    assert len(out) == 5 and out["cluster"].between(0, 9).all()

    tracker = Tracker(mlflow_server)
    records = [r for r in tracker.trial_runs(best.info.experiment_id) if "gmm_nmi" in r["metrics"]]
    said = tracker.register_best("it-sweep", records, "gmm_nmi", "max")
    assert said.startswith("it-sweep@best stays version 1"), said
    other = next(r for r in records if r["run_id"] != best.info.run_id)
    other["metrics"]["gmm_nmi"] = 2.0  # as if a later sweep's trial scored better
    said = tracker.register_best("it-sweep", records, "gmm_nmi", "max")
    moved = client.get_model_version_by_alias("it-sweep", "best")
    assert (moved.version, moved.run_id) == ("2", other["run_id"]), said
    assert len(client.search_model_versions("name = 'it-sweep'")) == 2


def test_rerun_skips_finished_trials(tracked_sweep, mlflow_server):
    _, spec, cwd, env = tracked_sweep
    res = subprocess.run(FMC + ["sweep", str(spec)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 1  # broken fails again
    assert "5 of 6 trials already finished" in res.stdout
    runs = runs_by_name(MlflowClient(mlflow_server), "it-sweep")
    assert len(runs["conv"]) == 1 and len(runs["raw"]) == 1 and len(runs["broken"]) == 2


def test_rerun_runs_the_selected_trials_again(tracked_sweep, mlflow_server, run_fmc):
    """--rerun gives each selected trial a new run that trains and scores; the old run stays, and the
    report counts the trial once (its newest run)."""
    _, spec, cwd, env = tracked_sweep
    res = subprocess.run(FMC + ["sweep", str(spec), "--rerun", "--trials", "raw,conv-short", "--no-models",
                                "--no-system-metrics"],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = res.stdout[res.stdout.rindex("sweep finished"):]
    assert table.count("FINISHED") == 2 and "SKIPPED" not in table
    client = MlflowClient(mlflow_server)
    runs = runs_by_name(client, "it-sweep")
    for name in ("raw", "conv-short"):
        old, new = sorted(runs[name], key=lambda r: r.info.start_time)
        assert (old.info.status, new.info.status) == ("FINISHED", "FINISHED")
        assert "kmeans_acc" in new.data.metrics and ("loss" in new.data.metrics) == (name == "conv-short")
        # system metrics by default; --no-system-metrics turns them off
        system = [[k for k in r.data.metrics if k.startswith("system/")] for r in (old, new)]
        assert "system/cpu_utilization_percentage" in system[0] and system[1] == [], (name, system)
        # same settings, same seed: the rerun reproduces the scores; conv-short now trains alone and
        # scores as it did on conv's shared training
        for metric in SCORE_METRICS if name == "raw" else SCORE_METRICS + ["recon_mse"]:
            assert new.data.metrics[metric] == old.data.metrics[metric], (name, metric)
    csv = run_fmc("report", "it-sweep", "--format", "csv", env={"MLFLOW_TRACKING_URI": mlflow_server})
    rows = {line.split(",")[0]: line.split(",") for line in csv.stdout.splitlines()[1:]}
    header = csv.stdout.splitlines()[0].split(",")
    assert rows["raw"][header.index("n")] == "1"  # the newest run per trial key, not both


def test_report_prints_table_and_chart(tracked_sweep, mlflow_server, run_fmc, tmp_path):
    res = run_fmc("report", "it-sweep", "--format", "markdown", "--chart", tmp_path / "c.png",
                  env={"MLFLOW_TRACKING_URI": mlflow_server})
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("| ") and "---" not in ln]
    assert lines[0].startswith("| case | model | epochs") and len(lines) == 6  # header + conv, -short, -umap, raw, raw-gmm
    assert any(ln.startswith("| raw | raw |") for ln in lines)
    assert (tmp_path / "c.png").stat().st_size > 10_000
    csv = run_fmc("report", "it-sweep", "--format", "csv", "--chart", tmp_path / "d.png",
                  env={"MLFLOW_TRACKING_URI": mlflow_server})
    # a manifold column, as one trial of the sweep has a UMAP stage; then mean, std, min and max per score
    assert csv.stdout.splitlines()[0].startswith(
        "case,model,epochs,eval_split,manifold,fit_split,subset,n,kmeans_acc_mean,kmeans_acc_std,kmeans_acc_min,kmeans_acc_max")
    # subset runs are not set beside the study's full-data figures
    assert "study (Δ" not in res.stdout and "| subset |" in res.stdout


def test_export_then_report_from_the_records_as_from_mlflow(tracked_sweep, mlflow_server, run_fmc, tmp_path):
    """`fmc export` writes one record per finished trial run with every field; a second export adds
    nothing; `fmc report --from` prints exactly what `fmc report` prints from MLflow, chart included."""
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    out = tmp_path / "results" / "it-sweep.jsonl"
    res = run_fmc("export", "it-sweep", "--out", out, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    client = MlflowClient(mlflow_server)
    finished = [r for rs in runs_by_name(client, "it-sweep").values() for r in rs
                if r.info.status == "FINISHED" and r.data.tags.get("fmc.role") == "trial"]
    assert sorted(r["run_id"] for r in records) == sorted(r.info.run_id for r in finished)
    by_id = {r.info.run_id: r for r in finished}
    for record in records:
        run = by_id[record["run_id"]]
        assert record["metrics"] == run.data.metrics and record["params"] == run.data.params
        assert record["tags"] == run.data.tags and record["name"] == run.info.run_name
        assert record["config"]["data"]["subset"] == 200 and record["trial"]["info"]["n_eval"] > 0
        for name, matrix in record["confusion"].items():
            assert np.array(matrix).shape == (10, 10) and np.array(matrix).sum() == record["trial"]["info"]["n_eval"]
    conv = next(r for r in records if r["name"] == "conv")
    assert set(conv["confusion"]) == {f"{c}_{m}" for c in ("kmeans", "gmm") for m in ("hungarian", "majority")}
    assert len(conv["trial"]["history"]["loss"]) == 2 and conv["tags"]["fmc.cpu"]
    again = run_fmc("export", "it-sweep", "--out", out, env=env)
    assert again.returncode == 0 and "0 new record(s)" in again.stdout
    assert len(out.read_text().splitlines()) == len(records)
    for fmt in ("table", "csv"):
        live = run_fmc("report", "it-sweep", "--format", fmt, "--chart", tmp_path / f"live-{fmt}.png", env=env)
        saved = run_fmc("report", "--from", out, "--format", fmt, "--chart", tmp_path / f"saved-{fmt}.png")
        assert live.returncode == 0 and saved.returncode == 0, saved.stderr[-2000:]
        assert saved.stdout == live.stdout, fmt
        assert (tmp_path / f"saved-{fmt}.png").read_bytes() == (tmp_path / f"live-{fmt}.png").read_bytes()
    out.write_text(out.read_text() + '{"run_id": "cut sh')
    broken = run_fmc("report", "--from", out)
    assert broken.returncode == 2 and f"it-sweep.jsonl:{len(records) + 1}: not a JSON record" in broken.stderr


def test_a_sweep_resumes_from_records_on_an_empty_store(tracked_sweep, mlflow_server, run_fmc, tmp_path):
    """--skip-recorded: a machine whose store is empty runs only the trials the records lack (here raw,
    whose record is taken out of the file)."""
    _, spec, cwd, env = tracked_sweep
    out = tmp_path / "it-sweep.jsonl"
    assert run_fmc("export", "it-sweep", "--out", out, env={"MLFLOW_TRACKING_URI": mlflow_server}).returncode == 0
    out.write_text("".join(line + "\n" for line in out.read_text().splitlines() if json.loads(line)["name"] != "raw"))
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    res = run_fmc("sweep", spec, "--trials", "raw*,conv*", "--skip-recorded", out, "--tracking-uri", fresh,
                  "--no-models", env={"MLFLOW_TRACKING_URI": fresh})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"4 of 5 trials already finished in {fresh} or recorded in {out}" in res.stdout
    runs = runs_by_name(MlflowClient(fresh), "it-sweep")
    assert sorted(n for n, rs in runs.items() if rs[0].data.tags.get("fmc.role") == "trial") == ["raw"]


def test_skip_recorded_before_the_first_export(tracked_sweep, mlflow_server, run_fmc, tmp_path):
    """A long run's first chunk uses the same command as the later ones, before any export: a records
    file not there yet skips nothing and says so; one that cannot be read still stops the sweep."""
    spec = tracked_sweep[1]
    missing = tmp_path / "not-yet" / "it-sweep.jsonl"
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    res = run_fmc("sweep", spec, "--trials", "raw*,conv*", "--skip-recorded", missing, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"no records at {missing} yet" in res.stdout and "already finished" in res.stdout
    assert not missing.exists()
    folder = run_fmc("sweep", spec, "--trials", "raw*,conv*", "--skip-recorded", tmp_path, env=env)
    assert folder.returncode == 2 and "cannot read records" in folder.stderr


def test_unreachable_server_exit_2_starts_nothing(run_fmc, tmp_path):
    spec = tmp_path / "it.yaml"
    spec.write_text(SWEEP.format(experiment="down"))
    res = run_fmc("sweep", spec, "--tracking-uri", f"http://127.0.0.1:{free_port()}")
    assert res.returncode == 2
    assert "unreachable" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "ray_results").exists()


def test_embedded_default_store(run_fmc, tmp_path):
    """`fmc run SPEC --trial NAME` with a flag on top, no URI given: ./mlflow.db, the sweep's experiment."""
    spec = tmp_path / "it.yaml"
    spec.write_text(SWEEP.format(experiment="solo"))
    res = run_fmc("run", spec, "--trial", "raw", "--clusterers", "kmeans")
    assert res.returncode == 0, res.stderr
    assert "kmeans" in res.stdout and "gmm" not in res.stdout.split("raw:")[-1]
    assert (tmp_path / "mlflow.db").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = [r for rs in runs_by_name(client, "solo").values() for r in rs]
    assert run.info.status == "FINISHED" and run.info.run_name == "raw"
    assert 0 < run.data.metrics["kmeans_acc"] <= 1 and run.data.params["data.subset"] == "200"
    assert run.data.params["clusterers"] == '["kmeans"]'
    bad = run_fmc("run", spec, "--trial", "nope")
    assert bad.returncode == 2 and "no trial named 'nope'" in bad.stderr


def test_interrupt_then_resume_finishes_each_trial_once(tmp_path):
    spec = tmp_path / "slow.yaml"
    spec.write_text(
        "experiment: interrupt\ndata: {subset: 600, seed: 0}\n"
        "defaults: {model: {kind: conv, filters: [8, 4, 4]}, epochs: 8, kmeans: {n_init: 1},"
        " gmm: {n_init: 1, covariance_type: diag}}\n"
        "trials: [{name: a}, {name: b, seed: 1}]\n"  # b waits for a: interrupted before its turn
        "resources: {cpu: 2}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):  # `make sweep`'s way: a local Ray of its own
        env.pop(k, None)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(FMC + ["sweep", str(spec), "--no-models"], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # wait until a trial has trained an epoch
            time.sleep(2)
            exp = (tmp_path / "mlflow.db").exists() and client.get_experiment_by_name("interrupt")
            if exp and any(r.data.metrics.get("loss") for r in client.search_runs([exp.experiment_id])):
                break
        else:
            pytest.fail("no trial started training within 300 s")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=180) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    first = (tmp_path / "first.log").read_text()
    assert "sweep interrupted after" in first and re.search(r"│ b +│ KILLED .*not started", first), first[-3000:]
    runs = runs_by_name(client, "interrupt")
    statuses = {name: [r.info.status for r in rs] for name, rs in runs.items()}
    assert not any("RUNNING" in s for s in statuses.values()), statuses
    assert any("KILLED" in s for s in statuses.values()), statuses

    res = subprocess.run(FMC + ["sweep", str(spec), "--no-models"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    runs = runs_by_name(client, "interrupt")
    for name in "ab":
        assert [r.info.status for r in runs[name]].count("FINISHED") == 1, (name, runs[name])
    # a's training went on from its last checkpoint; its new run has the whole loss curve
    (done,) = [r for r in runs["a"] if r.info.status == "FINISHED"]
    assert 1 <= int(done.data.tags["fmc.resumed_from_epoch"]) < 8, done.data.tags
    assert done.data.tags["fmc.trained_on"] == f"1-8 {cpu_id()}"  # every epoch on this machine
    assert [m.step for m in client.get_metric_history(done.info.run_id, "loss")] == list(range(1, 9))
    assert "fmc.resumed_from_epoch" not in next(r for r in runs["b"] if r.info.status == "FINISHED").data.tags
    assert not list((tmp_path / "ray_results" / "fmc-checkpoints").glob("*/*"))  # gone once finished
    again = subprocess.run(FMC + ["sweep", str(spec)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "all 2 trials of 'interrupt' already finished" in again.stdout, again.stdout
