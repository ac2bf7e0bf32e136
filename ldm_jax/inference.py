"""Sampling from a trained stage-2 workdir: EMA weights + scale_factor + frozen first stage (+ tokenizer).

    ldm = LoadedLDM.load("runs/ldm")
    images = ldm.sample(range(16), sampler="ddim", steps=50, guidance=3.0, class_labels=[7])

Sample i is a pure function of (seed, i): its starting noise, sampler noise and inpainting mask come from
threefry keys folded from (seed, i), and the network runs on it alone (vmapped), so a sample does not depend
on which batch it was drawn in (up to float rounding of batched kernels). `sample_to_dir` writes
OUT/000000.png ... and skips files already there, so an interrupted run resumes with identical files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax import conditions
from ldm_jax import workdir as W
from ldm_jax.data.images import make_grid, save_png, to_uint8
from ldm_jax.diffusion import SAMPLERS, DiffusionSchedule
from ldm_jax.diffusion.gaussian import q_sample
from ldm_jax.diffusion.generate import check_sampling_options, make_sample_fn, sample_each
from ldm_jax.diffusion.samplers import img2img_timestep
from ldm_jax.models.latent_diffusion import LatentDiffusionModel

SPATIAL_TYPES = ("lowres", "inpaint", "semantic")
GRID_MAX = 100  # grid.png shows at most this many samples
SETTINGS_FILE = "sampling.json"
# Compiled samplers per (model identity, settings), shared by LoadedLDM objects of the same checkpoint, so a
# process that loads a workdir again (a resumed sample.py main, a notebook) does not compile again.
_GENERATORS: dict[tuple, Callable] = {}


def real_classes(config: ml_collections.ConfigDict) -> int:
    """Number of real classes of a class-conditional model (the last embedding index is the null class)."""
    return int(config.model.n_classes) - 1


def sampling_options(config: ml_collections.ConfigDict, sampler: str | None = None, steps: int | None = None,
                     eta: float | None = None, guidance: float | None = None, spacing: str | None = None,
                     karras: bool | None = None, order: int | None = None,
                     guidance_rescale: float | None = None) -> dict[str, Any]:
    """The config's `sampling` settings, each overridden where given (not None). The sampler's own options (eta,
    spacing, karras, order) come from the config only for the config's sampler: naming another sampler starts
    them from their neutral values, so e.g. a DDIM eta of 1 does not follow `--sampler dpmpp_2m`. `.get` with
    defaults: a config.json written before a field existed still loads."""
    sc = config.get("sampling", {})
    pick = lambda given, name, default: sc.get(name, default) if given is None else given  # noqa: E731
    chosen = pick(sampler, "sampler", "ddim")
    own = sc if chosen == sc.get("sampler", "ddim") else {}
    pick_own = lambda given, name, default: own.get(name, default) if given is None else given  # noqa: E731
    return dict(sampler=chosen, steps=int(pick(steps, "steps", 50)),
                eta=float(pick_own(eta, "eta", 0.0)), guidance=float(pick(guidance, "guidance", 1.0)),
                spacing=str(pick_own(spacing, "spacing", "")), karras=bool(pick_own(karras, "karras", False)),
                order=int(pick_own(order, "order", 2)),
                guidance_rescale=float(pick(guidance_rescale, "guidance_rescale", 0.0)))


def check_sample_args(config: ml_collections.ConfigDict, *, sampler: str = "ddim", steps: int = 50,
                      eta: float = 0.0, guidance: float = 1.0, spacing: str = "", karras: bool = False,
                      order: int = 2, guidance_rescale: float = 0.0, class_labels: Sequence[int] | None = None,
                      prompts: Sequence[str] | None = None, size_factor: int = 1, num_samples: int = 1,
                      batch_size: int = 1, seed: int = 0) -> None:
    """Validates sampling arguments against the model's config; raises a one-line ValueError (no compiling)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
    T = int(config.diffusion.num_timesteps)
    if not 1 <= int(steps) <= T:
        raise ValueError(f"--steps must be in [1, {T}] (the model's diffusion timesteps), got {steps}")
    check_sampling_options(T, sampler, steps, eta, guidance, spacing, karras, order, guidance_rescale, prefix="--")
    if int(size_factor) != size_factor or size_factor < 1:
        raise ValueError(f"--size_factor must be a positive integer, got {size_factor}")
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"--num_samples and --batch_size must be >= 1, got {num_samples} and {batch_size}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    ctype = config.condition.type
    if guidance != 1.0 and ctype not in ("class", "text"):
        raise ValueError(f"--guidance applies to class- or text-conditioned models; this one has "
                         f"condition.type={ctype!r} (leave --guidance at 1)")
    if class_labels:
        if ctype != "class":
            raise ValueError(f"--class_label given but the model is not class-conditional (condition.type={ctype!r})")
        n = real_classes(config)
        bad = [k for k in class_labels if not 0 <= k < n]
        if bad:
            raise ValueError(f"--class_label must be in [0, {n - 1}] for this model, got {bad[0]}")
    if prompts and ctype != "text":
        raise ValueError(f"--prompt given but the model is not text-conditioned (condition.type={ctype!r})")
    if ctype == "text" and not prompts and not default_prompts(config):
        raise ValueError("this text-conditioned model needs --prompt")


def default_prompts(config: ml_collections.ConfigDict) -> list[str]:
    """A text model's prompts when none are given: its config's sampling.prompts (written by train.py), else, for
    Fashion-MNIST runs made before that field, the class captions it was trained on."""
    prompts = list(config.sampling.prompts)
    if not prompts and config.data.name == "fashion_mnist":
        from ldm_jax.data.fashion_mnist import CLASS_NAMES
        from ldm_jax.data.text import class_captions

        prompts = class_captions(CLASS_NAMES)
    return prompts


def load_text_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> Any:
    """The model's tokenizer: condition.tokenizer 'bert' (WordPiece, default) or 'clip' (BPE, converted SD
    models); from condition.vocab_path, else WORKDIR/tokenizer."""
    from ldm_jax.data.text import load_tokenizer

    path = config.condition.vocab_path or os.path.join(workdir, "tokenizer")
    return load_tokenizer(config.condition.tokenizer, path)


@dataclass
class LoadedLDM:
    """A trained latent diffusion model ready to sample: see the module docstring."""

    config: ml_collections.ConfigDict
    model: LatentDiffusionModel
    first_stage: W.FirstStage
    params: dict
    scale_factor: float
    sched: DiffusionSchedule
    step: int
    workdir: str
    tokenizer: Any = None
    _source: Any = field(default=None, repr=False)

    @classmethod
    def load(cls, workdir: str, first_stage_workdir: str | None = None, step: int | None = None) -> LoadedLDM:
        """Reads config.json, the EMA params and scale_factor of checkpoint `step` (default: the newest), the first
        stage, the tokenizer."""
        config = W.read_config(workdir, "ldm")
        fs = W.load_first_stage(W.resolve_first_stage(workdir, config, first_stage_workdir))
        tokenizer = None
        if config.condition.type == "text":
            tokenizer = load_text_tokenizer(config, workdir)
        params, scale, step = W.restore_ema(workdir, step)
        model = W.build_model(config, fs)
        return cls(config, model, fs, params, scale, W.make_schedule(config), step, workdir, tokenizer)

    @property
    def resolution(self) -> int:
        return int(self.config.data.resolution)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the training images."""
        from ldm_jax.data.pipeline import image_size

        return image_size(self.config.data)

    def latent_shape(self, size_factor: int = 1) -> tuple[int, int, int]:
        """(h, w, c) of the latents sampled at `size_factor` × the training size (convolutional sampling)."""
        f, k = self.first_stage.factor, int(size_factor)
        h, w = self.image_size
        return h // f * k, w // f * k, self.first_stage.latent_channels

    # --- conditions of sample indices ---

    def tokens(self, texts: Sequence[str]) -> np.ndarray:
        """Token ids int32 (len(texts), model.text_max_len) of prompts, as the model reads them."""
        from ldm_jax.data.text import tokenize

        return tokenize(self.tokenizer, list(texts), int(self.config.model.text_max_len))

    def _spatial_inputs(self, indices: np.ndarray, size_factor: int) -> dict[str, np.ndarray]:
        """Test-split example i % N (no augmentation) at size_factor × the training resolution."""
        from ldm_jax.data.pipeline import Preprocessor, make_source, to_float

        dc = self.config.data
        if self._source is None:
            self._source = make_source(dc, "test")
        prep = Preprocessor(dc.resolution, dc.channels, dc.preprocess, False, augment=False, width=dc.width)
        exs = [self._source.get(int(i) % len(self._source)) for i in indices]
        out = {"image": to_float(np.stack([prep(e["image"]) for e in exs]))}
        if "segmentation" in exs[0]:
            out["segmentation"] = np.stack([e["segmentation"] for e in exs])
        if size_factor > 1:
            h, w = (side * size_factor for side in self.image_size)
            img = out["image"]
            out["image"] = np.asarray(jax.image.resize(img, (len(img), h, w, img.shape[-1]), "linear"))
            if "segmentation" in out:
                seg = out["segmentation"]
                out["segmentation"] = np.repeat(np.repeat(seg, size_factor, axis=1), size_factor, axis=2)
        return out

    def conditions(self, indices: np.ndarray, class_labels: Sequence[int] | None = None,
                   prompts: Sequence[str] | None = None, size_factor: int = 1) -> tuple[dict, dict]:
        """(label/tokens condition, spatial inputs) of samples `indices`; labels and prompts cycle over i."""
        ctype = self.config.condition.type
        cond: dict[str, np.ndarray] = {}
        if ctype == "class":
            labels = np.asarray(class_labels) if class_labels else np.arange(real_classes(self.config))
            cond["label"] = labels[indices % len(labels)].astype(np.int32)
        elif ctype == "text":
            prompts = prompts or default_prompts(self.config)
            table = self.tokens(prompts)
            cond["tokens"] = table[indices % len(prompts)]
        spatial = self._spatial_inputs(indices, size_factor) if ctype in SPATIAL_TYPES else {}
        return cond, spatial

    # --- the compiled sampler ---

    def _generator(self, sampler: str, steps: int, eta: float, guidance: float, size_factor: int,
                   solver_opts: dict[str, Any], strength: float | None = None) -> Callable:
        key = (os.path.abspath(self.workdir), self.step, os.path.abspath(self.first_stage.workdir),
               self.config.to_json(sort_keys=True), sampler, steps, eta, guidance, size_factor,
               tuple(sorted(solver_opts.items())), strength)
        if key in _GENERATORS:
            return _GENERATORS[key]
        cfg, fs, model, scale = self.config, self.first_stage, self.model, self.scale_factor
        ctype = cfg.condition.type
        guided = ctype in ("class", "text") and guidance != 1.0
        null_tokens = None
        if ctype == "text":
            from ldm_jax.data.text import NULL_TEXT

            null_tokens = jnp.asarray(self.tokens([NULL_TEXT])[0])
        sample = make_sample_fn(lambda p, x, t, c: model.apply({"params": p}, x, t, c), self.sched, sampler, steps,
                                eta, guidance, cfg.diffusion.parameterization, shared_x=True, **solver_opts)
        latent = self.latent_shape(size_factor)
        extra: dict[str, Any] = {}
        if strength is not None:
            t_enc, t_noise = img2img_timestep(cfg.diffusion.num_timesteps, steps, strength,
                                              solver_opts.get("spacing") or "uniform")
            extra["start_index"] = t_enc

        @jax.jit
        def generate(params, fs_vars, cond, spatial, indices, seed, x_T, init):
            # threefry whatever the default: its keys are exact under vmap (rbg's are not), so sample i
            # does not depend on its batch.
            base = jax.random.key(seed, impl="threefry2x32")
            keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)
            sample_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
            mask = None
            if ctype in SPATIAL_TYPES:
                images = spatial["image"]
                if ctype == "inpaint":
                    h, w = images.shape[1:3]
                    mask = jax.vmap(lambda k: conditions.random_box_masks(jax.random.fold_in(k, 1), 1, h, w)[0])(keys)
                sc = conditions.spatial_condition(cfg, fs, fs_vars, images, scale, None, inpaint_mask=mask,
                                                  segmentation=spatial.get("segmentation"))
                sc.pop("mask", None)
                cond = {**cond, **sc}
            if init is not None:  # img2img: the encoded image (posterior mean) noised to the strength's timestep
                if x_T is None:
                    x_T = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 2), latent))(keys)
                z0 = fs.encode(fs_vars, init) * scale
                x_T = q_sample(self.sched, z0, jnp.full((len(indices),), t_noise, jnp.int32), x_T)
            uncond = conditions.null_condition(cfg, cond, null_tokens) if guided else None
            z = sample_each(sample, params, cond, uncond, sample_keys, latent, x_T, **extra)
            x = jnp.clip(fs.decode(fs_vars, z / scale), -1.0, 1.0)
            if mask is not None:  # keep the known pixels exactly, as the reference inpainting script
                x = mask * x + (1.0 - mask) * spatial["image"]
            return x

        _GENERATORS[key] = generate
        return generate

    def sample(self, indices: Iterable[int], *, sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
               guidance: float = 1.0, class_labels: Sequence[int] | None = None,
               prompts: Sequence[str] | None = None, size_factor: int = 1, seed: int = 0, spacing: str = "",
               karras: bool = False, order: int = 2, guidance_rescale: float = 0.0, x_T: np.ndarray | None = None,
               init_images: np.ndarray | None = None, strength: float = 0.75) -> np.ndarray:
        """Images float32 (len(indices), H, W, C) in [-1, 1] of samples `indices` (one compiled batch).

        x_T: the starting noise, (len(indices), h, w, c) latents (default: drawn from (seed, i)). init_images:
        img2img (SDEdit, as SD's img2img script; DDIM only): (len(indices), H, W, C) images in [-1, 1] are encoded,
        noised to the timestep of `strength` (x_T is that noise when given) and denoised from there."""
        indices = np.asarray(list(indices), np.int32)
        solver_opts = dict(spacing=spacing, karras=bool(karras), order=int(order),
                           guidance_rescale=float(guidance_rescale))
        check_sample_args(self.config, sampler=sampler, steps=steps, eta=eta, guidance=guidance,
                          class_labels=class_labels, prompts=prompts, size_factor=size_factor,
                          num_samples=len(indices), batch_size=max(len(indices), 1), seed=seed, **solver_opts)
        if x_T is not None:
            x_T = np.asarray(x_T, np.float32)
            if x_T.shape != (len(indices), *self.latent_shape(size_factor)):
                raise ValueError(f"--init_noise: shape {x_T.shape} != (samples, *latent shape) "
                                 f"{(len(indices), *self.latent_shape(size_factor))}")
        if init_images is not None:
            if sampler != "ddim":
                raise ValueError(f"--init_image (img2img) samples with DDIM, as SD's img2img script; got --sampler "
                                 f"{sampler}")
            h, w = (side * size_factor for side in self.image_size)
            init_images = np.asarray(init_images, np.float32)
            if init_images.shape[1:] != (h, w, self.config.data.channels) or len(init_images) != len(indices):
                raise ValueError(f"--init_image: images of shape {init_images.shape[1:]}, the model needs "
                                 f"{(h, w, self.config.data.channels)}")
        cond, spatial = self.conditions(indices, class_labels, prompts, size_factor)
        gen = self._generator(sampler, int(steps), float(eta), float(guidance), int(size_factor), solver_opts,
                              None if init_images is None else float(strength))
        out = gen(self.params, self.first_stage.variables, cond, spatial, jnp.asarray(indices), seed,
                  None if x_T is None else jnp.asarray(x_T), None if init_images is None else jnp.asarray(init_images))
        return np.asarray(out)

    def sample_to_dir(self, out_dir: str, num_samples: int, batch_size: int, *, seed: int = 0,
                      progress: Callable[[Iterable], Iterable] | None = None, x_T: np.ndarray | None = None,
                      init_images: np.ndarray | None = None, inputs: dict[str, str] | None = None,
                      **kwargs) -> dict[str, float]:
        """Writes OUT/000000.png ... OUT/{N-1}.png and OUT/grid.png, skipping existing files (resume).

        Batches are always [kB, (k+1)B) padded to B, so a resumed run repeats the very same computations.
        OUT/sampling.json records the settings (and `inputs`: where x_T / init_images came from); resuming with
        different ones is refused. x_T: one starting noise per sample (N, h, w, c), or one for all (h, w, c);
        init_images: img2img sources, sample i uses image i mod len (see `sample`)."""
        check_sample_args(self.config, num_samples=num_samples, batch_size=batch_size, seed=seed,
                          **{k: v for k, v in kwargs.items() if k != "strength"})
        if x_T is not None:
            x_T = np.asarray(x_T, np.float32)
            x_T = np.broadcast_to(x_T, (num_samples, *x_T.shape)) if x_T.ndim == 3 else x_T
            if len(x_T) < num_samples:
                raise ValueError(f"--init_noise holds {len(x_T)} starting noises for {num_samples} samples")
        if kwargs.get("guidance", 1.0) != 1.0 and not self.config.condition.p_uncond:
            logging.warning("guidance %s: this model was trained without condition dropout (p_uncond 0), so its "
                            "null condition is untrained", kwargs["guidance"])
        settings = {"workdir": os.path.abspath(self.workdir), "checkpoint_step": self.step, "seed": seed,
                    **{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in kwargs.items()},
                    **(inputs or {})}
        _check_settings(out_dir, settings)
        paths = [os.path.join(out_dir, f"{i:06d}.png") for i in range(num_samples)]
        todo = [k for k in range(math.ceil(num_samples / batch_size))
                if not all(os.path.exists(p) for p in paths[k * batch_size:(k + 1) * batch_size])]
        t0, written = time.time(), 0
        for k in (progress(todo) if progress else todo):
            idx = np.arange(k * batch_size, (k + 1) * batch_size)
            extra: dict[str, np.ndarray] = {}
            if x_T is not None:
                extra["x_T"] = x_T[np.minimum(idx, num_samples - 1)]
            if init_images is not None:
                extra["init_images"] = init_images[idx % len(init_images)]
            images = to_uint8(self.sample(idx, seed=seed, **kwargs, **extra))
            for i, img in zip(idx, images, strict=True):
                if i < num_samples and not os.path.exists(paths[i]):
                    save_png(img, paths[i])
                    written += 1
        elapsed = time.time() - t0
        write_grid(paths[:GRID_MAX], os.path.join(out_dir, "grid.png"))
        return {"written": written, "skipped": num_samples - written, "seconds": elapsed,
                "samples_per_s": written / elapsed if written else 0.0}


def _check_settings(out_dir: str, settings: dict) -> None:
    """Records the sampling settings in OUT; refuses to mix files made with different ones into one folder."""
    path = os.path.join(out_dir, SETTINGS_FILE)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        if diff:
            k = diff[0]
            raise ValueError(f"--out {out_dir} holds samples made with {k}={old.get(k)!r}, not {settings.get(k)!r}; "
                             "use another --out")
        return
    os.makedirs(out_dir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(settings, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def write_grid(paths: Sequence[str], out_path: str) -> None:
    """A square-ish grid PNG of the given sample PNGs."""
    from PIL import Image

    images = [np.asarray(Image.open(p)) for p in paths]
    images = np.stack([im[..., None] if im.ndim == 2 else im for im in images])
    save_png(make_grid(images, math.ceil(math.sqrt(len(images)))), out_path)
