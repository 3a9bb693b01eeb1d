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
                 dtype: str = "float32", chunk_bytes: int = 512 * 2**20, n_blocks: int = 4,
                 row_tol: float | None = 1e-2):
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
        self.row_tol = row_tol

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
        from fmnist_cluster.quiet import quiet_import

        keras = quiet_import("keras")
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
        X64 = X[:, varying] - shift
        Xc = np.concatenate([np.ones((len(X), 1)), X64], axis=1)  # [1, x]: see _e_step
        Xc = ops.convert_to_tensor(Xc.astype(self.dtype))
        self._keras = keras
        self.rows_used_: list[float] = []  # per M step: share of the rows the products ran over
        self.float64_recoveries_ = 0  # restarts whose covariance had to be recomputed in float64

        state = self._m_step(Xc, ops.convert_to_tensor(resp0.astype(self.dtype)), X64)
        active = np.arange(n_init)
        lower = np.full(n_init, -np.inf)
        n_iter = np.zeros(n_init, dtype=int)
        converged = np.zeros(n_init, dtype=bool)
        final: dict[int, dict[str, np.ndarray]] = {}
        history: dict[int, list[float]] = {r: [] for r in range(n_init)}
        for it in range(1, self.max_iter + 1):
            log_norm, log_resp = self._e_step(Xc, state)
            state = self._m_step(Xc, ops.exp(log_resp), X64)
            bound = ops.convert_to_numpy(log_norm).astype(np.float64).mean(axis=1) + constant_term
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

    def _chunks(self, n_items: int, bytes_per_item: int) -> list[slice]:
        """Slices of ``n_items`` whose temporaries (``bytes_per_item`` each) fit in ``chunk_bytes``."""
        size = max(1, min(n_items, self.chunk_bytes // max(bytes_per_item, 1)))
        return [slice(i, min(i + size, n_items)) for i in range(0, n_items, size)]

    def _m_step(self, X, resp, X64: np.ndarray) -> dict:
        """Parameters from responsibilities ``resp`` (R, n, K); X (n, d + 1) is [1, centred data] and
        ``X64`` the same centred data (n, d) in float64, for the rare restart that float32 cannot fit."""
        ops = self._keras.ops
        n, d = X.shape[0], X.shape[1] - 1
        Xd = X[:, 1:]
        kind = self.covariance_type
        nk = ops.sum(resp, axis=1) + 10 * np.finfo(self.dtype).eps  # (R, K)
        means = ops.einsum("rnk,nd->rkd", resp, Xd) / nk[..., None]  # (R, K, d)
        scatter = self._scatter(Xd, resp, means, nk, diagonal=kind in ("diag", "spherical"))
        if kind == "full":
            cov = scatter / nk[..., None, None] + self.reg_covar * ops.eye(d, dtype=self.dtype)
        elif kind == "tied":  # sum_k sum_n r (x - mu_k)(x - mu_k)^T / n, as scikit-learn's
            cov = ops.sum(scatter, axis=1) / ops.sum(nk, axis=1)[:, None, None] + self.reg_covar * ops.eye(d, dtype=self.dtype)
        else:
            var = scatter / nk[..., None] + self.reg_covar  # (R, K, d)
            cov = var if kind == "diag" else ops.mean(var, axis=-1)
        state = {"weights": nk / n, "means": means, "covariances": cov}
        try:
            state["prec_chol"] = self._precision_cholesky(cov)
        except FloatingPointError:
            state.update(self._recover_float64(X64, resp, cov))
        return state

    def _scatter(self, Xd, resp, means, nk, *, diagonal: bool):
        """Centred scatter of every (restart, component): sum_n r_nk (x_n - mu_k)(x_n - mu_k)^T, as
        (R, K, d, d), or only its diagonal (R, K, d).

        Centring per component keeps float32 exact enough where a feature is (nearly) constant inside
        a component (a ReLU unit that is zero for all its members): the uncentred E[x x^T] - mu mu^T
        cancels there, down to a variance below ``reg_covar`` or a covariance that is not positive
        definite. Rows whose weighted distance to a component's mean is below ``row_tol * reg_covar *
        n_k / n`` are skipped for that component (their total share of any entry of the covariance is
        below ``row_tol * reg_covar``): once EM has settled, most rows belong to one component, so the
        products run over about n / K rows per component instead of n.
        """
        ops = self._keras.ops
        n, d = Xd.shape
        R, K = means.shape[0], means.shape[1]
        B = R * K
        w = ops.reshape(ops.transpose(resp, (0, 2, 1)), (B, n))  # (B, n)
        mu = ops.reshape(means, (B, d))
        m, score = n, None
        if self.row_tol is not None:
            x2 = ops.sum(Xd * Xd, axis=1)  # (n,)
            m2 = ops.sum(mu * mu, axis=1)  # (B,)
            dist = x2[None, :] - 2 * ops.matmul(mu, ops.transpose(Xd)) + m2[:, None]  # ||x - mu||^2, (B, n)
            # plus the float32 rounding of that difference, so that no row is dropped on a rounding error
            slack = 8 * np.finfo(self.dtype).eps * (x2[None, :] + m2[:, None])
            score = w * (ops.maximum(dist, 0.0) + slack)
            limit = self.row_tol * self.reg_covar * ops.reshape(nk, (B, 1)) / n
            m = max(1, int(ops.convert_to_numpy(ops.max(ops.sum(ops.cast(score > limit, "int32"), axis=1)))))
        sparse = m < 0.75 * n
        self.rows_used_.append(m / n)
        itemsize = np.dtype(self.dtype).itemsize
        parts = []
        for s in self._chunks(B, 3 * (m if sparse else n) * d * itemsize):
            if sparse:
                _, idx = ops.top_k(score[s], m)  # (b, m): the rows that matter to each component
                rows = ops.take(Xd, idx, axis=0)  # (b, m, d)
                ws = ops.take_along_axis(w[s], idx, axis=1)
            else:
                rows, ws = Xd[None], w[s]
            Y = ops.sqrt(ws)[..., None] * (rows - mu[s][:, None, :])  # (b, rows, d)
            if diagonal:
                parts.append(ops.sum(Y * Y, axis=1))
                continue
            # Y^T Y is symmetric: block column j needs only rows 0..end_j; the blocks below the block
            # diagonal are the mirrored blocks above it.
            cols = []
            for a, z in self._blocks(d):
                upper = ops.matmul(ops.transpose(Y[:, :, :z], (0, 2, 1)), Y[:, :, a:z])  # (b, z, bs)
                cols.append(ops.pad(upper, ((0, 0), (0, d - z), (0, 0))))
            parts.append(ops.concatenate(cols, axis=-1))  # (b, d, d), block-upper
        S = ops.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
        if diagonal:
            return ops.reshape(S, (R, K, d))
        S = S + ops.swapaxes(S * self._strict_upper(d), -1, -2)
        return ops.reshape(S, (R, K, d, d))

    def _recover_float64(self, X64: np.ndarray, resp, cov) -> dict:
        """Covariances and precision Cholesky factors again, in float64 (numpy), for the restarts whose
        float32 covariance is not positive definite; raise as scikit-learn does when even float64 fails."""
        ops = self._keras.ops
        cov64 = ops.convert_to_numpy(cov).astype(np.float64)
        chol = np.empty_like(cov64)
        for r in range(len(cov64)):
            try:
                chol[r] = np.linalg.cholesky(cov64[r])
                continue
            except np.linalg.LinAlgError:
                pass
            self.float64_recoveries_ += 1
            rr = ops.convert_to_numpy(resp[r]).astype(np.float64)  # (n, K)
            nk = rr.sum(axis=0) + 10 * np.finfo(np.float64).eps
            means = rr.T @ X64 / nk[:, None]
            scatter = np.stack([(rr[:, k] * (X64 - means[k]).T) @ (X64 - means[k]) for k in range(len(nk))])
            if self.covariance_type == "full":
                cov64[r] = scatter / nk[:, None, None]
            else:
                cov64[r] = scatter.sum(axis=0) / nk.sum()
            cov64[r][..., range(X64.shape[1]), range(X64.shape[1])] += self.reg_covar
            try:
                chol[r] = np.linalg.cholesky(cov64[r])
            except np.linalg.LinAlgError:
                raise ValueError("fast GMM: a component's covariance is not positive definite even in float64 "
                                 "(a collapsed component); increase reg_covar, as scikit-learn would ask") from None
        eye = np.broadcast_to(np.eye(chol.shape[-1]), chol.shape)
        prec_chol = np.swapaxes(np.linalg.solve(chol, eye), -1, -2)  # L^-T; solve() as chol is lower
        return {"covariances": ops.convert_to_tensor(cov64.astype(self.dtype)),
                "prec_chol": ops.convert_to_tensor(prec_chol.astype(self.dtype))}

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
            return 1.0 / ops.sqrt(cov)  # centred sums of squares + reg_covar: always positive
        cov64 = ops.cast(cov, "float64")
        try:
            chol = ops.cholesky(cov64)
        except Exception as exc:  # noqa: BLE001 (each backend raises its own type)
            raise FloatingPointError("a covariance is not positive definite") from exc
        if not bool(ops.convert_to_numpy(ops.all(ops.isfinite(chol)))):
            raise FloatingPointError("a covariance is not positive definite")
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
            itemsize = np.dtype(self.dtype).itemsize
            for s in self._chunks(R, 2 * n * K * d * itemsize // len(self._blocks(d))):
                maha = 0.0
                for a, z in self._blocks(d):
                    p = ops.transpose(shifted[s, :, :1 + z, a:z], (2, 0, 1, 3))  # (1 + z, r, K, bs)
                    y = ops.reshape(ops.matmul(X[:, :1 + z], ops.reshape(p, (1 + z, -1))), (n, -1, K, z - a))
                    maha = maha + ops.einsum("nrkb,nrkb->rnk", y, y)
                parts.append(maha)
            maha = ops.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]  # (R, n, K)
        else:
            # sum_d ((x - mu) / sigma)^2 on centred differences: a variance near reg_covar (a feature
            # constant inside a component) makes the expanded x^2 - 2 x mu + mu^2 cancel in float32.
            Xd = X[:, 1:]
            if kind == "spherical":
                log_det = d * ops.log(pc)
                pc = ops.repeat(pc[..., None], d, axis=-1)  # (R, K, d)
            else:
                log_det = ops.sum(ops.log(pc), axis=-1)
            parts = []
            for s in self._chunks(R, 2 * n * K * d * np.dtype(self.dtype).itemsize):
                y = (Xd[None, :, None, :] - means[s][:, None]) * pc[s][:, None]  # (r, n, K, d)
                parts.append(ops.sum(y * y, axis=-1))
            maha = ops.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]  # (R, n, K)
        log_gauss = -0.5 * (d * math.log(2 * math.pi) + maha) + log_det[:, None, :]
        weighted = log_gauss + ops.log(state["weights"])[:, None, :]
        log_norm = ops.logsumexp(weighted, axis=-1)  # (R, n)
        return log_norm, weighted - log_norm[..., None]
