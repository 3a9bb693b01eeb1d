"""Real latent codes for the clusterer benchmarks: the study's case 1 (or any filters), trained on the full
training split, encoded on the 10,000 test images. Cached in benchmarks/results/ so that clusterer figures
can be repeated without retraining.

    uv run python benchmarks/codes.py --epochs 2            # writes benchmarks/results/codes_64-32-16-7_e2.npz
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def codes_path(filters: tuple[int, ...], epochs: int) -> Path:
    return RESULTS / f"codes_{'-'.join(map(str, filters))}_e{epochs}.npz"


def latent_codes(filters: tuple[int, ...] = (64, 32, 16, 7), epochs: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``(codes (10000, latent), labels (10000,))`` of the test split; trained and cached on first use."""
    path = codes_path(filters, epochs)
    if path.exists():
        saved = np.load(path)
        return saved["codes"], saved["labels"]
    from fmnist_cluster.config import TrialConfig
    from fmnist_cluster.data import load_dataset
    from fmnist_cluster.models import build_autoencoder, configure_backend

    config = TrialConfig(model={"kind": "conv", "filters": list(filters)}, epochs=epochs)
    configure_backend(threads=os.cpu_count(), seed=0)
    data = load_dataset(seed=0)
    autoencoder, encoder = build_autoencoder(config.model, learning_rate=config.learning_rate)
    t = time.perf_counter()
    autoencoder.fit(data.x_train, data.x_train, validation_data=(data.x_val, data.x_val), epochs=epochs,
                    batch_size=config.batch_size, verbose=2)
    print(f"trained {config.model.label()} for {epochs} epochs in {time.perf_counter() - t:.1f} s")
    codes = encoder.predict(data.x_test, batch_size=1024, verbose=0).astype(np.float32)
    RESULTS.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, codes=codes, labels=data.y_test)
    return codes, data.y_test


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filters", default="64,32,16,7")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    codes, labels = latent_codes(tuple(int(f) for f in args.filters.split(",")), args.epochs)
    print(f"codes {codes.shape}, {int((codes.std(0) == 0).sum())} constant dimensions, "
          f"saved at {codes_path(tuple(int(f) for f in args.filters.split(',')), args.epochs)}")
