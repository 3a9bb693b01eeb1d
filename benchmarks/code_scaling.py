"""Does the scaling of the latent codes decide KMeans' score? For each finished trial of an experiment
(autoencoders logged by `fmc sweep`), the test codes are encoded again from the logged autoencoder and
clustered with the study's KMeans (k-means++, n_init 10, seed 0) as they are, standardised per feature
(constant features dropped), and L2-normalised per image; also the number of dead (constant) units.
The trial's own split (its data.seed) is rebuilt from the dataset, so the codes are the trial's.

Run: `uv run python benchmarks/code_scaling.py EXPERIMENT --tracking-uri URI [--trials 'case1-*,dense-*']`
"""

from __future__ import annotations

import argparse
import fnmatch

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment")
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--trials", default="*", help="comma-separated globs of trial names")
    args = parser.parse_args()

    import mlflow
    from mlflow import MlflowClient

    from fmnist_cluster.clustering import make_clusterer
    from fmnist_cluster.config import TrialConfig
    from fmnist_cluster.data import load_dataset
    from fmnist_cluster.metrics import score_all
    from fmnist_cluster.models import encoder_of

    study = TrialConfig()  # the study's KMeans: k-means++, n_init 10, max_iter 300, seed 0
    datasets = {}  # one load per data.seed, shared by that seed's trials
    mlflow.set_tracking_uri(args.tracking_uri)
    client = MlflowClient(args.tracking_uri)
    exp = client.get_experiment_by_name(args.experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`fmc.role` = 'trial' and attributes.status = 'FINISHED'",
                              max_results=1000)
    patterns = args.trials.split(",")
    runs = sorted((r for r in runs if r.data.params.get("model.kind") != "none"
                   and any(fnmatch.fnmatch(r.info.run_name, p) for p in patterns)), key=lambda r: r.info.run_name)
    print(f"{'trial':<16} {'dead':>5}  KMeans acc_majority / acc / nmi (percent)")
    print(f"{'':<16} {'':>5}  {'as logged':>22} {'codes as they are':>22} {'standardised':>22} {'L2 per image':>22}")
    for run in runs:
        (ae,) = mlflow.search_logged_models(experiment_ids=[exp.experiment_id], output_format="list",
                                            filter_string=f"source_run_id = '{run.info.run_id}' and name = 'autoencoder'")
        encoder = encoder_of(mlflow.keras.load_model(ae.model_uri))
        seed = int(run.data.params["data.seed"])
        if seed not in datasets:
            datasets[seed] = load_dataset(seed=seed)
        data = datasets[seed]
        codes = np.asarray(encoder.predict(data.x_test, batch_size=1024, verbose=0), dtype=np.float64)
        live = codes.std(axis=0) > 0
        variants = {
            "as-is": codes,
            "standardised": (codes[:, live] - codes[:, live].mean(0)) / codes[:, live].std(0),
            "l2": codes / np.maximum(np.linalg.norm(codes, axis=1, keepdims=True), 1e-12),
        }
        cells = []
        m = run.data.metrics
        cells.append(f"{100 * m['kmeans_acc_majority']:.2f} / {100 * m['kmeans_acc']:.2f} / {100 * m['kmeans_nmi']:.2f}")
        for x in variants.values():
            labels = make_clusterer("kmeans", study).fit_predict(x)
            s = score_all(data.y_test, labels)
            cells.append(f"{100 * s['acc_majority']:.2f} / {100 * s['acc']:.2f} / {100 * s['nmi']:.2f}")
        print(f"{run.info.run_name:<16} {int((~live).sum()):>5}  " + " ".join(f"{c:>22}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
