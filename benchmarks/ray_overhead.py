"""Ray's cost per trial and a sweep's wall time at several concurrencies.

1. Ray overhead: N empty trials (the trainable only reports) through the same Tuner set-up fmc uses
   (no actor reuse), 1, 2 and 4 at a time (4 logical CPUs declared on 2 cores), timed after `ray.init`;
   per trial slot = wall / N * concurrency.
2. `fmc sweep sweeps/quick.yaml` end to end with --max-concurrent 1, 2 and 4 (4: --cpu 0.5, two trials
   per core), each into a fresh store.

Run: `uv run python benchmarks/ray_overhead.py` (a few minutes on 2 cores).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def empty_trials(n: int = 8) -> None:
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # see fmnist_cluster/sweep.py
    import ray
    from ray import tune

    t = time.perf_counter()
    ray.init(include_dashboard=False, logging_level="ERROR", num_cpus=4)
    print(f"ray.init (local, 4 logical CPUs): {time.perf_counter() - t:.1f} s")

    def empty(config):
        tune.report({"done": True})

    with tempfile.TemporaryDirectory() as tmp:
        for concurrency in (1, 2, 4):
            tuner = tune.Tuner(
                tune.with_resources(empty, {"cpu": 1}),
                param_space={"i": tune.grid_search(list(range(n)))},
                tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=False),
                run_config=tune.RunConfig(storage_path=tmp, name=f"empty{concurrency}", verbose=0))
            t = time.perf_counter()
            tuner.fit()
            wall = time.perf_counter() - t
            print(f"{n} empty trials, {concurrency} at a time: {wall:.1f} s wall, "
                  f"{wall / n * concurrency:.2f} s per trial slot")
    ray.shutdown()


def quick_sweep() -> None:
    for concurrency, cpu in ((1, 1), (2, 1), (4, 0.5)):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", "fmnist_cluster.cli", "sweep", str(ROOT / "sweeps/quick.yaml"),
                                  "--max-concurrent", str(concurrency), "--cpu", str(cpu)], cwd=tmp, capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
            print(f"fmc sweep sweeps/quick.yaml --max-concurrent {concurrency} --cpu {cpu}: {time.perf_counter() - t:.0f} s "
                  f"wall (exit {res.returncode})")


if __name__ == "__main__":
    empty_trials()
    quick_sweep()
