"""The fast Gaussian mixture reaches scikit-learn's answer on real latent codes (case 1's encoder)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

from fmnist_cluster.clustering import fit_predict
from fmnist_cluster.config import TrialConfig
from fmnist_cluster.data import load_dataset
from fmnist_cluster.fast_gmm import FastGaussianMixture
from fmnist_cluster.metrics import score_all
from fmnist_cluster.trial import run_trial


@pytest.fixture(scope="module")
def codes():
    """Latent codes of 1,500 test images from case 1's autoencoder after one epoch on 1,500 images."""
    config = TrialConfig(epochs=1, data={"subset": 1500}, clusterers=["kmeans"], kmeans={"n_init": 1})
    data = load_dataset(seed=0, subset=1500)
    result = run_trial(config, data=data, threads=2, figures=False)
    z = result.models["encoder"].predict(data.x_test, batch_size=500, verbose=0)
    assert z.shape == (1500, 343)
    return z.astype(np.float64), data.y_test


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_same_answer_as_sklearn(codes, covariance_type):
    x, y = codes
    settings = dict(covariance_type=covariance_type, n_init=2, max_iter=300, random_state=0)
    reference = GaussianMixture(10, **settings)
    ref_labels = reference.fit_predict(x)
    fast = FastGaussianMixture(10, **settings)
    labels = fast.fit_predict(x)

    # same initialisation (scikit-learn's KMeans on the same random stream) -> same optimum
    rel = abs(fast.lower_bound_ - reference.lower_bound_) / abs(reference.lower_bound_)
    assert rel < 1e-3, (fast.lower_bound_, reference.lower_bound_)
    assert fast.converged_
    ours, theirs = score_all(y, labels), score_all(y, ref_labels)
    for score in ("acc", "acc_majority", "nmi", "ari"):
        assert abs(ours[score] - theirs[score]) < 0.02, (score, ours, theirs)

    # the hand-back is a fitted scikit-learn model that agrees with the labels and the bound
    model = fast.to_sklearn()
    assert (model.predict(x) == labels).all()
    assert model.score(x) == pytest.approx(fast.lower_bound_, rel=1e-3)
    assert model.covariances_.shape == reference.covariances_.shape
    np.testing.assert_allclose(model.predict_proba(x[:10]).sum(axis=1), 1.0, rtol=1e-6)


def test_constant_features_are_exact(codes):
    """Dead units are left out of EM and their term added back: the bound matches scikit-learn's on
    data with many constant columns, and the means keep the constants."""
    x, _ = codes
    x = np.concatenate([x[:, :40], np.zeros((len(x), 30)), np.full((len(x), 5), 2.5)], axis=1)
    reference = GaussianMixture(10, n_init=1, random_state=1).fit(x)
    fast = FastGaussianMixture(10, n_init=1, random_state=1).fit(x)
    assert abs(fast.lower_bound_ - reference.lower_bound_) / abs(reference.lower_bound_) < 1e-3
    assert np.allclose(fast.means_[:, 40:70], 0) and np.allclose(fast.means_[:, 70:], 2.5)


def test_trial_config_selects_it(codes):
    x, y = codes
    config = TrialConfig(model={"kind": "none"}, gmm={"impl": "fast", "n_init": 2, "covariance_type": "diag"})
    estimator, labels = fit_predict("gmm", config, x)
    assert isinstance(estimator, GaussianMixture) and estimator.n_init == 2
    assert set(np.unique(labels)) <= set(range(10)) and score_all(y, labels)["acc"] > 0.3
    assert config.flat()["gmm.impl"] == "fast"
    assert TrialConfig().gmm.impl == "sklearn"  # scikit-learn stays the reference by default
