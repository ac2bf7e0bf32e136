"""Stage-2 pieces: frozen first stage, conditions (with classifier-free-guidance dropout), state, train step."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ldm_jax.config_defaults import load_saved_config
from ldm_jax.diffusion import DiffusionSchedule, diffusion_loss
from ldm_jax.diffusion.generate import check_sampling_options
from ldm_jax.models.autoencoder import build_autoencoder
from ldm_jax.models.latent_diffusion import LatentDiffusionModel, build_latent_diffusion
from ldm_jax.training.checkpoint import Checkpointer
from ldm_jax.training.common import all_finite, guarded_update, scaled_lr

CONDITION_TYPES = ("none", "class", "text", "lowres", "inpaint", "semantic")
LOWRES_MODES = ("pixels", "latent")


@dataclass
class FirstStage:
    """A frozen stage-1 autoencoder restored from its workdir."""

    model: Any
    variables: dict
    config: ml_collections.ConfigDict
    workdir: str
    step: int = -1  # the checkpoint step restored (a latent cache records it)

    @property
    def latent_channels(self) -> int:
        return int(self.config.model.embed_dim)

    @property
    def factor(self) -> int:
        return 2 ** (len(self.config.model.ch_mult) - 1)

    def encode(self, variables: dict, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        return self.model.apply(variables, x, key, method="encode_latent")

    def decode(self, variables: dict, z: jax.Array) -> jax.Array:
        return self.model.apply(variables, z, method="decode_latent")

    def moments(self, variables: dict, x: jax.Array) -> jax.Array:
        """What a latent cache stores per image (KL: mean and log-variance; VQ: pre-quantisation latents)."""
        return self.model.apply(variables, x, method="encode_moments")

    def from_moments(self, moments: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """`encode`'s result from stored moments (the same posterior sample for the same key)."""
        return self.model.latent_from_moments(moments, key)


def load_first_stage(workdir: str) -> FirstStage:
    """Reads a stage-1 workdir (config.json + latest Orbax checkpoint); one-line errors name what is missing."""
    cfg_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"first_stage.workdir: no stage-1 config at {cfg_path} (train stage 1 first)")
    config = load_saved_config(cfg_path)
    if config.get("stage") != "autoencoder":
        raise ValueError(f"first_stage.workdir: {workdir} holds a {config.get('stage')!r} run, not an autoencoder")
    ckpt = Checkpointer(workdir, async_save=False)
    step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"first_stage.workdir: no checkpoint under {ckpt.directory}")
    state, _ = ckpt.restore_raw(step)
    ckpt.close()
    variables = {"params": state["params"]["model"], **state.get("model_state", {})}
    return FirstStage(build_autoencoder(config.model), variables, config, workdir, int(step))


def resolve_first_stage(workdir: str, config: ml_collections.ConfigDict, override: str | None = None) -> str:
    """The stage-1 workdir: `override`, else first_stage.workdir as saved (relative to the current directory,
    or failing that to the stage-2 workdir's parent, so a moved runs/ directory still loads)."""
    if override:
        return override
    path = config.first_stage.workdir
    candidates = [path]
    if not os.path.isabs(path):
        parent = os.path.dirname(os.path.abspath(workdir))
        candidates += [os.path.join(parent, path), os.path.join(parent, os.path.basename(path))]
    for c in candidates:
        if os.path.isfile(os.path.join(c, "config.json")):
            return c
    return path  # load_first_stage names what is missing


@flax.struct.dataclass
class LDMState:
    step: jax.Array
    params: dict
    ema_params: dict
    opt_state: Any
    scale_factor: jax.Array  # latent scaling (fixed, or 1/std of the first batch's latents: scale_by_std)
    skipped: jax.Array


def make_schedule(cfg: ml_collections.ConfigDict) -> DiffusionSchedule:
    d = cfg.diffusion
    if d.zero_terminal_snr and d.parameterization == "eps":
        raise ValueError("diffusion.zero_terminal_snr needs diffusion.parameterization 'v' or 'x0' (at SNR 0 an eps "
                         "prediction says nothing about x0)")
    return DiffusionSchedule.create(d.schedule, d.num_timesteps, d.linear_start, d.linear_end, d.cosine_s,
                                    d.zero_terminal_snr)


def check_sampling(cfg: ml_collections.ConfigDict) -> None:
    """Validates the `sampling` section (used only after training) up front."""
    sc = cfg.sampling
    check_sampling_options(cfg.diffusion.num_timesteps, sc.sampler, sc.steps, sc.eta, sc.guidance, sc.spacing,
                           sc.karras, sc.order, sc.guidance_rescale)


def frozen_parts(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Top-level param groups that do not train: the text encoder τθ unless model.train_text_encoder."""
    m = cfg.model
    if m.cond_stage in ("text", "clip") and not m.train_text_encoder:
        return ("cond_encoder",)
    return ()


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW (weight decay 0.01, torch's default the reference used) with linear warm-up; optional accumulation.
    Frozen parts (`frozen_parts`) get zero updates and no optimizer moments."""
    tc = cfg.train
    warmup = tc.warmup_steps
    # No warm-up means the full rate from the first update (a 1-step warm-up would make that update lr 0).
    lr = optax.warmup_constant_schedule(0.0, scaled_lr(tc), warmup) if warmup > 0 else scaled_lr(tc)
    tx = optax.adamw(lr, weight_decay=tc.weight_decay)
    if tc.grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(tc.grad_clip), tx)
    frozen = frozen_parts(cfg)
    if frozen:
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                   lambda params: {k: "frozen" if k in frozen else "train" for k in params})
    if tc.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=tc.grad_accum)
    return tx


def build_model(cfg: ml_collections.ConfigDict, first_stage: FirstStage) -> LatentDiffusionModel:
    if cfg.model.latent_channels and cfg.model.latent_channels != first_stage.latent_channels:
        raise ValueError(f"model.latent_channels={cfg.model.latent_channels} but the stage-1 model at "
                         f"{first_stage.workdir} has embed_dim={first_stage.latent_channels}")
    ctype = cfg.condition.type
    if ctype not in CONDITION_TYPES:
        raise ValueError(f"condition.type must be one of {CONDITION_TYPES}, got {ctype!r}")
    if ctype == "lowres" and cfg.condition.lowres_mode not in LOWRES_MODES:
        raise ValueError(f"condition.lowres_mode must be one of {LOWRES_MODES}, got {cfg.condition.lowres_mode!r}")
    if ctype == "semantic" and not cfg.model.concat_in_channels:
        raise ValueError("condition.type='semantic' needs model.concat_in_channels (the number of segment classes)")
    return build_latent_diffusion(cfg.model, first_stage.latent_channels)


def null_condition(cfg: ml_collections.ConfigDict, cond: dict[str, jax.Array], null_tokens: jax.Array | None):
    """The unconditional input for guidance: the null class / the empty prompt; spatial conditions are kept."""
    out = dict(cond)
    if "label" in cond:
        out["label"] = jnp.full_like(cond["label"], cfg.model.n_classes - 1)
    if "tokens" in cond:
        out["tokens"] = jnp.broadcast_to(null_tokens, cond["tokens"].shape).astype(cond["tokens"].dtype)
    if "context" in cond:  # a given context: the null condition is all zeros
        out["context"] = jnp.zeros_like(cond["context"])
    return out


def drop_condition(cfg, cond, null_tokens, key: jax.Array, p_uncond: float) -> dict[str, jax.Array]:
    """Classifier-free-guidance training: each example's condition → null with probability p_uncond."""
    if p_uncond <= 0 or not ({"label", "tokens", "context"} & set(cond)):
        return cond
    b = next(iter(cond.values())).shape[0]
    drop = jax.random.bernoulli(key, p_uncond, (b,))
    null = null_condition(cfg, cond, null_tokens)
    return {k: jnp.where(drop.reshape((b,) + (1,) * (v.ndim - 1)), null[k], v) for k, v in cond.items()}


def random_box_masks(key: jax.Array, b: int, h: int, w: int, min_frac: float = 0.25, max_frac: float = 0.6):
    """(B, H, W, 1) masks, 1 = region to inpaint: one random rectangle per image."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    bh = jnp.floor(jax.random.uniform(k1, (b,), minval=min_frac, maxval=max_frac) * h).astype(jnp.int32)
    bw = jnp.floor(jax.random.uniform(k2, (b,), minval=min_frac, maxval=max_frac) * w).astype(jnp.int32)
    y0 = jnp.floor(jax.random.uniform(k3, (b,)) * (h - bh)).astype(jnp.int32)
    x0 = jnp.floor(jax.random.uniform(k4, (b,)) * (w - bw)).astype(jnp.int32)
    ys, xs = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
    inside = ((ys >= y0[:, None, None]) & (ys < (y0 + bh)[:, None, None])
              & (xs >= x0[:, None, None]) & (xs < (x0 + bw)[:, None, None]))
    return inside[..., None].astype(jnp.float32)


def lowres_image(cfg, images: jax.Array) -> jax.Array:
    """The low-resolution condition image: an antialiased bilinear ×(1/sr_factor) copy."""
    f = cfg.condition.sr_factor
    b, h, w, c = images.shape
    return jax.image.resize(images, (b, h // f, w // f, c), method="linear", antialias=True)


def spatial_condition(cfg, first_stage: FirstStage, fs_vars, images: jax.Array, scale: jax.Array,
                      key: jax.Array, inpaint_mask: jax.Array | None = None,
                      segmentation: jax.Array | None = None) -> dict[str, jax.Array]:
    """The concat conditions: a low-res copy (pixels, or its upsampled copy's latents), masked-image latents +
    mask, or a one-hot semantic map (from the batch's `segmentation`: int ids (B, H, W) or one-hot)."""
    ctype = cfg.condition.type
    b, h, w, c = images.shape
    if ctype == "lowres":
        low = lowres_image(cfg, images)
        if cfg.condition.lowres_mode == "latent":
            # Encode the bilinearly upsampled low-res image: the condition keeps all its detail at latent
            # resolution even when sr_factor < the stage-1 factor (pixels mode would have to shrink it).
            up = jax.image.resize(low, images.shape, method="linear")
            return {"concat": first_stage.encode(fs_vars, up) * scale}
        return {"concat": low}
    if ctype == "inpaint":
        mask = random_box_masks(key, b, h, w) if inpaint_mask is None else inpaint_mask
        masked = images * (1.0 - mask)
        zc = first_stage.encode(fs_vars, masked) * scale
        small = jax.image.resize(mask, (b, *zc.shape[1:3], 1), method="nearest")
        return {"concat": jnp.concatenate([zc, small], axis=-1), "mask": mask}
    if ctype == "semantic":
        if segmentation is None:
            raise ValueError("condition.type='semantic' needs batches with a 'segmentation' map")
        k = cfg.model.concat_in_channels
        if segmentation.ndim == 3:  # class ids -> one-hot, as the reference's segmentation key
            segmentation = jax.nn.one_hot(segmentation, k, dtype=jnp.float32)
        if segmentation.shape[-1] != k:
            raise ValueError(f"model.concat_in_channels={k} but the segmentation has {segmentation.shape[-1]} "
                             "classes")
        return {"concat": segmentation.astype(jnp.float32)}
    return {}


def condition_preview(cfg, images: jax.Array, cond: dict[str, jax.Array],
                      segmentation: jax.Array | None = None) -> jax.Array:
    """An image of the spatial condition for sample grids: the masked image, the low-res image, the segment map."""
    ctype = cfg.condition.type
    if ctype == "inpaint":
        return images * (1.0 - cond["mask"])
    if ctype == "lowres":
        return lowres_image(cfg, images)
    if ctype == "semantic" and segmentation is not None:
        k = cfg.model.concat_in_channels
        ids = segmentation if segmentation.ndim == 3 else jnp.argmax(segmentation, axis=-1)
        gray = ids.astype(jnp.float32)[..., None] / max(k - 1, 1) * 2.0 - 1.0
        return jnp.broadcast_to(gray, (*gray.shape[:3], images.shape[-1]))
    return images


def init_state(cfg, model: LatentDiffusionModel, tx, key: jax.Array, latent_shape, cond: dict,
               scale_factor: float) -> LDMState:
    b = 1
    x = jnp.zeros((b, *latent_shape), jnp.float32)
    cond = {k: v[:b] for k, v in cond.items() if k != "mask"}
    params = model.init({"params": key}, x, jnp.zeros((b,), jnp.int32), cond)["params"]
    return LDMState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=tx.init(params),
                    scale_factor=jnp.asarray(scale_factor, jnp.float32), skipped=jnp.zeros((), jnp.int32))


def make_train_step(cfg, model: LatentDiffusionModel, first_stage: FirstStage, tx, sched: DiffusionSchedule):
    """step(state, batch, fs_vars, null_tokens) -> (state, metrics): encode (frozen) → condition → DDPM loss."""
    base_key = jax.random.key(cfg.seed + 1)
    d = cfg.diffusion
    ema_decay = cfg.train.ema_decay
    frozen = frozen_parts(cfg)

    def ema_update(ema, params, decay):
        # Frozen parts keep their EMA weights bit for bit (decay * a + (1 - decay) * a need not round to a).
        return {k: e if k in frozen else jax.tree.map(lambda a, b: decay * a + (1 - decay) * b, e, params[k])
                for k, e in ema.items()}

    def step(state: LDMState, batch: dict, fs_vars: dict, null_tokens: jax.Array | None):
        key = jax.random.fold_in(base_key, state.step)
        k_post, k_mask, k_drop, k_loss, k_dropout = jax.random.split(key, 5)
        sample_key = k_post if cfg.first_stage.sample_posterior else None
        if "moments" in batch:  # from a latent cache (no spatial conditions: checked when the run starts)
            z = first_stage.from_moments(batch["moments"], sample_key) * state.scale_factor
        else:
            images = batch["image"]
            z = jax.lax.stop_gradient(first_stage.encode(fs_vars, images, sample_key)) * state.scale_factor
        cond = {k: v for k, v in batch.items() if k in ("label", "tokens", "context")}
        if "image" in batch:
            cond.update(spatial_condition(cfg, first_stage, fs_vars, batch["image"], state.scale_factor, k_mask,
                                          segmentation=batch.get("segmentation")))
        cond.pop("mask", None)
        cond = drop_condition(cfg, cond, null_tokens, k_drop, cfg.condition.p_uncond)

        def loss_fn(params):
            def model_fn(x_t, t):
                return model.apply({"params": params}, x_t, t, cond, train=True, rngs={"dropout": k_dropout})

            return diffusion_loss(sched, model_fn, z, k_loss, d.parameterization, d.loss_type, d.snr_gamma,
                                  d.offset_noise)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        finite = all_finite(loss, grads)
        params, opt_state = guarded_update(tx, grads, state.opt_state, state.params, finite)
        # EMA with the reference's warm-up: decay_n = min(decay, (1 + n) / (10 + n)).
        n = state.step.astype(jnp.float32)
        decay = jnp.minimum(ema_decay, (1.0 + n) / (10.0 + n))
        # lax.cond, not a where per leaf: much cheaper to compile (see common.guarded_update).
        ema = jax.lax.cond(finite, lambda e, p: ema_update(e, p, decay), lambda e, p: e, state.ema_params, params)
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
                                  skipped=state.skipped + (~finite).astype(jnp.int32))
        metrics = {"loss": loss, "finite": finite.astype(jnp.float32), "grad_norm": optax.global_norm(grads),
                   "latent_std": jnp.std(z)}
        return new_state, metrics

    return step


def check_latent_cache(info: dict, cfg: ml_collections.ConfigDict, first_stage: FirstStage) -> None:
    """A latent cache (data.latents) must come from this run's stage-1 checkpoint and data settings, and the
    condition must not need the images."""
    from ldm_jax.data.latents import DATA_FIELDS

    if cfg.condition.type not in ("none", "class", "text"):
        raise ValueError(f"data.latents: condition.type={cfg.condition.type!r} needs the images in the step; train "
                         "it from images (data.latents='')")
    if (os.path.realpath(info["first_stage"]), info["first_stage_step"]) != (
            os.path.realpath(first_stage.workdir), first_stage.step):
        raise ValueError(f"data.latents: the cache was encoded by {info['first_stage']} at step "
                         f"{info['first_stage_step']}, this run's first stage is {first_stage.workdir} at step "
                         f"{first_stage.step}: re-run python -m ldm_jax.cache_latents")
    for key in DATA_FIELDS:
        if info["data"].get(key) != cfg.data.get(key):
            raise ValueError(f"data.{key}={cfg.data.get(key)!r} but the latent cache was made with "
                             f"{info['data'].get(key)!r}")


def first_batch_scale(first_stage: FirstStage, images: np.ndarray, key: jax.Array | None,
                      moments: bool = False) -> float:
    """scale_by_std: 1/std of the first batch's latents (computed once, then stored in the checkpoint); from a
    latent cache's `moments` when `moments`."""
    if moments:
        z = jax.jit(first_stage.from_moments)(jnp.asarray(images), key)
    else:
        z = jax.jit(first_stage.encode)(first_stage.variables, jnp.asarray(images), key)
    return float(1.0 / jnp.std(z))
