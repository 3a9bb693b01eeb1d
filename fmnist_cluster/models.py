"""Autoencoders of the reference study, in the Keras 3 API only (any KERAS_BACKEND).

Conv: 3x3 same-padding ReLU convs, 2x2 max-pooling after the first two, the last conv's output
flattened is the latent code; the decoder mirrors the encoder with upsampling and ends in a
1-channel sigmoid conv. Dense: ReLU layers, mirrored, sigmoid output. The latent layer is ReLU as in
the study, or linear (``latent_activation: linear``, as in DEC and N2D: no dead units).
"""

from __future__ import annotations

import os

from fmnist_cluster.config import ModelConfig

_configured = False


def configure_backend(*, threads: int | None = None, seed: int | None = None) -> None:
    """Set thread pools, GPU memory growth and determinism before the backend runs its first op.

    ``threads`` caps the backend's CPU pools (a Ray trial's CPU share). Must run before Keras builds
    anything in this process; later calls only reseed.
    """
    global _configured
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")  # share a GPU between trials
    from fmnist_cluster.quiet import quiet_import

    keras = quiet_import("keras")

    if not _configured:
        _configured = True
        backend = keras.backend.backend()
        if backend == "tensorflow":
            import tensorflow as tf

            try:  # only possible before TensorFlow's first op; later it keeps its pools
                if threads:
                    tf.config.threading.set_intra_op_parallelism_threads(threads)
                    tf.config.threading.set_inter_op_parallelism_threads(min(threads, 2))
                for gpu in tf.config.list_physical_devices("GPU"):
                    tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError:
                pass
            tf.config.experimental.enable_op_determinism()  # same seed, same machine -> same metrics
        elif backend == "torch" and threads:
            import torch

            torch.set_num_threads(threads)
    if seed is not None:
        keras.utils.set_random_seed(seed)


def build_autoencoder(model: ModelConfig, *, learning_rate: float = 1e-3):
    """Return ``(autoencoder, encoder)``, compiled with MSE loss and Adam.

    Both take images of shape (n, 28, 28, 1); the encoder returns latent codes (n, latent_dim).
    """
    from fmnist_cluster.quiet import quiet_import

    keras = quiet_import("keras")
    layers = keras.layers

    inputs = keras.Input((28, 28, 1), name="image")
    if model.kind == "conv":
        x = inputs
        for i, f in enumerate(model.filters):
            last = i == len(model.filters) - 1
            x = layers.Conv2D(f, 3, padding="same", activation=model.latent_activation if last else "relu",
                              name=f"enc_conv{i}")(x)
            if i < 2:
                x = layers.MaxPooling2D(2, name=f"enc_pool{i}")(x)  # 28 -> 14 -> 7
        latent = layers.Flatten(name="latent")(x)  # (n, 7 * 7 * filters[-1])
        y = x
        for i in reversed(range(len(model.filters) - 1)):  # mirror; the latent conv is not repeated
            if i < 2:
                y = layers.UpSampling2D(2, name=f"dec_up{i}")(y)  # 7 -> 14 -> 28
            y = layers.Conv2D(model.filters[i], 3, padding="same", activation="relu", name=f"dec_conv{i}")(y)
        outputs = layers.Conv2D(1, 3, padding="same", activation="sigmoid", name="reconstruction")(y)
    elif model.kind == "dense":
        x = layers.Flatten(name="flatten")(inputs)  # (n, 784)
        for i, u in enumerate(model.units):
            last = i == len(model.units) - 1
            x = layers.Dense(u, activation=model.latent_activation if last else "relu", name=f"enc_dense{i}")(x)
        latent = x
        y = x
        for i in reversed(range(len(model.units) - 1)):
            y = layers.Dense(model.units[i], activation="relu", name=f"dec_dense{i}")(y)
        y = layers.Dense(784, activation="sigmoid", name="dec_out")(y)
        outputs = layers.Reshape((28, 28, 1), name="reconstruction")(y)
    else:
        raise ValueError(f"kind {model.kind!r} has no autoencoder")
    autoencoder = keras.Model(inputs, outputs, name=f"autoencoder_{model.label()}")
    encoder = keras.Model(inputs, latent, name=f"encoder_{model.label()}")
    autoencoder.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse")
    return autoencoder, encoder


def encoder_of(autoencoder):
    """The encoder inside an autoencoder built by :func:`build_autoencoder` (e.g. one loaded back from
    MLflow): the last ``enc_*`` layer's output, flattened as the encoder built alongside returns it."""
    from fmnist_cluster.quiet import quiet_import

    keras = quiet_import("keras")
    last = [layer for layer in autoencoder.layers if layer.name.startswith(("enc_conv", "enc_dense"))][-1]
    return keras.Model(autoencoder.inputs, keras.layers.Flatten(name="latent")(last.output))


def latent_dim(encoder) -> int:
    """Size of the flattened latent code."""
    return int(encoder.output.shape[-1])
