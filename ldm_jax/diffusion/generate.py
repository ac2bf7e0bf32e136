"""From a stage-2 network to samples: guided model function + the chosen sampler, as one jittable function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ldm_jax.diffusion.samplers import classifier_free_guidance, get_sampler
from ldm_jax.diffusion.schedules import DiffusionSchedule


def make_sample_fn(
    apply_fn: Callable[..., jax.Array],
    sched: DiffusionSchedule,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    guidance: float = 1.0,
    parameterization: str = "eps",
    spacing: str = "uniform",
    shared_x: bool = False,
) -> Callable[..., jax.Array]:
    """Returns sample(params, cond, uncond, key, shape) -> latents. `apply_fn(params, x, t, cond)` is the
    network; `uncond` is the null condition (ignored when guidance == 1). Validates names/ranges eagerly.
    shared_x: the network accepts x of batch B with conditions of batch 2B (UNetModel and LatentDiffusionModel
    do), so guidance runs the condition-free layers once for both halves (classifier_free_guidance)."""
    sample_impl = get_sampler(sampler)
    if sampler != "ddpm" and not 1 <= steps <= sched.num_timesteps:
        raise ValueError(f"sampling.steps must be in [1, {sched.num_timesteps}], got {steps}")
    if not (guidance >= 0 and jnp.isfinite(guidance)):
        raise ValueError(f"sampling.guidance must be a finite number >= 0, got {guidance}")
    kwargs: dict[str, Any] = {"parameterization": parameterization}
    if sampler == "ddim":
        kwargs.update(steps=steps, eta=eta, spacing=spacing)
    elif sampler == "plms":
        kwargs.update(steps=steps, spacing=spacing)

    def sample(params, cond: dict, uncond: dict | None, key: jax.Array, shape: tuple[int, ...],
               **extra) -> jax.Array:
        def model_fn_cond(x, t, c):
            return apply_fn(params, x, t, c)

        if uncond is None or guidance == 1.0:
            model_fn = lambda x, t: model_fn_cond(x, t, cond)  # noqa: E731
        else:
            model_fn = classifier_free_guidance(model_fn_cond, cond, uncond, guidance, shared_x)
        return sample_impl(model_fn, sched, shape, key, **kwargs, **extra)

    return sample
