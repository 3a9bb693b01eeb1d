"""Shared training before and after: the paper sweep (`sweeps/paper_cases.yaml`, same trials and settings)
on a data subset so that it finishes in minutes, run with `--no-share-training` (one training per
trial, the behaviour before) and with the default (cases 1-4 trained once to 100 epochs and scored at
10, 25, 50 and 100; cases 5-6 once to 25), each into a fresh store. Checks that both give the same
scores, trial by trial, and prints the conv epochs each way trained.

Run: `uv run python benchmarks/shared_training.py [--subset 1000] [--spec sweeps/paper_cases.yaml]`
(about 20 minutes on 2 cores at the default subset).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("kmeans_acc", "kmeans_nmi", "gmm_acc", "gmm_nmi", "recon_mse")


def sweep(tmp: Path, spec: dict, share: bool) -> tuple[float, dict]:
    from mlflow import MlflowClient

    folder = tmp / ("shared" if share else "alone")
    folder.mkdir()
    (folder / "bench.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "fmnist_cluster.cli", "sweep", "bench.yaml", "--no-models",
                          "--share-training" if share else "--no-share-training"], cwd=folder,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                              "MLFLOW_TRACKING_URI": uri})
    wall = time.perf_counter() - start
    if res.returncode != 0:
        sys.exit(f"fmc sweep failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(spec["experiment"])
    runs = client.search_runs([exp.experiment_id], "tags.`fmc.role` = 'trial'")
    scores = {r.info.run_name: {k: r.data.metrics[k] for k in METRICS if k in r.data.metrics} for r in runs}
    lead = {r.data.tags.get("fmc.trained_in", r.info.run_name) for r in runs}
    conv = sum(int(r.data.params["epochs"]) for r in runs
               if r.info.run_name in lead and r.data.params["model.kind"] == "conv")
    print(f"{'--share-training' if share else '--no-share-training':<22} {wall:7.0f} s wall   "
          f"{len(runs)} trials, {len(lead)} trainings, {conv} conv epochs trained", flush=True)
    return wall, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "sweeps/paper_cases.yaml"))
    parser.add_argument("--subset", type=int, default=1000, help="images per split")
    args = parser.parse_args()
    spec = yaml.safe_load(Path(args.spec).read_text())
    spec["data"] = {**spec.get("data", {}), "subset": args.subset}
    spec["experiment"] = "shared-training-bench"
    print(f"{args.spec} with data.subset {args.subset}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        alone, a = sweep(Path(tmp), spec, share=False)
        shared, s = sweep(Path(tmp), spec, share=True)
    same = a.keys() == s.keys() and all(abs(a[k][m] - s[k][m]) < 1e-9 for k in a for m in a[k])
    print(f"speed-up {alone / shared:.2f}x; same scores trial by trial: {same}")
    if not same:
        for k in sorted(a):
            print(k, a[k], s.get(k))


if __name__ == "__main__":
    main()
