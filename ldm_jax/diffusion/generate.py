"""From a stage-2 network to samples: guided model function + the chosen sampler, as one jittable function."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax

from ldm_jax.diffusion.samplers import DDIM_SPACINGS, classifier_free_guidance, get_sampler
from ldm_jax.diffusion.schedules import DiffusionSchedule
from ldm_jax.diffusion.solvers import KARRAS, SOLVERS, check_solver_options


def check_sampling_options(num_timesteps: int, sampler: str, steps: int, eta: float = 0.0, guidance: float = 1.0,
                           spacing: str = "", karras: bool = False, order: int = 2,
                           guidance_rescale: float = 0.0, prefix: str = "sampling.") -> None:
    """One-line ValueError for an unknown sampler or an option the sampler lacks (nothing is compiled)."""
    get_sampler(sampler)
    if sampler != "ddpm" and not 1 <= int(steps) <= num_timesteps:
        raise ValueError(f"{prefix}steps must be in [1, {num_timesteps}], got {steps}")
    if not (math.isfinite(guidance) and guidance >= 0):
        raise ValueError(f"{prefix}guidance must be a finite number >= 0, got {guidance}")
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"{prefix}eta must be a finite number >= 0, got {eta}")
    if eta != 0 and sampler != "ddim":
        raise ValueError(f"{prefix}eta must be 0 for the {sampler} sampler (eta is DDIM's; the stochastic "
                         f"solvers are dpmpp_2m_sde and euler_a), got {eta}")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"{prefix}guidance_rescale must be in [0, 1], got {guidance_rescale}")
    if sampler in SOLVERS:
        check_solver_options(sampler, spacing, karras, order, prefix)
        return
    if karras:
        raise ValueError(f"{prefix}karras: the {sampler} sampler has no Karras sigmas (only {', '.join(KARRAS)})")
    if order != 2:
        raise ValueError(f"{prefix}order applies to unipc only, got {order} for {sampler}")
    if spacing and sampler != "ddpm" and spacing not in DDIM_SPACINGS:
        raise ValueError(f"{prefix}spacing must be one of {', '.join(DDIM_SPACINGS)} for {sampler}; got {spacing!r}")


def make_sample_fn(
    apply_fn: Callable[..., jax.Array],
    sched: DiffusionSchedule,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    guidance: float = 1.0,
    parameterization: str = "eps",
    spacing: str = "",
    shared_x: bool = False,
    karras: bool = False,
    order: int = 2,
    guidance_rescale: float = 0.0,
) -> Callable[..., jax.Array]:
    """Returns sample(params, cond, uncond, key, shape) -> latents. `apply_fn(params, x, t, cond)` is the
    network; `uncond` is the null condition (ignored when guidance == 1). Validates names/ranges eagerly.
    spacing '' is the sampler's default (DDIM/PLMS: the reference's 'uniform'; solvers: 'linspace').
    shared_x: the network accepts x of batch B with conditions of batch 2B (UNetModel and LatentDiffusionModel
    do), so guidance runs the condition-free layers once for both halves (classifier_free_guidance)."""
    check_sampling_options(sched.num_timesteps, sampler, steps, eta, guidance, spacing, karras, order,
                           guidance_rescale)
    sample_impl = get_sampler(sampler)
    kwargs: dict[str, Any] = {"parameterization": parameterization}
    if sampler == "ddim":
        kwargs.update(steps=steps, eta=eta, spacing=spacing or "uniform")
    elif sampler == "plms":
        kwargs.update(steps=steps, spacing=spacing or "uniform")
    elif sampler in SOLVERS:
        kwargs.update(steps=steps, spacing=spacing or "linspace", karras=karras, order=order)

    def sample(params, cond: dict, uncond: dict | None, key: jax.Array, shape: tuple[int, ...],
               **extra) -> jax.Array:
        def model_fn_cond(x, t, c):
            return apply_fn(params, x, t, c)

        if uncond is None or guidance == 1.0:
            model_fn = lambda x, t: model_fn_cond(x, t, cond)  # noqa: E731
        else:
            model_fn = classifier_free_guidance(model_fn_cond, cond, uncond, guidance, shared_x, guidance_rescale)
        return sample_impl(model_fn, sched, shape, key, **kwargs, **extra)

    return sample


def sample_each(sample: Callable[..., jax.Array], params: Any, cond: dict, uncond: dict | None, keys: jax.Array,
                shape: tuple[int, ...], x_T: jax.Array | None = None, **extra) -> jax.Array:
    """`sample` (from make_sample_fn) vmapped over examples: example i is drawn from keys[i] (and x_T[i]) alone, so
    it does not depend on the batch it is drawn in; `shape` is one example's (h, w, c); `extra` goes to the sampler
    (e.g. DDIM's start_index)."""
    def one(c, u, key, x0):
        add = lambda tree: jax.tree.map(lambda v: v[None], tree)  # noqa: E731
        start = {} if x0 is None else {"x_T": x0[None]}
        return sample(params, add(c), None if u is None else add(u), key, (1, *shape), **start, **extra)[0]

    return jax.vmap(one, in_axes=(0, None if uncond is None else 0, 0, None if x_T is None else 0))(
        cond, uncond, keys, x_T)
