"""What MLflow system metrics cost a trial: the CPU time of the monitor thread and the writes it adds.

A trial's run with the monitor on and one with it off, each held open for --seconds while the process
does nothing else, so that the CPU time the process spends is the monitor's (sampling psutil, checking
the run's status, logging the samples). Then the same for a short conv training of --epochs on
--subset images, where the cost shows as training time. Prints the figures; asserts nothing.

    uv run python benchmarks/system_metrics_cost.py --seconds 60
    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL=1 uv run python benchmarks/system_metrics_cost.py  # worst case
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--epochs", type=int, default=2, help="0: the idle runs only")
    parser.add_argument("--subset", type=int, default=2000)
    parser.add_argument("--tracking-uri", default=None, help="default: a SQLite store in a temporary folder")
    args = parser.parse_args()

    from mlflow import MlflowClient

    from fmnist_cluster.config import TrialConfig
    from fmnist_cluster.data import load_dataset
    from fmnist_cluster.trial import run_trial
    from tracking import Tracker, TrialLogger

    folder = tempfile.mkdtemp(prefix="fmc-sysmetrics-")
    uri = args.tracking_uri or f"sqlite:///{folder}/mlflow.db"
    tracker = Tracker(uri)
    exp = tracker.experiment("system-metrics-cost")
    interval = os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "10")
    print(f"store {uri}; sampling every {interval} s; CPU {os.cpu_count()} cores")

    idle = TrialConfig(model={"kind": "none"}, data={"subset": 200})
    for on in (False, True, False, True):
        with TrialLogger(tracker.context(exp, None, "cost"), f"idle-{'on' if on else 'off'}", idle,
                         log_models=False, system_metrics=on) as log:
            start_cpu, start = cpu_seconds(), time.perf_counter()
            time.sleep(args.seconds)
            cpu, wall = cpu_seconds() - start_cpu, time.perf_counter() - start
        samples = len(MlflowClient(uri).get_metric_history(log.run_id, "system/cpu_utilization_percentage"))
        print(f"idle run, monitor {'on ' if on else 'off'}: {cpu:.3f} CPU s in {wall:.0f} s "
              f"({100 * cpu / wall:.3f}% of a core; heartbeat included), {samples} samples")

    if not args.epochs:
        return
    data = load_dataset(seed=0, subset=args.subset)
    config = TrialConfig(model={"kind": "conv", "filters": [16, 8, 4]}, epochs=args.epochs, data={"subset": args.subset},
                         kmeans={"n_init": 1}, gmm={"n_init": 1, "covariance_type": "diag"})
    for on in (False, True, False, True):
        with TrialLogger(tracker.context(exp, None, "cost"), f"train-{'on' if on else 'off'}", config,
                         log_models=False, system_metrics=on) as log:
            result = run_trial(config, data=data, figures=False, on_epoch=log.epoch, verbose=0)
            log.result(result)
        print(f"conv {args.epochs} epochs on {args.subset} images, monitor {'on ' if on else 'off'}: "
              f"train {result.timings['train_seconds']:.2f} s, total {result.timings['total_seconds']:.2f} s")


if __name__ == "__main__":
    main()
