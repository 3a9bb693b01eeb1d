"""Figures for the foundation: one full-data epoch of the study's case 1, and KMeans (study settings)
on the 60,000 raw training images. Prints the figures; run with `uv run python benchmarks/foundation.py`.

Timed around the same calls a trial makes (run_trial's building blocks), after the data is loaded,
so that the figures are the work itself, not start-up.
"""

from __future__ import annotations

import os
import platform
import time

from fmnist_cluster.clustering import fit_predict
from fmnist_cluster.config import TrialConfig
from fmnist_cluster.data import load_dataset
from fmnist_cluster.metrics import acc, acc_majority, nmi
from fmnist_cluster.models import build_autoencoder, configure_backend


def main() -> None:
    threads = os.cpu_count()
    print(f"machine: {platform.processor() or platform.machine()}, {threads} cores")
    t = time.perf_counter()
    data = load_dataset(seed=0)
    print(f"load + verify + split Fashion-MNIST: {time.perf_counter() - t:.1f} s")

    config = TrialConfig(epochs=1)  # case 1: filters 64-32-16-7, batch 128, Adam 1e-3
    configure_backend(threads=threads, seed=0)
    autoencoder, _ = build_autoencoder(config.model, learning_rate=config.learning_rate)
    epochs = []
    for _ in range(2):  # the first epoch includes tracing the train step
        t = time.perf_counter()
        autoencoder.fit(data.x_train, data.x_train, validation_data=(data.x_val, data.x_val),
                        epochs=1, batch_size=config.batch_size, verbose=0)
        epochs.append(time.perf_counter() - t)
    print(f"case 1 full-data epoch (48,000 train + 12,000 val images): first {epochs[0]:.1f} s, "
          f"second {epochs[1]:.1f} s")

    x, y = data.split("train")
    codes = x.reshape(len(x), -1)
    raw = TrialConfig(model={"kind": "none"}, clusterers=["kmeans"])
    t = time.perf_counter()
    _, labels = fit_predict("kmeans", raw, codes)
    seconds = time.perf_counter() - t
    print(f"KMeans (k-means++, n_init=10, max_iter=300) on 60,000 x 784 raw pixels: {seconds:.1f} s; "
          f"acc_majority {acc_majority(y, labels):.4f}, acc {acc(y, labels):.4f}, nmi {nmi(y, labels):.4f} "
          "(study: 0.5533 / - / 0.5116)")


if __name__ == "__main__":
    main()
