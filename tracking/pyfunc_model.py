"""MLflow model-from-code: "encoder + clusterer" for new Fashion-MNIST-like images.

Input: images as (n, 28, 28), (n, 28, 28, 1) or (n, 784) arrays (or a DataFrame of 784 columns),
pixels in [0, 1] or in [0, 255] (anything above 1 is taken as 0..255). Output: a DataFrame with
``cluster`` (0..k-1) and, for a Gaussian mixture, ``prob_0`` .. ``prob_{k-1}``.
Artifacts: ``clusterer`` (skops file) and, unless it clusters raw pixels, ``encoder`` (.keras).
"""

import numpy as np
import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class EncoderClusterer(PythonModel):
    def load_context(self, context):
        import skops.io

        self.clusterer = skops.io.load(context.artifacts["clusterer"])  # trusted types only
        self.encoder = None
        if "encoder" in context.artifacts:
            import keras

            self.encoder = keras.saving.load_model(context.artifacts["encoder"], compile=False)

    def predict(self, context, model_input, params=None):
        x = np.asarray(model_input.to_numpy() if hasattr(model_input, "to_numpy") else model_input,
                       dtype=np.float32)
        if x.size % 784 or x.ndim < 2:
            raise ValueError(f"expected images of 28x28 = 784 pixels each, got shape {x.shape}")
        x = x.reshape(-1, 28, 28, 1)
        if x.max(initial=0) > 1:
            x = x / 255.0
        codes = x.reshape(len(x), -1) if self.encoder is None else self.encoder.predict(x, verbose=0)
        codes = np.asarray(codes, dtype=np.float64)
        out = pd.DataFrame({"cluster": self.clusterer.predict(codes).astype(int)})
        if hasattr(self.clusterer, "predict_proba"):
            probs = self.clusterer.predict_proba(codes)
            for k in range(probs.shape[1]):
                out[f"prob_{k}"] = probs[:, k]
        return out


set_model(EncoderClusterer())
