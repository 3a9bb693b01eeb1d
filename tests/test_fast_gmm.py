"""The fast Gaussian mixture reaches scikit-learn's answer on real latent codes: case 1's conv encoder
and the study's dense encoder (whose near-dead ReLU units once broke the float32 covariances)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

from fmnist_cluster.clustering import fit_predict
from fmnist_cluster.config import TrialConfig
from fmnist_cluster.data import load_dataset
from fmnist_cluster.fast_gmm import FastGaussianMixture
from fmnist_cluster.metrics import acc, score_all
from fmnist_cluster.trial import run_trial


def _codes(model: dict, epochs: int, subset: int) -> tuple[np.ndarray, np.ndarray]:
    """Latent codes of the ``subset`` test images from an autoencoder trained on ``subset`` images."""
    config = TrialConfig(model=model, epochs=epochs, data={"subset": subset}, clusterers=["kmeans"],
                         kmeans={"n_init": 1})
    data = load_dataset(seed=0, subset=subset)
    result = run_trial(config, data=data, threads=2, figures=False)
    z = result.models["encoder"].predict(data.x_test, batch_size=500, verbose=0)
    return z.astype(np.float64), data.y_test


@pytest.fixture(scope="module")
def codes():
    """Case 1's encoder (64-32-16-7, latent 343) after one epoch on 1,500 images."""
    x, y = _codes({"kind": "conv", "filters": [64, 32, 16, 7]}, 1, 1500)
    assert x.shape == (1500, 343)
    return x, y


@pytest.fixture(scope="module")
def dense_codes():
    """The study's dense encoder (784-128-64-32) after 3 epochs on 2,000 images: several of its 32
    units are zero for whole clusters, the case that made float32 covariances non-positive-definite."""
    x, y = _codes({"kind": "dense", "units": [128, 64, 32]}, 3, 2000)
    assert x.shape == (2000, 32)
    return x, y


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
@pytest.mark.parametrize("encoder", ["conv", "dense"])
def test_same_answer_as_sklearn(request, encoder, covariance_type):
    x, y = request.getfixturevalue("codes" if encoder == "conv" else "dense_codes")
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
        assert abs(ours[score] - theirs[score]) < 0.01, (score, ours, theirs)
    # the same clusters image by image (components matched one to one; float32 against float64
    # products may move an image on a component boundary, never a cluster)
    assert acc(ref_labels, labels) >= 0.99, acc(ref_labels, labels)

    # the hand-back is a fitted scikit-learn model that agrees with the labels and the bound
    model = fast.to_sklearn()
    assert (model.predict(x) == labels).all()
    assert model.score(x) == pytest.approx(fast.lower_bound_, rel=1e-3)
    assert model.covariances_.shape == reference.covariances_.shape
    np.testing.assert_allclose(model.predict_proba(x[:10]).sum(axis=1), 1.0, rtol=1e-6)


def test_recovers_in_float64_where_float32_fails(dense_codes):
    """Collinear features (copies of columns) leave each component's covariance only reg_covar in one
    direction: float32 rounding makes it indefinite; those restarts are redone in float64 and the fit
    succeeds where scikit-learn's does."""
    x, _ = dense_codes
    x = np.concatenate([x, 10 * x[:, :8], 10 * x[:, :8]], axis=1)
    reference = GaussianMixture(10, n_init=1, random_state=0).fit(x)
    fast = FastGaussianMixture(10, n_init=1, random_state=0).fit(x)
    assert fast.float64_recoveries_ > 0
    assert np.isfinite(fast.lower_bound_) and fast.converged_
    assert abs(fast.lower_bound_ - reference.lower_bound_) / abs(reference.lower_bound_) < 0.01


def test_sparse_m_step_skips_rows_and_keeps_the_answer(codes):
    """Rows with negligible weight for a component are left out of its covariance product: after the
    first iterations the products run over a fraction of the rows, and the bound is unchanged."""
    x, _ = codes
    sparse = FastGaussianMixture(10, n_init=1, random_state=0).fit(x)
    exact = FastGaussianMixture(10, n_init=1, random_state=0, row_tol=None).fit(x)
    assert np.median(sparse.rows_used_) < 0.5 and min(exact.rows_used_) == 1
    assert sparse.lower_bound_ == pytest.approx(exact.lower_bound_, rel=1e-5)


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
