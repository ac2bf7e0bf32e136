"""Stage-2 training pieces: state, optimizer, condition dropout for classifier-free guidance, the train step."""

from __future__ import annotations

import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ldm_jax.conditions import null_condition, spatial_condition
from ldm_jax.data.transforms import as_float
from ldm_jax.diffusion import DiffusionSchedule, diffusion_loss
from ldm_jax.diffusion.generate import check_sampling_options
from ldm_jax.models.latent_diffusion import LatentDiffusionModel
from ldm_jax.training.common import all_finite, guarded_update, scaled_lr
from ldm_jax.workdir import FirstStage


@flax.struct.dataclass
class LDMState:
    step: jax.Array
    params: dict
    ema_params: dict
    opt_state: Any
    scale_factor: jax.Array  # latent scaling (fixed, or 1/std of the first batch's latents: scale_by_std)
    skipped: jax.Array


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


def drop_condition(cfg, cond, null_tokens, key: jax.Array, p_uncond: float) -> dict[str, jax.Array]:
    """Classifier-free-guidance training: each example's condition → null with probability p_uncond."""
    if p_uncond <= 0 or not ({"label", "tokens", "context"} & set(cond)):
        return cond
    b = next(iter(cond.values())).shape[0]
    drop = jax.random.bernoulli(key, p_uncond, (b,))
    null = null_condition(cfg, cond, null_tokens)
    return {k: jnp.where(drop.reshape((b,) + (1,) * (v.ndim - 1)), null[k], v) for k, v in cond.items()}


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
        # uint8 from the pipeline: converted here, on the device.
        images = as_float(batch["image"]) if "image" in batch else None
        if "moments" in batch:  # from a latent cache (no spatial conditions: checked when the run starts)
            z = first_stage.from_moments(batch["moments"], sample_key) * state.scale_factor
        else:
            z = jax.lax.stop_gradient(first_stage.encode(fs_vars, images, sample_key)) * state.scale_factor
        cond = {k: v for k, v in batch.items() if k in ("label", "tokens", "context")}
        if images is not None:
            cond.update(spatial_condition(cfg, first_stage, fs_vars, images, state.scale_factor, k_mask,
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
