"""Where one trial's time goes, and what the harness costs over bare Keras.

1. Breakdown: the study's case 1 on the full data (48k train, 12k val, scored on the 10k test images),
   logged like `fmc run` does into a throw-away local MLflow store: data, each training epoch,
   encoding, KMeans, GMM (--gmm-impl), figures, logging.
2. Harness: `model.fit` bare vs inside `run_trial` (same model and seed, same arrays, same process),
   alternated to spread the machine's drift; the trial must be within 5% of bare Keras.

    uv run python benchmarks/trial.py [--epochs 1] [--gmm-impl fast] [--harness-subset 12000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def breakdown(epochs: int, gmm_impl: str) -> None:
    from fmnist_cluster.config import TrialConfig
    from fmnist_cluster.data import load_dataset
    from fmnist_cluster.trial import run_trial
    from tracking import RunContext, Tracker, TrialLogger

    config = TrialConfig(epochs=epochs, gmm={"impl": gmm_impl})
    t = time.perf_counter()
    data = load_dataset(seed=0)
    load_seconds = time.perf_counter() - t
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # the store's artifacts go to ./mlartifacts
        tracker = Tracker(f"sqlite:///{tmp}/mlflow.db")
        ctx = RunContext(tracker.uri, tracker.experiment("bench"), None, "bench")
        logger = TrialLogger(ctx, "case1", config)
        with logger:
            result = run_trial(config, data=data, threads=os.cpu_count(), on_epoch=logger.epoch)
            t = time.perf_counter()
            logger.result(result)
            log_seconds = time.perf_counter() - t
        os.chdir(here)
    tm, h = result.timings, result.history
    print(f"case 1 trial, full data, {epochs} epoch(s), gmm impl {gmm_impl} ({os.cpu_count()} cores):")
    rows = [("load + verify data (once per sweep)", load_seconds)]
    rows += [(f"train epoch {i + 1}", s) for i, s in enumerate(h["epoch_seconds"])]
    rows += [("encode (test codes + reconstructions)", tm["encode_seconds"]),
             ("KMeans (k-means++, n_init 10)", tm["kmeans_seconds"]),
             (f"GMM (full, n_init 10, {gmm_impl})", tm["gmm_seconds"]),
             ("figures", tm.get("figures_seconds", 0.0)),
             ("logging to MLflow (metrics, figures, 3 models)", log_seconds)]
    total = sum(s for _, s in rows)
    for name, s in rows:
        print(f"  {name:<48} {s:8.1f} s  {100 * s / total:5.1f}%")
    print(f"  {'total':<48} {total:8.1f} s   acc kmeans {result.metrics['kmeans_acc']:.4f}, "
          f"gmm {result.metrics['gmm_acc']:.4f}")


def harness(subset: int, epochs: int, rounds: int) -> None:
    from fmnist_cluster.config import TrialConfig
    from fmnist_cluster.data import load_dataset
    from fmnist_cluster.models import build_autoencoder, configure_backend
    from fmnist_cluster.trial import run_trial

    data = load_dataset(seed=0, subset=subset)
    config = TrialConfig(epochs=epochs, data={"subset": subset}, clusterers=["kmeans"], kmeans={"n_init": 1})
    configure_backend(threads=os.cpu_count(), seed=0)
    bare, trial = [], []
    for _ in range(rounds):
        configure_backend(seed=config.seed)
        autoencoder, _ = build_autoencoder(config.model, learning_rate=config.learning_rate)
        t = time.perf_counter()
        autoencoder.fit(data.x_train, data.x_train, validation_data=(data.x_val, data.x_val), epochs=epochs,
                        batch_size=config.batch_size, shuffle=True, verbose=0)
        bare.append(time.perf_counter() - t)
        result = run_trial(config, data=data, threads=os.cpu_count(), figures=False)
        trial.append(result.timings["train_seconds"])
    b, r = float(np.mean(bare)), float(np.mean(trial))
    print(f"harness: case 1, {len(data.y_train)} train + {len(data.y_val)} val images, {epochs} epochs, "
          f"{rounds} rounds alternated")
    print(f"  bare model.fit   {' '.join(f'{s:.1f}' for s in bare)} s  mean {b:.1f} s")
    print(f"  inside run_trial {' '.join(f'{s:.1f}' for s in trial)} s  mean {r:.1f} s")
    print(f"  trial / bare = {r / b:.3f} ({100 * (r / b - 1):+.1f}%)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--gmm-impl", default="fast", choices=["fast", "sklearn"])
    parser.add_argument("--harness-subset", type=int, default=12000)
    parser.add_argument("--harness-epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-breakdown", action="store_true")
    args = parser.parse_args()
    if not args.skip_breakdown:
        breakdown(args.epochs, args.gmm_impl)
    harness(args.harness_subset, args.harness_epochs, args.rounds)
