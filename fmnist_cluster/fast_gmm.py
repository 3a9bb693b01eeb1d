"""A Gaussian mixture fitted by EM with all restarts batched, in Keras ops (any backend, CPU or GPU).

scikit-learn's ``GaussianMixture`` is the reference: same model, same initialisation (its own KMeans
on the same random stream, so restart ``i`` starts where scikit-learn's restart ``i`` starts), same
E/M steps, ``reg_covar``, stopping rule (change of the mean log-likelihood below ``tol``) and choice of
the best restart. What differs is how the work is done:

- all ``n_init`` restarts advance together as batched tensors; a restart leaves the batch when it
  converges, so the batch shrinks instead of idling;
- the heavy products (``n x d x d`` per component) run in float32 on data centred once, while the
  small ``d x d`` factorisations (Cholesky, triangular inverse) run in float64;
- the fitted model is handed back as a scikit-learn ``GaussianMixture`` (``to_sklearn``), so that
  predicting, saving (skops) and serving do not change with the implementation.

No maintained library fitted: scikit-learn runs restarts one after the other in float64 on the CPU,
and its array-API path does not batch restarts nor allow its KMeans initialisation; GPU mixtures
elsewhere come with a second deep-learning framework or are unmaintained.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture
from sklearn.utils import check_random_state

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


class FastGaussianMixture:
    """EM for a Gaussian mixture with ``n_init`` restarts batched; parameters as scikit-learn's.

    ``chunk_bytes`` bounds the temporaries of the full-covariance steps (restarts are processed in
    chunks that fit); ``n_blocks`` splits the features into column blocks so that the products with
    triangular (E step) and symmetric (M step) matrices skip their zero or mirrored blocks.
    """

    def __init__(self, n_components: int = 1, *, covariance_type: str = "full", tol: float = 1e-3,
                 reg_covar: float = 1e-6, max_iter: int = 100, n_init: int = 1, random_state=None,
                 dtype: str = "float32", chunk_bytes: int = 512 * 2**20, n_blocks: int = 4):
        if covariance_type not in COVARIANCE_TYPES:
            raise ValueError(f"covariance_type must be one of {COVARIANCE_TYPES}, got {covariance_type!r}")
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.random_state = random_state
        self.dtype = dtype
        self.chunk_bytes = chunk_bytes
        self.n_blocks = n_blocks

    # ----------------------------------------------------------------- public API
    def initial_responsibilities(self, X: np.ndarray) -> np.ndarray:
        """(n_init, n, K) one-hot responsibilities from scikit-learn's own KMeans initialisation."""
        X = np.asarray(X, dtype=np.float64)
        rng = check_random_state(self.random_state)
        resp = np.zeros((self.n_init, len(X), self.n_components), dtype=np.float64)
        for r in range(self.n_init):
            labels = KMeans(n_clusters=self.n_components, n_init=1, random_state=rng).fit(X).labels_
            resp[r, np.arange(len(X)), labels] = 1.0
        return resp

    def fit(self, X, resp_init: np.ndarray | None = None) -> FastGaussianMixture:
        """Fit on ``X`` (n, d). ``resp_init`` (n_init, n, K) overrides the KMeans initialisation."""
        import keras
        from keras import ops

        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or len(X) < self.n_components:
            raise ValueError(f"X must be (n >= {self.n_components}, d), got {X.shape}")
        resp0 = self.initial_responsibilities(X) if resp_init is None else np.asarray(resp_init, np.float64)
        n_init = resp0.shape[0]
        # Features constant over the data (dead ReLU units) add the same term to every component's
        # log-density (their variance is reg_covar, their mean the constant): they leave the
        # responsibilities alone, so EM runs without them and the term is added back to the bound.
        # Spherical covariances mix all features into one variance, so they keep them.
        varying = np.ptp(X, axis=0) > 0
        if self.covariance_type == "spherical" or not varying.any():
            varying[:] = True
        self._varying = varying
        constant_term = (~varying).sum() * -0.5 * math.log(2 * math.pi * self.reg_covar)
        shift = X[:, varying].mean(axis=0)  # centring once keeps float32 products away from cancellation
        Xc = np.concatenate([np.ones((len(X), 1)), X[:, varying] - shift], axis=1)  # [1, x]: see _e_step
        Xc = ops.convert_to_tensor(Xc.astype(self.dtype))
        self._keras = keras

        state = self._m_step(Xc, ops.convert_to_tensor(resp0.astype(self.dtype)))
        active = np.arange(n_init)
        lower = np.full(n_init, -np.inf)
        n_iter = np.zeros(n_init, dtype=int)
        converged = np.zeros(n_init, dtype=bool)
        final: dict[int, dict[str, np.ndarray]] = {}
        history: dict[int, list[float]] = {r: [] for r in range(n_init)}
        for it in range(1, self.max_iter + 1):
            log_norm, log_resp = self._e_step(Xc, state)
            state = self._m_step(Xc, ops.exp(log_resp))
            bound = ops.convert_to_numpy(ops.mean(log_norm, axis=1)).astype(np.float64) + constant_term
            change = bound - lower[active]
            lower[active] = bound
            n_iter[active] = it
            for i, r in enumerate(active):
                history[r].append(float(bound[i]))
            done = np.abs(change) < self.tol
            converged[active[done]] = True
            if it == self.max_iter:
                done[:] = True
            if done.any():
                numpy_state = {k: ops.convert_to_numpy(v) for k, v in state.items()}
                for i in np.flatnonzero(done):
                    final[int(active[i])] = {k: v[i] for k, v in numpy_state.items()}
                keep = np.flatnonzero(~done)
                active = active[keep]
                if not len(active):
                    break
                keep_t = ops.convert_to_tensor(keep, dtype="int32")
                state = {k: ops.take(v, keep_t, axis=0) for k, v in state.items()}

        best = int(np.argmax(lower))  # the first of equal bounds, as scikit-learn
        self.lower_bounds_per_init_ = lower
        self.n_iter_per_init_ = n_iter
        self._set_params(final[best], X, shift)
        self.converged_ = bool(converged[best])
        self.n_iter_ = int(n_iter[best])
        self.lower_bound_ = float(lower[best])
        self.lower_bounds_ = history[best]
        self.n_features_in_ = X.shape[1]
        return self

    def _set_params(self, params: dict[str, np.ndarray], X: np.ndarray, shift: np.ndarray) -> None:
        """Store the best restart's parameters in scikit-learn's layout, constant features put back."""
        varying, d, K, reg = self._varying, X.shape[1], self.n_components, self.reg_covar
        v = np.flatnonzero(varying)
        self.weights_ = params["weights"].astype(np.float64)
        self.means_ = np.repeat(X[:1], K, axis=0)  # constant features: their value
        self.means_[:, v] = params["means"].astype(np.float64) + shift
        cov, pc = params["covariances"].astype(np.float64), params["prec_chol"].astype(np.float64)
        kind = self.covariance_type
        if kind in ("full", "tied"):
            shape = (K, d, d) if kind == "full" else (d, d)
            self.covariances_ = np.zeros(shape)
            self.precisions_cholesky_ = np.zeros(shape)
            self.covariances_[..., range(d), range(d)] = reg
            self.precisions_cholesky_[..., range(d), range(d)] = 1 / math.sqrt(reg)
            self.covariances_[..., v[:, None], v[None, :]] = cov
            self.precisions_cholesky_[..., v[:, None], v[None, :]] = pc
        elif kind == "diag":
            self.covariances_ = np.full((K, d), reg)
            self.precisions_cholesky_ = np.full((K, d), 1 / math.sqrt(reg))
            self.covariances_[:, v], self.precisions_cholesky_[:, v] = cov, pc
        else:
            self.covariances_, self.precisions_cholesky_ = cov, pc

    def to_sklearn(self) -> GaussianMixture:
        """The fitted mixture as a fitted scikit-learn ``GaussianMixture`` (predict, score, skops)."""
        gm = GaussianMixture(n_components=self.n_components, covariance_type=self.covariance_type,
                             tol=self.tol, reg_covar=self.reg_covar, max_iter=self.max_iter, n_init=self.n_init,
                             random_state=self.random_state)
        pc = self.precisions_cholesky_
        if self.covariance_type == "full":
            precisions = np.einsum("kij,klj->kil", pc, pc)
        elif self.covariance_type == "tied":
            precisions = pc @ pc.T
        else:
            precisions = pc**2
        gm.weights_, gm.means_, gm.covariances_ = self.weights_, self.means_, self.covariances_
        gm.precisions_cholesky_, gm.precisions_ = pc, precisions
        gm.converged_, gm.n_iter_, gm.lower_bound_ = self.converged_, self.n_iter_, self.lower_bound_
        gm.lower_bounds_, gm.n_features_in_ = self.lower_bounds_, self.n_features_in_
        return gm

    def fit_predict(self, X, resp_init: np.ndarray | None = None) -> np.ndarray:
        """Fit, then label ``X`` with the fitted model (scikit-learn's float64 E-step, as its fit_predict)."""
        self.fit(X, resp_init)
        return self.to_sklearn().predict(np.asarray(X, dtype=np.float64))

    # ----------------------------------------------------------------- EM, batched over restarts
    def _blocks(self, d: int) -> list[tuple[int, int]]:
        """Column blocks of the d features: products with triangular or symmetric d x d matrices skip
        the blocks that are zero (or mirrored), which saves (b - 1) / 2b of their work for b blocks."""
        b = max(1, min(self.n_blocks, d // 32 or 1))
        edges = np.linspace(0, d, b + 1).round().astype(int)
        return [(int(a), int(z)) for a, z in zip(edges[:-1], edges[1:]) if z > a]

    def _chunks(self, n_restarts: int, n: int, d: int) -> list[slice]:
        per_restart = 2 * self.n_components * n * d * np.dtype(self.dtype).itemsize // len(self._blocks(d))
        size = max(1, min(n_restarts, self.chunk_bytes // max(per_restart, 1)))
        return [slice(i, min(i + size, n_restarts)) for i in range(0, n_restarts, size)]

    def _m_step(self, X, resp) -> dict:
        """Parameters from responsibilities ``resp`` (R, n, K); X (n, d + 1) is [1, centred data]."""
        ops = self._keras.ops
        n, d = X.shape[0], X.shape[1] - 1
        R, K = resp.shape[0], resp.shape[2]
        kind = self.covariance_type
        reg = self.reg_covar
        eye = ops.eye(d, dtype=self.dtype)
        nk = ops.sum(resp, axis=1) + 10 * np.finfo(self.dtype).eps  # (R, K)
        if kind == "full":
            # S = [1, x]^T diag(r_k) [1, x] for every (restart, component) at once: block column j
            # of its upper part is X[:, :end_j]^T @ (r * X[:, block j]) (a symmetric matrix's lower
            # blocks are its upper blocks mirrored, so they are not computed).
            parts = []
            for s in self._chunks(R, n, d):
                rr = ops.reshape(ops.transpose(resp[s], (1, 0, 2)), (n, -1))  # (n, r*K)
                cols = []
                for a, z in self._blocks(d):
                    w = ops.reshape(rr[:, :, None] * X[:, None, 1 + a:1 + z], (n, -1))  # (n, rK*bs)
                    upper = ops.matmul(ops.transpose(X[:, :1 + z]), w)  # (1 + z, rK*bs)
                    upper = ops.reshape(upper, (1 + z, -1, z - a))
                    cols.append(ops.pad(upper, ((0, d - z), (0, 0), (0, 0))))  # zeros below the diagonal block
                parts.append(ops.transpose(ops.concatenate(cols, axis=-1), (1, 0, 2)))  # (rK, 1 + d, d)
            S = ops.reshape(ops.concatenate(parts, axis=0) if len(parts) > 1 else parts[0], (R, K, 1 + d, d))
            sums, S = S[:, :, 0, :], S[:, :, 1:, :]  # sum_n r x (R, K, d); the block-upper part of X^T R X
            S = S + ops.swapaxes(S * self._strict_upper(d), -1, -2)
            means = sums / nk[..., None]
            cov = S / nk[..., None, None] - means[..., :, None] * means[..., None, :] + reg * eye
        else:
            Xd = X[:, 1:]
            means = ops.einsum("rnk,nd->rkd", resp, Xd) / nk[..., None]  # (R, K, d)
            if kind == "tied":
                mm = ops.einsum("rk,rki,rkj->rij", nk, means, means)
                cov = (ops.matmul(ops.transpose(Xd), Xd)[None] - mm) / ops.sum(nk, axis=1)[:, None, None] + reg * eye
            else:
                avg_x2 = ops.einsum("rnk,nd->rkd", resp, Xd * Xd) / nk[..., None]
                var = avg_x2 - means * means + reg  # (R, K, d): E[x^2] - mu^2, as scikit-learn
                cov = var if kind == "diag" else ops.mean(var, axis=-1)
        state = {"weights": nk / n, "means": means, "covariances": cov}
        state["prec_chol"] = self._precision_cholesky(cov)
        return state

    def _strict_upper(self, d: int):
        """(d, d) mask of the blocks above the block diagonal."""
        ops = self._keras.ops
        block = np.zeros(d, dtype=int)
        for i, (a, z) in enumerate(self._blocks(d)):
            block[a:z] = i
        return ops.convert_to_tensor((block[:, None] < block[None, :]).astype(self.dtype))

    def _precision_cholesky(self, cov):
        ops = self._keras.ops
        if self.covariance_type in ("diag", "spherical"):
            return 1.0 / ops.sqrt(cov)
        cov64 = ops.cast(cov, "float64")
        error = FloatingPointError("fast GMM: a covariance is not positive definite (a collapsed component); "
                                   "increase reg_covar or use gmm.impl: sklearn")
        try:
            chol = ops.cholesky(cov64)
        except Exception as exc:  # noqa: BLE001 (each backend raises its own type)
            raise error from exc
        if not bool(ops.convert_to_numpy(ops.all(ops.isfinite(chol)))):
            raise error
        eye = ops.broadcast_to(ops.eye(cov.shape[-1], dtype="float64"), chol.shape)
        inv = ops.solve_triangular(chol, eye, lower=True)  # L^-1
        return ops.cast(ops.swapaxes(inv, -1, -2), self.dtype)  # precision Cholesky: L^-T (upper)

    def _e_step(self, X, state):
        """(log p(x) per restart (R, n), log responsibilities (R, n, K)); X (n, d + 1) is [1, data]."""
        ops = self._keras.ops
        n, d = X.shape[0], X.shape[1] - 1
        means, pc = state["means"], state["prec_chol"]
        R, K = means.shape[0], means.shape[1]
        kind = self.covariance_type
        if kind in ("full", "tied"):
            if kind == "tied":
                pc = ops.repeat(pc[:, None], K, axis=1)
            log_det = ops.sum(ops.log(ops.diagonal(pc, axis1=-2, axis2=-1)), axis=-1)  # (R, K)
            # y = [1, x] @ [-mu P; P]: P is upper triangular, so block column j of y only needs the
            # first 1 + end_j rows: one product per block for all restarts and components together.
            shifted = ops.concatenate([-ops.einsum("rkd,rkde->rke", means, pc)[:, :, None, :], pc], axis=2)
            parts = []
            for s in self._chunks(R, n, d):
                maha = 0.0
                for a, z in self._blocks(d):
                    p = ops.transpose(shifted[s, :, :1 + z, a:z], (2, 0, 1, 3))  # (1 + z, r, K, bs)
                    y = ops.reshape(ops.matmul(X[:, :1 + z], ops.reshape(p, (1 + z, -1))), (n, -1, K, z - a))
                    maha = maha + ops.einsum("nrkb,nrkb->rnk", y, y)
                parts.append(maha)
            maha = ops.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]  # (R, n, K)
        else:
            Xd = X[:, 1:]
            prec = pc * pc  # (R, K, d) or (R, K)
            if kind == "spherical":
                log_det = d * ops.log(pc)
                sq_means = ops.sum(means * means, axis=-1) * prec
                cross = ops.einsum("nd,rkd->rnk", Xd, means * prec[..., None])
                sq_x = ops.sum(Xd * Xd, axis=1)[None, :, None] * prec[:, None, :]
            else:
                log_det = ops.sum(ops.log(pc), axis=-1)
                sq_means = ops.sum(means * means * prec, axis=-1)
                cross = ops.einsum("nd,rkd->rnk", Xd, means * prec)
                sq_x = ops.einsum("nd,rkd->rnk", Xd * Xd, prec)
            maha = sq_means[:, None, :] - 2 * cross + sq_x
        log_gauss = -0.5 * (d * math.log(2 * math.pi) + maha) + log_det[:, None, :]
        weighted = log_gauss + ops.log(state["weights"])[:, None, :]
        log_norm = ops.logsumexp(weighted, axis=-1)  # (R, n)
        return log_norm, weighted - log_norm[..., None]
