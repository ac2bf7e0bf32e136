"""Evaluate a trained workdir (the stage is read from WORKDIR/config.json); the engine behind eval.py.

Stage 1: PSNR, SSIM, LPIPS and the reconstruction Fréchet distance on held-out images. Stage 2: samples from
the EMA weights (ldm_jax.inference) against held-out real images: Fréchet distance, KID, precision/recall in
one feature space (default: the Fashion-MNIST classifier, keys *_fmnist; true FID only from InceptionV3 with
user-supplied weights), and for class-conditional Fashion-MNIST models the conditional accuracy.

Like inference.py it reads workdirs through ldm_jax/workdir.py and imports no training code.
A metric that cannot be computed is None in the result, with the reason under result["unavailable"][key].
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from ldm_jax import workdir as W
from ldm_jax.data.pipeline import image_size
from ldm_jax.evaluation import evaluate as E
from ldm_jax.evaluation.frechet import FeatureStats

FMNIST_CLASSES = 10


def _feature(kind: str, inception_weights: str | None, image_shape: tuple[int, ...],
             unavailable: dict[str, str], key: str) -> E.FeatureExtractor | None:
    """The feature extractor, or None with the reason recorded (missing weights, wrong image shape)."""
    if kind not in E.FEATURES:
        raise ValueError(f"--feature must be one of {', '.join(E.FEATURES)}, got {kind!r}")
    if kind == "fmnist" and tuple(image_shape) != (32, 32, 1):  # never train the judge for unrelated data
        unavailable[key] = (f"no feature extractor for this data: the Fashion-MNIST classifier reads 32x32x1 "
                            f"Fashion-MNIST images, these are {'x'.join(map(str, image_shape))} (use --feature "
                            "inception --inception_weights PATH for FID)")
        return None
    try:
        extractor = E.make_feature_extractor(kind, inception_weights)
        extractor.check(image_shape)
        return extractor
    except (FileNotFoundError, ValueError) as e:
        unavailable[key] = str(e)
        return None


def _device() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')} x{jax.device_count()}"


def evaluate_autoencoder(workdir: str, *, num_samples: int = 2000, batch_size: int = 100, feature: str = "fmnist",
                         inception_weights: str | None = None, lpips_weights: str | None = None,
                         split: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Stage-1 metrics on the first num_samples held-out images (config.eval.split unless `split`)."""
    from ldm_jax.data.pipeline import make_dataset
    from ldm_jax.models.lpips_weights import load_lpips_params

    t0 = time.time()
    fs = W.load_first_stage(workdir)
    config = fs.config
    split = split or config.eval.get("split", "test")
    ds = make_dataset(config.data, split, batch_size, seed, augment=False)
    num = min(int(num_samples), ds.num_examples)
    image_shape = (*image_size(config.data), config.data.channels)
    unavailable: dict[str, str] = {}
    extractor = _feature(feature, inception_weights, image_shape, unavailable,
                         "rfid" if feature == "inception" else f"rfd_{feature}")
    try:
        lpips_params = load_lpips_params(lpips_weights or config.loss.get("lpips_path") or None)
    except FileNotFoundError as e:
        lpips_params, unavailable["lpips"] = None, str(e)

    model = fs.model

    def reconstruct(variables, x):
        return model.apply(variables, x)["rec"]  # KL: posterior mode; VQ: quantised

    metrics = E.reconstruction_metrics(reconstruct, fs.variables, E.image_batches(ds, num, batch_size), extractor,
                                       lpips_params, max_reservoir=min(E.MAX_RESERVOIR, num), seed=seed)
    for key in unavailable:
        metrics[key] = None
    return {"stage": "autoencoder", "workdir": os.path.abspath(workdir), "checkpoint_step": fs.step,
            "model": f"{config.model.type}-f{fs.factor}", "split": split, "feature": feature, **metrics,
            "unavailable": unavailable, "seconds": time.time() - t0, "device": _device()}


def judge_for(config: ml_collections.ConfigDict) -> int:
    """Number of classes the Fashion-MNIST classifier can judge for this model's samples (0: none): class
    models with 10 real classes, and text models on Fashion-MNIST's captions (one per class, in order)."""
    if config.data.get("name") != "fashion_mnist" or config.data.get("channels") != 1:
        return 0
    ctype = config.condition.get("type")
    if ctype == "class" and int(config.model.n_classes) - 1 == FMNIST_CLASSES:
        return FMNIST_CLASSES
    if ctype == "text":
        return FMNIST_CLASSES
    return 0


def real_stats(data_cfg: ml_collections.ConfigDict, extractor: E.FeatureExtractor, num_real: int, batch_size: int,
               max_reservoir: int, split: str = "test", logits_fn=None, seed: int = 0
               ) -> tuple[FeatureStats, dict[str, float]]:
    """Feature statistics of the first num_real held-out images of `split` (+ the judge's accuracy on them)."""
    from ldm_jax.data.pipeline import make_dataset

    ds = make_dataset(data_cfg, split, batch_size, seed, augment=False)
    num = min(int(num_real), ds.num_examples)
    return E.real_feature_stats(E.image_batches(ds, num, batch_size), extractor, max_reservoir, logits_fn, seed)


def evaluate_ldm(workdir: str | None = None, *, ldm: Any = None, num_samples: int = 1000, batch_size: int = 100,
                 sampler: str | None = None, steps: int | None = None, eta: float | None = None,
                 guidance: float | None = None, spacing: str | None = None, karras: bool | None = None,
                 order: int | None = None, guidance_rescale: float | None = None, feature: str = "fmnist",
                 inception_weights: str | None = None,
                 num_real: int = 10000, seed: int = 0, first_stage: str | None = None,
                 real: tuple[FeatureStats, dict] | None = None, classifier_path: str | None = None,
                 keep_images: int = 0) -> dict[str, Any]:
    """Stage-2 metrics of num_samples samples (sampling settings default to the config's `sampling`).

    Pass a loaded `ldm` (inference.LoadedLDM) and a cached `real` = real_stats(...) to evaluate many settings
    of one model without reloading; keep_images > 0 returns the first samples under result["images"]."""
    from ldm_jax import inference
    from ldm_jax.evaluation.classifier import get_or_train_classifier

    t0 = time.time()
    if ldm is None:
        ldm = inference.LoadedLDM.load(workdir, first_stage)
    config = ldm.config
    opts = inference.sampling_options(config, sampler, steps, eta, guidance, spacing, karras, order, guidance_rescale)
    inference.check_sample_args(config, num_samples=num_samples, batch_size=batch_size, seed=seed, **opts)
    image_shape = (*image_size(config.data), int(config.data.channels))
    unavailable: dict[str, str] = {}
    fd_key = "fid" if feature == "inception" else f"fd_{feature}"
    extractor = _feature(feature, inception_weights, image_shape, unavailable, fd_key)
    num_classes = judge_for(config)
    logits_fn = None
    if num_classes:
        _, logits_fn = get_or_train_classifier(classifier_path)
    elif config.condition.get("type") in ("class", "text"):
        unavailable["conditional_accuracy"] = ("the Fashion-MNIST judge only reads 10-class Fashion-MNIST "
                                               "models (32x32x1)")
    reservoir = min(E.MAX_RESERVOIR, int(num_samples))
    real_info: dict[str, float] = {}
    if extractor is not None:
        if real is None:
            real = real_stats(config.data, extractor, num_real, batch_size, reservoir,
                              config.eval.get("split", "test"), logits_fn, seed)
        real_stats_, real_info = real
    else:
        real_stats_ = None
    kept: list[np.ndarray] = []

    def keep(images, _indices):
        if sum(len(k) for k in kept) < keep_images:
            kept.append(images[: keep_images - sum(len(k) for k in kept)])

    def generate(indices):
        return ldm.sample(indices, seed=seed, **opts)

    metrics = E.generation_metrics(generate, int(num_samples), int(batch_size), real_stats_, extractor,
                                   num_classes, logits_fn, reservoir, seed, on_batch=keep if keep_images else None)
    for key in unavailable:
        metrics[key] = None
    out = {"stage": "ldm", "workdir": os.path.abspath(ldm.workdir), "checkpoint_step": ldm.step,
           "condition": config.condition.get("type"), "feature": feature, **opts, "seed": seed, **real_info,
           **metrics, "unavailable": unavailable, "seconds": time.time() - t0, "device": _device()}
    if keep_images:
        out["images"] = np.concatenate(kept) if kept else np.zeros((0, *image_shape), np.float32)
    return out


def evaluate_workdir(workdir: str, **kwargs) -> dict[str, Any]:
    """Runs the stage-1 or stage-2 evaluation that WORKDIR/config.json calls for (stage-2-only options such as
    sampler/steps/guidance are ignored for an autoencoder)."""
    stage = W.read_config(workdir).stage
    feature = kwargs.get("feature") or "fmnist"
    if feature not in E.FEATURES:  # before loading anything
        raise ValueError(f"--feature must be one of {', '.join(E.FEATURES)}, got {feature!r}")
    if stage == "autoencoder":
        keys = ("num_samples", "batch_size", "feature", "inception_weights", "lpips_weights", "seed")
        return evaluate_autoencoder(workdir, **{k: v for k, v in kwargs.items() if k in keys and v is not None})
    kwargs.pop("lpips_weights", None)
    return evaluate_ldm(workdir, **{k: v for k, v in kwargs.items() if v is not None})


def write_json(result: dict[str, Any], path: str) -> None:
    """Atomic JSON write of a result (nan/inf as null, arrays dropped)."""
    clean = {k: v for k, v in result.items() if not isinstance(v, np.ndarray)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(E.finite_or_none(clean), f, indent=2, sort_keys=True)
    os.replace(tmp, path)
