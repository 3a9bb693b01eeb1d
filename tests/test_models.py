import numpy as np
import pytest

from fmnist_cluster.config import ModelConfig
from fmnist_cluster.models import build_autoencoder, encoder_of, latent_dim

# study.md: encoder conv parameter counts and latent sizes
CASES = [
    (ModelConfig(kind="conv", filters=(64, 32, 16, 7)), 343, [640, 18464, 4624, 1015]),
    (ModelConfig(kind="conv", filters=(64, 32, 16, 7, 1)), 49, [640, 18464, 4624, 1015, 64]),
    (ModelConfig(kind="conv", filters=(32, 16, 7)), 343, [320, 4624, 1015]),
    (ModelConfig(kind="dense", units=(128, 64, 32)), 32, [100480, 8256, 2080]),
]


@pytest.mark.parametrize("model,latent,params", CASES, ids=lambda v: getattr(v, "label", lambda: None)())
def test_study_architectures(model, latent, params):
    autoencoder, encoder = build_autoencoder(model)
    assert latent_dim(encoder) == latent
    assert [layer.count_params() for layer in encoder.layers if layer.count_params()] == params
    assert tuple(autoencoder.output.shape[1:]) == (28, 28, 1)
    last = [layer for layer in autoencoder.layers if hasattr(layer, "activation")][-1]
    assert last.activation.__name__ == "sigmoid"
    assert autoencoder.loss == "mse"


@pytest.mark.parametrize("model", [CASES[1][0], CASES[3][0]], ids=["conv", "dense"])
def test_encoder_of_an_autoencoder_gives_the_encoders_codes(model):
    """The encoder recovered from an autoencoder (as one loaded back from MLflow) is the one built with it."""
    autoencoder, encoder = build_autoencoder(model)
    images = np.random.default_rng(0).random((5, 28, 28, 1), dtype=np.float32)
    recovered = encoder_of(autoencoder)
    assert latent_dim(recovered) == latent_dim(encoder)
    np.testing.assert_allclose(recovered.predict(images, verbose=0), encoder.predict(images, verbose=0), rtol=1e-6)
