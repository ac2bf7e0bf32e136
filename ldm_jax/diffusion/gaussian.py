"""Gaussian diffusion maths: forward noising, eps/x0/v conversions, the posterior, and the training loss."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ldm_jax.diffusion.schedules import DiffusionSchedule, extract

PARAMETERIZATIONS = ("eps", "x0", "v")
LOSS_TYPES = ("l2", "l1")

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def check_parameterization(parameterization: str) -> None:
    """Raise a one-line ValueError unless `parameterization` is eps, x0 or v."""
    if parameterization not in PARAMETERIZATIONS:
        choices = ", ".join(PARAMETERIZATIONS)
        raise ValueError(f"diffusion.parameterization must be one of {choices}; got {parameterization!r}")


def _sa(sched: DiffusionSchedule, t: jnp.ndarray, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(sqrt(abar_t), sqrt(1 - abar_t)) broadcastable against x."""
    return (extract(sched.sqrt_alphas_cumprod, t, x.shape),
            extract(sched.sqrt_one_minus_alphas_cumprod, t, x.shape))


def q_sample(sched: DiffusionSchedule, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
    """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I) with the given standard noise."""
    sa, so = _sa(sched, t, x0)
    return sa * x0 + so * noise


def predict_x0_from_eps(sched: DiffusionSchedule, x_t: jnp.ndarray, t: jnp.ndarray,
                        eps: jnp.ndarray) -> jnp.ndarray:
    """x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
    sa, so = _sa(sched, t, x_t)
    return (x_t - so * eps) / sa


def predict_eps_from_x0(sched: DiffusionSchedule, x_t: jnp.ndarray, t: jnp.ndarray,
                        x0: jnp.ndarray) -> jnp.ndarray:
    """eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
    sa, so = _sa(sched, t, x_t)
    return (x_t - sa * x0) / so


def v_from_x0_eps(sched: DiffusionSchedule, x0: jnp.ndarray, eps: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)."""
    sa, so = _sa(sched, t, x0)
    return sa * eps - so * x0


def x0_from_v(sched: DiffusionSchedule, x_t: jnp.ndarray, t: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
    """x0 = sqrt(abar) x_t - sqrt(1 - abar) v."""
    sa, so = _sa(sched, t, x_t)
    return sa * x_t - so * v


def eps_from_v(sched: DiffusionSchedule, x_t: jnp.ndarray, t: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
    """eps = sqrt(abar) v + sqrt(1 - abar) x_t."""
    sa, so = _sa(sched, t, x_t)
    return sa * v + so * x_t


def to_x0_eps(sched: DiffusionSchedule, x_t: jnp.ndarray, t: jnp.ndarray, model_out: jnp.ndarray,
              parameterization: str) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Convert a network output of the given parameterization to (x0_pred, eps_pred)."""
    check_parameterization(parameterization)
    if parameterization == "eps":
        return predict_x0_from_eps(sched, x_t, t, model_out), model_out
    if parameterization == "x0":
        return model_out, predict_eps_from_x0(sched, x_t, t, model_out)
    return x0_from_v(sched, x_t, t, model_out), eps_from_v(sched, x_t, t, model_out)


def target_for(parameterization: str, x0: jnp.ndarray, eps: jnp.ndarray, sched: DiffusionSchedule,
               t: jnp.ndarray) -> jnp.ndarray:
    """Regression target of the network for the given parameterization."""
    check_parameterization(parameterization)
    if parameterization == "eps":
        return eps
    if parameterization == "x0":
        return x0
    return v_from_x0_eps(sched, x0, eps, t)


def q_posterior(sched: DiffusionSchedule, x0: jnp.ndarray, x_t: jnp.ndarray,
                t: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
    mean = extract(sched.posterior_mean_coef1, t, x_t.shape) * x0 + \
        extract(sched.posterior_mean_coef2, t, x_t.shape) * x_t
    var = extract(sched.posterior_variance, t, x_t.shape)
    logvar = extract(sched.posterior_log_variance_clipped, t, x_t.shape)
    return mean, var, logvar


def min_snr_weight(sched: DiffusionSchedule, t: jnp.ndarray, gamma: float, parameterization: str) -> jnp.ndarray:
    """min-SNR-gamma loss weights (Hang et al. 2023) per example: on the eps-MSE min(SNR, g) / SNR, on the v-MSE
    min(SNR, g) / (SNR + 1), on the x0-MSE min(SNR, g). At SNR = 0 (zero terminal SNR) the eps weight is 1."""
    snr = sched.snr(t)
    clipped = jnp.minimum(snr, gamma)
    if parameterization == "eps":
        return jnp.where(snr > 0, clipped / jnp.where(snr > 0, snr, 1.0), 1.0)
    if parameterization == "v":
        return clipped / (snr + 1.0)
    return clipped


def diffusion_loss(sched: DiffusionSchedule, model_fn: ModelFn, x0: jnp.ndarray, key: jax.Array,
                   parameterization: str = "eps", loss_type: str = "l2", snr_gamma: float = 0.0,
                   offset_noise: float = 0.0) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Simple DDPM loss: mean over all elements of |model(x_t, t) - target|^p with t ~ U{0..T-1}.

    Randomness: `t_key, noise_key = jax.random.split(key)`; t = randint(t_key, (B,), 0, T),
    noise = normal(noise_key, x0.shape). aux = {"t": t, "loss_per_example": (B,)}.
    snr_gamma > 0: per-example min-SNR-gamma weights; offset_noise c > 0: noise += c * N(0, 1) per example and
    channel, broadcast over H x W (drawn from a third key split off noise_key). Both 0 is the paper's loss.
    """
    check_parameterization(parameterization)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"diffusion.loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
    t_key, noise_key = jax.random.split(key)
    t = jax.random.randint(t_key, (x0.shape[0],), 0, sched.num_timesteps, dtype=jnp.int32)
    if offset_noise:
        noise_key, offset_key = jax.random.split(noise_key)
    noise = jax.random.normal(noise_key, x0.shape, dtype=x0.dtype)
    if offset_noise:
        shape = (x0.shape[0],) + (1,) * (x0.ndim - 2) + (x0.shape[-1],)
        noise = noise + offset_noise * jax.random.normal(offset_key, shape, dtype=x0.dtype)
    x_t = q_sample(sched, x0, t, noise)
    out = model_fn(x_t, t)
    target = target_for(parameterization, x0, noise, sched, t)
    diff = out.astype(jnp.float32) - target.astype(jnp.float32)
    err = jnp.abs(diff) if loss_type == "l1" else jnp.square(diff)
    per_example = err.reshape(err.shape[0], -1).mean(axis=1)
    if snr_gamma:
        per_example = per_example * min_snr_weight(sched, t, snr_gamma, parameterization)
    # Equal-size examples: mean of per-example means == mean over all elements (the reference's loss_simple).
    loss = per_example.mean()
    return loss, {"t": t, "loss_per_example": per_example}
