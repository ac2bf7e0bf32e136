"""Feature-space sample-quality metrics: Fréchet distance, KID, k-NN precision/recall (numpy, on host)."""

from __future__ import annotations

import numpy as np
import scipy.linalg


class FeatureStats:
    """Streaming float64 statistics of feature vectors: count, sum, sum of outer products, optional reservoir.

    Sums (not running means) so that shards from many devices or processes combine by plain addition.
    The reservoir keeps a uniform random subset of at most `max_reservoir` raw features for KID and
    precision/recall: every feature gets a random key and the smallest keys are kept, which makes merging
    exact (the union's smallest keys). Give each process its own `seed` so their keys differ.
    """

    def __init__(self, dim: int, max_reservoir: int = 0, seed: int = 0):
        if dim <= 0:
            raise ValueError(f"FeatureStats dim must be positive, got {dim}")
        if max_reservoir < 0:
            raise ValueError(f"FeatureStats max_reservoir must be >= 0, got {max_reservoir}")
        self.dim = int(dim)
        self.max_reservoir = int(max_reservoir)
        self.count = 0
        self.sum = np.zeros((dim,), np.float64)
        self.sum_outer = np.zeros((dim, dim), np.float64)
        self._rng = np.random.default_rng(seed)
        self._res_feats = np.zeros((0, dim), np.float32)
        self._res_keys = np.zeros((0,), np.float64)

    def update(self, feats: np.ndarray) -> None:
        """Adds a batch of features (N, dim) (any array type convertible to numpy)."""
        f = np.asarray(feats, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"FeatureStats.update expects features of shape (N, {self.dim}), got {f.shape}")
        self.count += f.shape[0]
        self.sum += f.sum(axis=0)
        self.sum_outer += f.T @ f
        if self.max_reservoir:
            keys = self._rng.random(f.shape[0])
            self._keep_smallest(np.concatenate([self._res_feats, f.astype(np.float32)]),
                                np.concatenate([self._res_keys, keys]))

    def _keep_smallest(self, feats: np.ndarray, keys: np.ndarray) -> None:
        if len(keys) > self.max_reservoir:
            idx = np.argpartition(keys, self.max_reservoir - 1)[: self.max_reservoir]
            feats, keys = feats[idx], keys[idx]
        self._res_feats, self._res_keys = feats, keys

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Returns (mean (dim,), unbiased covariance (dim, dim)) in float64, as np.cov(rowvar=False)."""
        if self.count < 2:
            raise ValueError(f"FeatureStats needs at least 2 features for a covariance, has {self.count}")
        mu = self.sum / self.count
        cov = (self.sum_outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, cov

    @property
    def reservoir(self) -> np.ndarray:
        """The kept raw features (min(count, max_reservoir), dim) float32, a uniform sample of all seen."""
        return self._res_feats

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Adds another shard's statistics into this one (in place) and returns self."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge FeatureStats of dim {other.dim} into dim {self.dim}")
        self.count += other.count
        self.sum += other.sum
        self.sum_outer += other.sum_outer
        if self.max_reservoir:
            self._keep_smallest(np.concatenate([self._res_feats, other._res_feats]),
                                np.concatenate([self._res_keys, other._res_keys]))
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        """Arrays that fully describe the statistics (for gathering across processes or saving as .npz)."""
        return {"count": np.asarray(self.count, np.int64), "sum": self.sum, "sum_outer": self.sum_outer,
                "reservoir": self._res_feats, "reservoir_keys": self._res_keys,
                "max_reservoir": np.asarray(self.max_reservoir, np.int64)}

    @classmethod
    def from_state_dict(cls, state: dict[str, np.ndarray], seed: int = 0) -> FeatureStats:
        """Rebuilds FeatureStats from `state_dict()` output."""
        dim = int(np.asarray(state["sum"]).shape[0])
        out = cls(dim, max_reservoir=int(state["max_reservoir"]), seed=seed)
        out.count = int(state["count"])
        out.sum = np.array(state["sum"], np.float64)
        out.sum_outer = np.array(state["sum_outer"], np.float64)
        out._res_feats = np.array(state["reservoir"], np.float32).reshape(-1, dim)
        out._res_keys = np.array(state["reservoir_keys"], np.float64)
        return out


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance ‖μ1−μ2‖² + tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) between two Gaussians (pytorch-fid recipe)."""
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"frechet_distance shape mismatch: mu {mu1.shape}/{mu2.shape}, "
                         f"sigma {sigma1.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Singular product: nudge both covariances off singularity, as pytorch-fid does.
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)  # tiny imaginary parts come from numerical error
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    gamma = 1.0 / x.shape[1]
    return (x @ y.T * gamma + 1.0) ** 3


def _mmd2_unbiased(f1: np.ndarray, f2: np.ndarray) -> float:
    """Unbiased MMD² with the cubic polynomial kernel; both subsets of equal size m (torch-fidelity)."""
    m = f1.shape[0]
    k_xx, k_yy, k_xy = _polynomial_kernel(f1, f1), _polynomial_kernel(f2, f2), _polynomial_kernel(f1, f2)
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(f1: np.ndarray, f2: np.ndarray, num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float | None]:
    """KID (Binkowski et al. 2018): (mean, std) of unbiased cubic-kernel MMD² over random equal-size subsets.

    subset_size is clipped to the smaller set (as clean-fid does), so small sample counts still work. When that
    makes every subset the whole of both sets, all subsets give the same MMD² (it is permutation invariant): the
    std is then None (no spread can be measured), not the ~1e-14 of float rounding.
    """
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"kernel_inception_distance needs (N, D) features of equal D, got {f1.shape}, "
                         f"{f2.shape}")
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise ValueError(f"kernel_inception_distance needs >= 2 features per set, got {len(f1)}, {len(f2)}")
    if m == len(f1) == len(f2):
        return float(_mmd2_unbiased(f1, f2)), None
    rng = np.random.RandomState(seed)
    mmds = np.empty((num_subsets,), np.float64)
    for i in range(num_subsets):
        a = f1[rng.choice(len(f1), m, replace=False)]
        b = f2[rng.choice(len(f2), m, replace=False)]
        mmds[i] = _mmd2_unbiased(a, b)
    return float(mmds.mean()), float(mmds.std())


def _pairwise_sq_dists(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    d = np.sum(a * a, axis=1, keepdims=True) + b_sq[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def _knn_radii(feats: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    """Squared distance of each point to its k-th nearest other point (itself, at distance 0, excluded)."""
    sq = np.sum(feats * feats, axis=1)
    radii = np.empty((len(feats),), feats.dtype)
    for s in range(0, len(feats), batch_size):
        d = _pairwise_sq_dists(feats[s: s + batch_size], feats, sq)
        radii[s: s + batch_size] = np.partition(d, k, axis=1)[:, k]
    return radii


def _coverage(queries: np.ndarray, ref: np.ndarray, ref_radii: np.ndarray, batch_size: int) -> float:
    """Fraction of queries inside at least one reference point's k-NN ball."""
    ref_sq = np.sum(ref * ref, axis=1)
    inside = 0
    for s in range(0, len(queries), batch_size):
        d = _pairwise_sq_dists(queries[s: s + batch_size], ref, ref_sq)
        inside += int(np.count_nonzero(np.any(d <= ref_radii[None, :], axis=1)))
    return inside / len(queries)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3,
                     batch_size: int = 1024) -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al. 2019) with k-NN manifold radii; distances in batches."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall needs (N, D) features of equal D, got {real.shape}, {fake.shape}")
    if k < 1 or k >= min(len(real), len(fake)):
        raise ValueError(f"precision_recall k={k} must be in [1, min(N_real, N_fake) - 1]")
    precision = _coverage(fake, real, _knn_radii(real, k, batch_size), batch_size)
    recall = _coverage(real, fake, _knn_radii(fake, k, batch_size), batch_size)
    return precision, recall
