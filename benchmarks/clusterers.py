"""The clusterers at the study's settings on real latent codes: scikit-learn KMeans and GaussianMixture
(the reference) and fmc's fast Gaussian mixture, side by side in one process.

    uv run python benchmarks/codes.py --epochs 2      # once: case 1's codes of the 10,000 test images
    uv run python benchmarks/clusterers.py [--n-init 10] [--skip-sklearn-gmm]

Keras' start-up (import, first op) is timed apart: inside a trial it has already happened.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from codes import latent_codes  # benchmarks/codes.py (scripts run from this folder)
from fmnist_cluster.metrics import score_all


def line(name: str, seconds: float, labels: np.ndarray, y: np.ndarray, extra: str = "") -> None:
    s = score_all(y, labels)
    print(f"{name:<44} {seconds:8.1f} s   acc {s['acc']:.4f}  acc_majority {s['acc_majority']:.4f}  "
          f"nmi {s['nmi']:.4f}  {extra}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="which cached codes (benchmarks/codes.py)")
    parser.add_argument("--n-init", type=int, default=10)
    parser.add_argument("--covariance-type", default="full")
    parser.add_argument("--skip-sklearn-gmm", action="store_true")
    args = parser.parse_args()

    from sklearn.cluster import KMeans
    from sklearn.mixture import GaussianMixture

    from fmnist_cluster.fast_gmm import FastGaussianMixture
    from fmnist_cluster.models import configure_backend

    codes, y = latent_codes(epochs=args.epochs)
    x = codes.astype(np.float64)
    constant = int((np.ptp(x, axis=0) == 0).sum())
    print(f"codes: {x.shape[0]} x {x.shape[1]} (case 1 after {args.epochs} epochs; {constant} constant features), "
          f"{os.cpu_count()} cores")

    t = time.perf_counter()
    configure_backend(threads=os.cpu_count(), seed=0)
    FastGaussianMixture(2, covariance_type="diag", n_init=1, max_iter=2, random_state=0).fit(x[:50, :4])
    print(f"Keras start-up (import + first ops, once per process): {time.perf_counter() - t:.1f} s")

    t = time.perf_counter()
    labels = KMeans(10, init="k-means++", n_init=10, max_iter=300, random_state=0).fit_predict(x)
    line("sklearn KMeans (k-means++, n_init 10)", time.perf_counter() - t, labels, y)

    settings = dict(covariance_type=args.covariance_type, n_init=args.n_init, max_iter=300, random_state=0)
    fast = FastGaussianMixture(10, **settings)
    t = time.perf_counter()
    resp = fast.initial_responsibilities(x)
    init_seconds = time.perf_counter() - t
    t = time.perf_counter()
    labels = fast.fit_predict(x, resp)
    fast_seconds = time.perf_counter() - t + init_seconds
    line(f"fast GMM ({args.covariance_type}, n_init {args.n_init})", fast_seconds, labels, y,
         f"bound {fast.lower_bound_:.6f}  EM iterations {int(fast.n_iter_per_init_.sum())} "
         f"(KMeans init {init_seconds:.1f} s)")
    if args.skip_sklearn_gmm:
        return
    reference = GaussianMixture(10, **settings)
    t = time.perf_counter()
    labels = reference.fit_predict(x)
    sk_seconds = time.perf_counter() - t
    line(f"sklearn GaussianMixture ({args.covariance_type}, n_init {args.n_init})", sk_seconds, labels, y,
         f"bound {reference.lower_bound_:.6f}")
    rel = abs(fast.lower_bound_ - reference.lower_bound_) / abs(reference.lower_bound_)
    print(f"fast vs sklearn: {sk_seconds / fast_seconds:.2f}x faster; bound relative difference {rel:.1e}")


if __name__ == "__main__":
    main()
