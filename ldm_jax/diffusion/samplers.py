"""DDPM, DDIM and PLMS samplers and classifier-free guidance, each one `lax.scan` over the steps.

Every sampler is a pure, traceable function: wrap the call in `jax.jit` (model params passed as jit
arguments, not baked into `model_fn`) and the whole sampling loop compiles once. `model_fn(x, t)` gets
t as an int32 array of shape (B,) and returns the network output in the given parameterization.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.gaussian import (
    ModelFn,
    check_parameterization,
    predict_eps_from_x0,
    q_posterior,
    q_sample,
    to_x0_eps,
)
from ldm_jax.diffusion.schedules import DiffusionSchedule
from ldm_jax.diffusion.solvers import SOLVERS, solver_sample

DDIM_SPACINGS = ("uniform", "quad", "linspace", "leading", "trailing")
# Adams-Bashforth weights for [e_t, e_{t-1}, e_{t-2}, e_{t-3}], indexed by the number of past eps (1..3).
_PLMS_COEFFS = np.array(
    [
        [0.0, 0.0, 0.0, 0.0],  # unused: the first step is pseudo improved Euler
        [3 / 2, -1 / 2, 0.0, 0.0],
        [23 / 12, -16 / 12, 5 / 12, 0.0],
        [55 / 24, -59 / 24, 37 / 24, -9 / 24],
    ],
    dtype=np.float32,
)


def _tb(t: jnp.ndarray, batch: int) -> jnp.ndarray:
    """Broadcast a scalar timestep to an int32 (B,) array."""
    return jnp.full((batch,), t, dtype=jnp.int32)


def _init_x(shape: tuple[int, ...], key: jax.Array, x_T: jnp.ndarray | None) -> tuple[jnp.ndarray, jax.Array]:
    """Starting noise (drawn from the key unless x_T is given) and the key left for the loop."""
    x_key, loop_key = jax.random.split(key)
    if x_T is None:
        x = jax.random.normal(x_key, shape, dtype=jnp.float32)
    else:
        x = jnp.asarray(x_T, dtype=jnp.float32)
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"sampling x_T shape {tuple(x.shape)} != sample shape {tuple(shape)}")
    return x, loop_key


def ddpm_sample(model_fn: ModelFn, sched: DiffusionSchedule, shape: tuple[int, ...], key: jax.Array,
                parameterization: str = "eps", clip_denoised: bool = False,
                x_T: jnp.ndarray | None = None) -> jnp.ndarray:
    """Ancestral sampling over all T steps with the posterior (clipped log) variance; no noise at t=0."""
    check_parameterization(parameterization)
    x, loop_key = _init_x(shape, key, x_T)
    ts = np.arange(sched.num_timesteps - 1, -1, -1, dtype=np.int32)
    keys = jax.random.split(loop_key, len(ts))

    def body(x, inp):
        t, k = inp
        tb = _tb(t, shape[0])
        x0, _ = to_x0_eps(sched, x, tb, model_fn(x, tb), parameterization)
        if clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
        mean, _, logvar = q_posterior(sched, x0, x, tb)
        noise = jax.random.normal(k, x.shape, dtype=x.dtype)
        nonzero = (t > 0).astype(x.dtype)
        return mean + nonzero * jnp.exp(0.5 * logvar) * noise, None

    x, _ = jax.lax.scan(body, x, (jnp.asarray(ts), keys))
    return x


def ddim_timesteps(num_timesteps: int, steps: int, spacing: str = "uniform") -> np.ndarray:
    """Ascending DDPM timesteps that DDIM/PLMS visit (the reference's +1 offset included).

    uniform: range(0, T, T // S) + 1 (more than S steps when S does not divide T, as in the reference);
    quad: (linspace(0, sqrt(0.8 T), S) ** 2).astype(int) + 1. Unlike the reference, values are clipped
    to T - 1 and deduplicated (the reference indexes out of range once T // S == 1). diffusers' spacings, without
    the offset: linspace: linspace(0, T - 1, S).round(); leading: range(0, T, T // S)[:S]; trailing:
    round(arange(T, 0, -T / S)) - 1 (starts at the last timestep, as zero-terminal-SNR models need).
    """
    if not 1 <= int(steps) <= int(num_timesteps):
        raise ValueError(f"sampling.steps must be in [1, {num_timesteps}] (diffusion timesteps), got {steps}")
    if spacing == "uniform":
        ts = np.arange(0, num_timesteps, num_timesteps // steps)
    elif spacing == "quad":
        ts = (np.linspace(0, np.sqrt(num_timesteps * 0.8), steps) ** 2).astype(np.int64)
    elif spacing == "linspace":
        return np.unique(np.linspace(0, num_timesteps - 1, steps).round()).astype(np.int32)
    elif spacing == "leading":
        return np.unique(np.arange(steps) * (num_timesteps // steps)).astype(np.int32)
    elif spacing == "trailing":
        return np.unique(np.round(np.arange(num_timesteps, 0, -num_timesteps / steps)) - 1).astype(np.int32)
    else:
        raise ValueError(f"sampling.spacing must be one of {', '.join(DDIM_SPACINGS)}; got {spacing!r}")
    return np.unique(np.minimum(ts + 1, num_timesteps - 1)).astype(np.int32)


def img2img_timestep(num_timesteps: int, steps: int, strength: float, spacing: str = "uniform") -> tuple[int, int]:
    """SDEdit as SD's img2img: (start_index t_enc = int(strength * steps), the timestep to noise the encoded image
    to). The noise level is that of the first step run, ts[t_enc - 1], as diffusers' img2img pipeline; CompVis'
    script noises to ts[t_enc], one step above where it starts denoising."""
    if not 0.0 < float(strength) <= 1.0:
        raise ValueError(f"--strength must be in (0, 1], got {strength}")
    ts = ddim_timesteps(num_timesteps, steps, spacing)
    t_enc = max(1, min(int(strength * len(ts)), len(ts)))
    return t_enc, int(ts[t_enc - 1])


def _ddim_alphas(sched: DiffusionSchedule, ts: np.ndarray, eta: float):
    """(abar_t, abar_prev, sigma) per selected step, ascending; abar_prev of the first is abar[0]."""
    ac = sched.alphas_cumprod
    a = ac[ts]
    a_prev = jnp.concatenate([ac[:1], ac[ts[:-1]]])
    sigma = eta * jnp.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    return a, a_prev, sigma


def ddim_sample(model_fn: ModelFn, sched: DiffusionSchedule, shape: tuple[int, ...], key: jax.Array,
                steps: int = 50, eta: float = 0.0, spacing: str = "uniform", parameterization: str = "eps",
                x_T: jnp.ndarray | None = None, keep_mask: jnp.ndarray | None = None,
                x0_known: jnp.ndarray | None = None, clip_denoised: bool = False,
                paste_known: bool = True, start_index: int | None = None) -> jnp.ndarray:
    """DDIM (Song et al. 2021) as the reference DDIMSampler; eta=0 is deterministic given x_T.

    start_index k (img2img, the reference's `decode(x_latent, cond, t_start=k)`): x_T is a latent already noised
    (see `img2img_timestep`) and only the first k of the selected timesteps are run, from the k-th down.

    Masked sampling (keep_mask: 1 = keep x0_known, 0 = generate; the inverse of the inpainting condition's mask,
    where 1 = the region to inpaint): before every step x = keep_mask * q_sample(x0_known, t) + (1 - keep_mask) * x
    (reference); with paste_known (not in the reference) the clean x0_known is pasted once more after the last step,
    so the kept region is exact.
    """
    check_parameterization(parameterization)
    if float(eta) < 0:
        raise ValueError(f"sampling.eta must be >= 0, got {eta}")
    if keep_mask is not None and x0_known is None:
        raise ValueError("sampling keep_mask given without x0_known (the known latents to keep)")
    ts = ddim_timesteps(sched.num_timesteps, steps, spacing)
    a, a_prev, sigma = _ddim_alphas(sched, ts, eta)
    if start_index is not None:
        if x_T is None or not 1 <= start_index <= len(ts):
            raise ValueError(f"ddim start_index must be in [1, {len(ts)}] and come with x_T, got {start_index}")
        ts, a_prev, sigma = ts[:start_index], a_prev[:start_index], sigma[:start_index]
    x, loop_key = _init_x(shape, key, x_T)
    keys = jax.random.split(loop_key, len(ts))
    stochastic = float(eta) > 0
    if keep_mask is not None:
        keep_mask = jnp.asarray(keep_mask, dtype=x.dtype)
        x0_known = jnp.asarray(x0_known, dtype=x.dtype)

    def body(x, inp):
        t, a_p, s, k = inp
        tb = _tb(t, shape[0])
        q_key, n_key = jax.random.split(k)
        if keep_mask is not None:
            known = q_sample(sched, x0_known, tb, jax.random.normal(q_key, x.shape, dtype=x.dtype))
            x = keep_mask * known + (1.0 - keep_mask) * x
        x0, eps = to_x0_eps(sched, x, tb, model_fn(x, tb), parameterization)
        if clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
            eps = predict_eps_from_x0(sched, x, tb, x0)
        # max(.,0) guards against rounding (and eta > 1) making the direction weight's radicand negative.
        dir_xt = jnp.sqrt(jnp.maximum(1.0 - a_p - s**2, 0.0)) * eps
        x = jnp.sqrt(a_p) * x0 + dir_xt
        if stochastic:  # skip drawing noise that eta = 0 would multiply by zero
            x = x + s * jax.random.normal(n_key, x.shape, dtype=x.dtype)
        return x, None

    x, _ = jax.lax.scan(body, x, (jnp.asarray(ts[::-1]), a_prev[::-1], sigma[::-1], keys))
    if keep_mask is not None and paste_known:
        x = keep_mask * x0_known + (1.0 - keep_mask) * x
    return x


def plms_sample(model_fn: ModelFn, sched: DiffusionSchedule, shape: tuple[int, ...], key: jax.Array,
                steps: int = 50, spacing: str = "uniform", parameterization: str = "eps",
                x_T: jnp.ndarray | None = None, eta: float = 0.0) -> jnp.ndarray:
    """PLMS (Liu et al. 2022) as the reference: pseudo improved Euler first, then Adams-Bashforth 2-4."""
    check_parameterization(parameterization)
    if float(eta) != 0.0:
        raise ValueError(f"sampling.eta must be 0 for the plms sampler, got {eta}")
    ts = ddim_timesteps(sched.num_timesteps, steps, spacing)
    a, a_prev, _ = _ddim_alphas(sched, ts, 0.0)
    x, _ = _init_x(shape, key, x_T)
    t_desc, a_desc, ap_desc = ts[::-1], a[::-1], a_prev[::-1]
    batch = shape[0]

    def eps_at(x, t):
        tb = _tb(t, batch)
        return to_x0_eps(sched, x, tb, model_fn(x, tb), parameterization)[1]

    def step(x, e, a_t, a_p):
        x0 = (x - jnp.sqrt(1.0 - a_t) * e) / jnp.sqrt(a_t)
        return jnp.sqrt(a_p) * x0 + jnp.sqrt(1.0 - a_p) * e

    # First step: average eps at t and at the next timestep of a trial DDIM step.
    e0 = eps_at(x, t_desc[0])
    x_trial = step(x, e0, a_desc[0], ap_desc[0])
    e0_next = eps_at(x_trial, t_desc[min(1, len(ts) - 1)])
    x = step(x, 0.5 * (e0 + e0_next), a_desc[0], ap_desc[0])
    if len(ts) == 1:
        return x
    # hist[0] is the most recent raw eps (the reference stores e_t, not the combined e_t').
    hist = jnp.stack([e0, jnp.zeros_like(e0), jnp.zeros_like(e0)])
    orders = np.minimum(np.arange(1, len(ts)), 3)
    coeffs = jnp.asarray(_PLMS_COEFFS[orders])

    def body(carry, inp):
        x, hist = carry
        t, a_t, a_p, c = inp
        e = eps_at(x, t)
        e_prime = c[0] * e + c[1] * hist[0] + c[2] * hist[1] + c[3] * hist[2]
        x = step(x, e_prime, a_t, a_p)
        return (x, jnp.concatenate([e[None], hist[:2]])), None

    (x, _), _ = jax.lax.scan(body, (x, hist), (jnp.asarray(t_desc[1:]), a_desc[1:], ap_desc[1:], coeffs))
    return x


def classifier_free_guidance(model_fn_cond: Callable[[jnp.ndarray, jnp.ndarray, Any], jnp.ndarray],
                             cond: Any, uncond: Any, scale: float, shared_x: bool = False,
                             rescale: float = 0.0) -> ModelFn:
    """model_fn(x, t) = uncond + scale * (cond - uncond), both halves evaluated in one batch of 2B.

    shared_x: pass x and t once (batch B) with the 2B conditions; for networks that accept that (UNetModel,
    LatentDiffusionModel), the layers before the first use of the condition then run once for both halves.
    rescale: guidance rescale phi (Lin et al. 2024; diffusers' rescale_noise_cfg): the guided output is mixed with
    its copy rescaled to the per-example std of the conditional output, phi * rescaled + (1 - phi) * guided.
    """
    if not 0.0 <= float(rescale) <= 1.0:
        raise ValueError(f"sampling.guidance_rescale must be in [0, 1], got {rescale}")
    if isinstance(scale, (int, float, np.number)):
        if not np.isfinite(scale) or scale < 0:
            raise ValueError(f"sampling.guidance must be a finite number >= 0, got {scale}")
        if float(scale) == 1.0:
            return lambda x, t: model_fn_cond(x, t, cond)

    # Reference order: [uncond, cond] along the batch axis.
    c_in = jax.tree_util.tree_map(
        lambda u, c: jnp.concatenate([jnp.broadcast_to(u, c.shape).astype(c.dtype), c], axis=0), uncond, cond
    )

    def guided(x: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
        if shared_x:
            out = model_fn_cond(x, t, c_in)
        else:
            out = model_fn_cond(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), c_in)
        out_u, out_c = jnp.split(out, 2, axis=0)
        guided = out_u + scale * (out_c - out_u)
        if rescale:
            axes = tuple(range(1, out.ndim))
            std_c = jnp.std(out_c, axis=axes, keepdims=True, ddof=1)
            std_g = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
            guided = rescale * guided * (std_c / std_g) + (1.0 - rescale) * guided
        return guided

    return guided


SAMPLERS: dict[str, Callable[..., jnp.ndarray]] = {
    "ddpm": ddpm_sample, "ddim": ddim_sample, "plms": plms_sample,
    **{name: functools.partial(solver_sample, solver=name) for name in SOLVERS},
}


def get_sampler(name: str) -> Callable[..., jnp.ndarray]:
    """Sampler function by name: ddpm, ddim, plms or one of solvers.SOLVERS."""
    if name not in SAMPLERS:
        raise ValueError(f"sampling.sampler must be one of {', '.join(SAMPLERS)}; got {name!r}")
    return SAMPLERS[name]
