"""DEC refinement (Xie, Girshick and Farhadi 2016, "Unsupervised deep embedding for clustering
analysis"): after the autoencoder's training, a copy of its encoder is trained further on the images
it clusters, so that its codes fall into tighter clusters. No label is used.

The codes' KMeans centres (20 restarts) start a clustering layer; each image's soft assignment q is a
Student's t kernel (one degree of freedom) around the centres; every ``update_interval`` batches the
target p sharpens q (q² over each cluster's frequency, normalised per image) and the encoder and the
centres follow KL(p || q) with SGD (momentum 0.9), as the paper. Training stops after ``epochs``
passes over the images, or earlier once fewer than ``tol`` of the images change their cluster
between two target updates. The trial's clusterers then run on the refined codes.

Written here because no library in fmc's stack has DEC; it is Keras 3 only (any backend): a layer
and ``train_on_batch``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def refine(encoder, images: np.ndarray, *, n_clusters: int, epochs: int, batch_size: int, update_interval: int,
           tol: float, learning_rate: float, seed: int) -> tuple[Any, dict[str, float]]:
    """``(refined copy of encoder, info)``; ``encoder`` itself is left as it is. ``info``: the
    iterations run, the epochs they make, and the share of images whose cluster changed at the last
    target update."""
    from sklearn.cluster import KMeans

    from fmnist_cluster.quiet import quiet_import

    keras = quiet_import("keras")
    copy = keras.models.clone_model(encoder)
    copy.set_weights(encoder.get_weights())
    codes = copy.predict(images, batch_size=1024, verbose=0)
    centres = KMeans(n_clusters=n_clusters, n_init=20, random_state=seed).fit(codes).cluster_centers_
    q_layer = _soft_assignment(keras, centres)
    model = keras.Model(copy.inputs, q_layer(copy.outputs[0]), name="dec")
    model.compile(optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9), loss=keras.losses.KLDivergence())
    rng = np.random.default_rng(seed)
    n = len(images)
    per_epoch = math.ceil(n / batch_size)
    total = epochs * per_epoch
    order = rng.permutation(n)
    previous, changed, it = None, 1.0, 0
    while it < total:
        if it % update_interval == 0:
            q = model.predict(images, batch_size=1024, verbose=0)
            labels = q.argmax(axis=1)
            if previous is not None:
                changed = float(np.mean(labels != previous))
                if changed < tol:
                    break
            previous = labels
            weight = q ** 2 / q.sum(axis=0)
            target = (weight.T / weight.sum(axis=1)).T
        b = it % per_epoch
        if b == 0 and it:
            order = rng.permutation(n)
        idx = order[b * batch_size:(b + 1) * batch_size]
        model.train_on_batch(images[idx], target[idx])
        it += 1
    return copy, {"dec_iterations": float(it), "dec_epochs": it / per_epoch, "dec_changed": changed}


def _soft_assignment(keras, centres: np.ndarray):
    """A layer: codes (n, d) -> q (n, k), Student's t (alpha = 1) around trainable centres."""
    ops = keras.ops

    class SoftAssignment(keras.layers.Layer):
        def build(self, input_shape):
            self.centres = self.add_weight(shape=centres.shape, initializer="zeros", name="centres")
            self.centres.assign(np.asarray(centres, dtype="float32"))

        def call(self, z):
            d2 = ops.sum(ops.square(ops.expand_dims(z, 1) - self.centres), axis=2)
            q = 1.0 / (1.0 + d2)
            return q / ops.sum(q, axis=1, keepdims=True)

    return SoftAssignment(name="soft_assignment")
