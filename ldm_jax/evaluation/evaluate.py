"""Evaluation pipelines over callables: reconstruction metrics (stage 1) and sample-quality metrics (stage 2)
from streamed features, plus the conditional accuracy of class-conditional samples.

Knows no training code: the caller supplies a jittable `reconstruct(params, images)` or a `generate(indices)`
(ldm_jax/evaluate_workdir.py wires them to trained workdirs). Images are NHWC float32 in [-1, 1]; features
are accumulated batch by batch in `FeatureStats` (mean/covariance sums + a bounded random reservoir for KID
and precision/recall), so no image set is ever held in memory.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from ldm_jax.evaluation.frechet import FeatureStats, frechet_distance, kernel_inception_distance, precision_recall
from ldm_jax.evaluation.image_metrics import psnr, ssim

FEATURES = ("fmnist", "inception")
MAX_RESERVOIR = 5000  # raw features kept for KID / precision-recall (k-NN cost grows with its square)


@dataclass
class FeatureExtractor:
    """A feature network for distribution metrics: `fn` maps [-1, 1] NHWC images to (N, dim) features."""

    name: str  # "fmnist" | "inception"
    dim: int
    fn: Callable[[np.ndarray], np.ndarray]
    image_shape: tuple[int, int, int] | None = None  # required input (H, W, C); None: any size, 1 or 3 channels

    def key(self, metric: str) -> str:
        """Result key: 'fd' -> 'fd_fmnist' / 'fid' (true FID only from InceptionV3), 'kid' -> 'kid_fmnist', …"""
        if metric in ("fd", "rfd") and self.name == "inception":
            return "fid" if metric == "fd" else "rfid"
        return f"{metric}_{self.name}"

    def check(self, image_shape: tuple[int, ...]) -> None:
        """One-line ValueError when this extractor cannot read images of `image_shape` (H, W, C)."""
        shape = tuple(int(s) for s in image_shape)
        if self.image_shape is not None and shape != self.image_shape:
            raise ValueError(f"--feature {self.name} needs {'x'.join(map(str, self.image_shape))} images "
                             f"(Fashion-MNIST padded to 32x32), this model's are {'x'.join(map(str, shape))}: "
                             "use --feature inception")
        if self.image_shape is None and shape[-1] not in (1, 3):
            raise ValueError(f"--feature {self.name} needs 1- or 3-channel images, got {shape[-1]} channels")


def make_feature_extractor(kind: str = "fmnist", inception_weights: str | None = None,
                           classifier_path: str | None = None) -> FeatureExtractor:
    """'fmnist': the offline Fashion-MNIST classifier's 128-d features (trained on first use if missing);
    'inception': InceptionV3 pool features (FileNotFoundError saying why when the weights are absent)."""
    if kind == "fmnist":
        from ldm_jax.evaluation.classifier import FEATURE_DIM, IMAGE_SHAPE, get_or_train_classifier

        features_fn, _ = get_or_train_classifier(classifier_path)
        return FeatureExtractor("fmnist", FEATURE_DIM, features_fn, IMAGE_SHAPE)
    if kind == "inception":
        from ldm_jax.evaluation.inception import inception_features_fn, load_inception_params

        return FeatureExtractor("inception", 2048, inception_features_fn(load_inception_params(inception_weights)))
    raise ValueError(f"--feature must be one of {', '.join(FEATURES)}, got {kind!r}")


def padded_batches(n: int, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """(indices padded to batch_size, number of valid rows) covering 0..n-1: every batch has one shape, so a
    jitted consumer compiles once; the padding rows (indices >= n) are computed and dropped."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"--num_samples and --batch_size must be >= 1, got {n} and {batch_size}")
    for start in range(0, n, batch_size):
        yield np.arange(start, start + batch_size, dtype=np.int32), min(batch_size, n - start)


def balanced_labels(indices: np.ndarray, num_classes: int) -> np.ndarray:
    """The class asked for in sample i: i mod num_classes (balanced over every num_classes samples)."""
    return (np.asarray(indices) % num_classes).astype(np.int32)


def conditional_accuracy(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, object]:
    """Share of samples the judge classifies as the class asked for: the mean of per-class accuracies (each
    class weighs the same even when counts differ), the plain share, and the per-class list (None: no sample)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"conditional_accuracy needs logits (N, K) and labels (N,), got {logits.shape}, "
                         f"{labels.shape}")
    hit = np.argmax(logits, axis=-1) == labels
    per_class: list[float | None] = []
    for c in range(num_classes):
        sel = labels == c
        per_class.append(float(np.mean(hit[sel])) if sel.any() else None)
    present = [a for a in per_class if a is not None]
    return {"conditional_accuracy": float(np.mean(present)) if present else float("nan"),
            "conditional_accuracy_micro": float(np.mean(hit)) if len(hit) else float("nan"),
            "per_class_accuracy": per_class}


def distribution_metrics(real: FeatureStats, fake: FeatureStats, extractor: FeatureExtractor, prefix: str = "",
                         kid_subsets: int = 100, kid_subset_size: int = 1000, pr_k: int = 3,
                         seed: int = 0) -> dict[str, float]:
    """Fréchet distance of the Gaussian fits (all features), KID and k-NN precision/recall (reservoirs).

    prefix 'r' names reconstruction metrics (rfd_fmnist / rfid). Precision/recall compare equal-size random
    subsets (their values depend on the set sizes)."""
    with warnings.catch_warnings():
        # Dead ReLU units make the covariances singular; frechet_distance handles it (as pytorch-fid) quietly.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        fd = frechet_distance(*real.mean_cov(), *fake.mean_cov())
    out = {extractor.key(prefix + "fd"): fd}
    r, f = real.reservoir, fake.reservoir
    if min(len(r), len(f)) >= 2:
        kid, kid_std = kernel_inception_distance(r, f, kid_subsets, kid_subset_size, seed)
        out[extractor.key(prefix + "kid")] = kid
        out[extractor.key(prefix + "kid") + "_std"] = kid_std
    m = min(len(r), len(f))
    if m > pr_k + 1:
        rng = np.random.default_rng(seed)
        rs, fs = r[rng.choice(len(r), m, replace=False)], f[rng.choice(len(f), m, replace=False)]
        precision, recall = precision_recall(rs, fs, k=pr_k)
        out[extractor.key(prefix + "precision")] = precision
        out[extractor.key(prefix + "recall")] = recall
    return out


def image_batches(data_iter, num: int, batch_size: int) -> Iterator[tuple[dict, int]]:
    """(batch, valid rows) from a `BatchIterator`-like object with `batch_at(step)`, num images in all."""
    for step, (_, valid) in enumerate(padded_batches(num, batch_size)):
        yield data_iter.batch_at(step), valid


def real_feature_stats(batches: Iterable[tuple[dict, int]], extractor: FeatureExtractor,
                       max_reservoir: int = MAX_RESERVOIR, logits_fn: Callable | None = None,
                       seed: int = 0) -> tuple[FeatureStats, dict[str, float]]:
    """Streams held-out images into FeatureStats; with `logits_fn` also the judge's accuracy on them (the
    ceiling a perfect class-conditional generator could reach)."""
    stats = FeatureStats(extractor.dim, max_reservoir, seed=seed)
    hits = total = 0
    for batch, valid in batches:
        images = np.asarray(batch["image"])
        extractor.check(images.shape[1:])
        stats.update(np.asarray(extractor.fn(images))[:valid])
        if logits_fn is not None and "label" in batch:
            pred = np.argmax(np.asarray(logits_fn(images))[:valid], axis=-1)
            hits += int(np.sum(pred == np.asarray(batch["label"])[:valid]))
            total += valid
    info = {"num_real": stats.count}
    if total:
        info["real_classifier_accuracy"] = hits / total
    return stats, info


def reconstruction_metrics(reconstruct: Callable[[dict, jax.Array], jax.Array], params: dict,
                           batches: Iterable[tuple[dict, int]], extractor: FeatureExtractor | None = None,
                           lpips_params: dict | None = None, max_reservoir: int = MAX_RESERVOIR,
                           seed: int = 0) -> dict[str, float]:
    """PSNR, SSIM (means over images), LPIPS (with `lpips_params`) and the reconstruction Fréchet distance
    (reconstructions vs originals in the extractor's feature space) over held-out batches.

    `reconstruct(params, images)` is a pure jittable function, compiled once together with the per-image
    metrics; params go in as an argument (closed-over arrays would be baked into the program as constants)."""
    lpips_fn = None
    if lpips_params is not None:
        from ldm_jax.losses.perceptual import make_lpips_fn

        lpips_fn = make_lpips_fn  # built inside jit on the params argument: 59 MB of VGG are no HLO constants

    @jax.jit
    def step(params, images, lp):
        rec = jnp.clip(reconstruct(params, images), -1.0, 1.0)
        out = {"psnr": psnr(images, rec), "ssim": ssim(images, rec), "rec": rec}
        if lp is not None:
            out["lpips"] = lpips_fn(lp)(images, rec)
        return out

    sums: dict[str, float] = {}
    count = 0
    real = fake = None
    if extractor is not None:
        real = FeatureStats(extractor.dim, max_reservoir, seed=seed)
        fake = FeatureStats(extractor.dim, max_reservoir, seed=seed + 1)
    t0 = time.time()
    for batch, valid in batches:
        images = jnp.asarray(batch["image"])
        res = jax.device_get(step(params, images, lpips_params))
        for k in ("psnr", "ssim", "lpips"):
            if k in res:
                sums[k] = sums.get(k, 0.0) + float(np.sum(res[k][:valid]))
        if extractor is not None:
            extractor.check(images.shape[1:])
            real.update(np.asarray(extractor.fn(images))[:valid])
            fake.update(np.asarray(extractor.fn(res["rec"]))[:valid])
        count += valid
    out = {k: v / count for k, v in sums.items()}
    if extractor is not None:
        out.update(distribution_metrics(real, fake, extractor, prefix="r", seed=seed))
    out.update(num_images=count, seconds=time.time() - t0)
    return out


def generation_metrics(generate: Callable[[np.ndarray], np.ndarray], num_samples: int, batch_size: int,
                       real: FeatureStats | None = None, extractor: FeatureExtractor | None = None,
                       num_classes: int = 0, logits_fn: Callable | None = None,
                       max_reservoir: int = MAX_RESERVOIR, seed: int = 0,
                       on_batch: Callable[[np.ndarray, np.ndarray], None] | None = None) -> dict[str, object]:
    """Sample-quality metrics of `generate(indices) -> images` (called on equal-size padded index batches).

    With `real` + `extractor`: Fréchet distance / KID / precision-recall against the real statistics. With
    `num_classes` and `logits_fn`: conditional accuracy, sample i having asked for class i mod num_classes.
    Throughput excludes the first batch (compilation) when there are several; `on_batch(images, indices)`
    sees each batch's valid rows (e.g. to keep a few for a grid)."""
    fake = FeatureStats(extractor.dim, max_reservoir, seed=seed + 1) if extractor is not None else None
    all_logits, all_labels = [], []
    t0 = time.time()
    t_first = None
    for indices, valid in padded_batches(num_samples, batch_size):
        images = np.asarray(generate(indices))[:valid]
        if not np.all(np.isfinite(images)):
            raise FloatingPointError(f"non-finite samples in batch starting at sample {indices[0]}")
        if t_first is None:
            t_first = time.time() - t0
        if fake is not None:
            extractor.check(images.shape[1:])
            fake.update(np.asarray(extractor.fn(images)))
        if num_classes and logits_fn is not None:
            all_logits.append(np.asarray(logits_fn(images)))
            all_labels.append(balanced_labels(indices[:valid], num_classes))
        if on_batch is not None:
            on_batch(images, indices[:valid])
    total = time.time() - t0
    out: dict[str, object] = {"num_samples": num_samples, "sampling_seconds": total}
    if num_samples > batch_size:
        out["samples_per_s"] = (num_samples - batch_size) / max(total - t_first, 1e-9)
        out["first_batch_seconds"] = t_first  # includes compilation
    else:
        out["samples_per_s"] = num_samples / max(total, 1e-9)
        out["samples_per_s_includes_compile"] = True
    if fake is not None and real is not None:
        out.update(distribution_metrics(real, fake, extractor, seed=seed))
    if all_logits:
        out.update(conditional_accuracy(np.concatenate(all_logits), np.concatenate(all_labels), num_classes))
    return out


def finite_or_none(value: object) -> object:
    """JSON-safe numbers: nan/inf -> None (json.dump would write NaN, which is not JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return finite_or_none(value.item())
    return value
