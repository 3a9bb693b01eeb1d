"""MLflow model-from-code: "encoder + (manifold) + clusterer" for new Fashion-MNIST-like images.

Input: images as (n, 28, 28), (n, 28, 28, 1) or (n, 784) arrays (or a DataFrame of 784 columns),
pixels in [0, 1] or in [0, 255] (anything above 1 is taken as 0..255). Output: a DataFrame with
``cluster`` (0..k-1) and, for a Gaussian mixture, ``prob_0`` .. ``prob_{k-1}`` (a mixture of more
components than clusters sums each cluster's components, as the trial merged them).
Artifacts: ``clusterer`` (skops file), ``encoder`` (.keras) unless it clusters raw pixels, and
``manifold`` when the trial had one (PCA: skops; UMAP: joblib).

Every row is answered on its own, whatever else is in the request: PCA is a per-row map; UMAP's
``transform`` optimises the rows of one call together, so each row is encoded and embedded alone. A row whose code
is one of the codes UMAP was fitted on (an image of the trial's own evaluation split) gets its fitted
embedding, hence the trial's own cluster.
"""

import numpy as np
import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


def embed_rows(manifold, codes: np.ndarray, rtol: float = 1e-4) -> np.ndarray:
    """(n, n_components): each row of ``codes`` embedded alone (UMAP), or as the manifold maps it."""
    fitted, embedding = getattr(manifold, "_raw_data", None), getattr(manifold, "embedding_", None)
    if fitted is None or embedding is None:  # PCA and other per-row maps
        return np.asarray(manifold.transform(codes), dtype=np.float64)
    fitted = np.asarray(fitted, dtype=np.float32)
    out = np.empty((len(codes), embedding.shape[1]))
    for i, row in enumerate(codes):
        distance = np.sqrt(((fitted - row) ** 2).sum(axis=1))
        j = int(distance.argmin())
        if distance[j] <= rtol * (1.0 + np.linalg.norm(row)):  # a fitted image (float noise of the encoder)
            out[i] = embedding[j]
        else:
            out[i] = manifold.transform(row[None, :])[0]
    return out


class EncoderClusterer(PythonModel):
    def load_context(self, context):
        import skops.io

        self.clusterer = skops.io.load(context.artifacts["clusterer"])  # trusted types only
        self.encoder = self.manifold = None
        if "encoder" in context.artifacts:
            import keras

            self.encoder = keras.saving.load_model(context.artifacts["encoder"], compile=False)
        path = context.artifacts.get("manifold")
        if path and path.endswith(".skops"):
            self.manifold = skops.io.load(path)
        elif path:
            import joblib

            self.manifold = joblib.load(path)

    # np.ndarray: MLflow validates nothing itself (28x28 and 784-pixel images both pass); checked below
    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> pd.DataFrame:
        x = np.asarray(model_input.to_numpy() if hasattr(model_input, "to_numpy") else model_input,
                       dtype=np.float32)
        if x.size % 784 or x.ndim < 2:
            raise ValueError(f"expected images of 28x28 = 784 pixels each, got shape {x.shape}")
        x = x.reshape(-1, 28, 28, 1)
        if x.max(initial=0) > 1:
            x = x / 255.0
        if self.encoder is None:
            codes = x.reshape(len(x), -1)
        elif len(x) and getattr(self.manifold, "embedding_", None) is not None:
            # UMAP's embedding of a new code is chaotic in the code's last bits, and the encoder's float
            # noise depends on the batch it computes: encode each row alone, as UMAP embeds it
            codes = np.concatenate([np.asarray(self.encoder(x[i:i + 1], training=False)) for i in range(len(x))])
        else:
            codes = self.encoder.predict(x, verbose=0)
        codes = np.asarray(codes, dtype=np.float32)
        if self.manifold is not None:
            codes = embed_rows(self.manifold, codes)
        codes = np.asarray(codes, dtype=np.float64)
        if not hasattr(self.clusterer, "predict_proba"):
            return pd.DataFrame({"cluster": self.clusterer.predict(codes).astype(int)})
        probs = self.clusterer.predict_proba(codes)
        into = getattr(self.clusterer, "fmc_merged_into_", None)  # more components than clusters: merged
        if into is not None:
            merged = np.zeros((len(probs), int(into.max()) + 1))
            np.add.at(merged.T, into, probs.T)
            probs = merged
        out = pd.DataFrame({"cluster": probs.argmax(axis=1).astype(int)})
        for k in range(probs.shape[1]):
            out[f"prob_{k}"] = probs[:, k]
        return out


set_model(EncoderClusterer())
