"""Noise schedules (beta_t) and the derived per-timestep constants of a DDPM forward process."""

from __future__ import annotations

import flax
import jax.numpy as jnp
import numpy as np

SCHEDULE_KINDS = ("linear", "sqrt_linear", "sqrt", "cosine")


def make_beta_schedule(
    kind: str,
    num_timesteps: int = 1000,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> np.ndarray:
    """Betas (float64, shape (T,)) of the reference schedules; "linear" is linear in sqrt(beta)."""
    if int(num_timesteps) < 1:
        raise ValueError(f"diffusion.num_timesteps must be >= 1, got {num_timesteps}")
    n = int(num_timesteps)
    if kind == "linear":
        betas = np.linspace(linear_start**0.5, linear_end**0.5, n, dtype=np.float64) ** 2
    elif kind == "sqrt_linear":
        betas = np.linspace(linear_start, linear_end, n, dtype=np.float64)
    elif kind == "sqrt":
        betas = np.linspace(linear_start, linear_end, n, dtype=np.float64) ** 0.5
    elif kind == "cosine":
        # Nichol & Dhariwal (2021): abar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), normalised by abar(0).
        steps = np.arange(n + 1, dtype=np.float64) / n + cosine_s
        abar = np.cos(steps / (1 + cosine_s) * np.pi / 2) ** 2
        abar = abar / abar[0]
        betas = np.clip(1.0 - abar[1:] / abar[:-1], 0.0, 0.999)
    else:
        raise ValueError(f"diffusion.schedule must be one of {', '.join(SCHEDULE_KINDS)}; got {kind!r}")
    if not (np.all(betas > 0) and np.all(betas < 1)):
        raise ValueError(f"diffusion.schedule {kind!r} gives betas outside (0, 1); check linear_start/end")
    return betas


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. (2024), Algorithm 1: shift and scale sqrt(abar) so that sqrt(abar_T) = 0 (zero terminal SNR) while
    sqrt(abar_1) is unchanged, then recover the betas (diffusers' rescale_zero_terminal_snr)."""
    sqrt_abar = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


@flax.struct.dataclass
class DiffusionSchedule:
    """Per-timestep constants of q(x_t | x_0) and q(x_{t-1} | x_t, x_0), float32, shape (T,)."""

    betas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    alphas_cumprod_prev: jnp.ndarray
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    posterior_variance: jnp.ndarray
    posterior_log_variance_clipped: jnp.ndarray
    posterior_mean_coef1: jnp.ndarray
    posterior_mean_coef2: jnp.ndarray
    num_timesteps: int = flax.struct.field(pytree_node=False)

    @classmethod
    def from_betas(cls, betas: np.ndarray) -> DiffusionSchedule:
        """Derive all constants in float64 numpy, then store them as float32 jnp arrays."""
        betas = np.asarray(betas, dtype=np.float64)
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        consts = dict(
            betas=betas,
            alphas_cumprod=abar,
            alphas_cumprod_prev=abar_prev,
            sqrt_alphas_cumprod=np.sqrt(abar),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
            posterior_variance=post_var,
            # posterior_variance[0] == 0: clip before the log, as the reference does.
            posterior_log_variance_clipped=np.log(np.maximum(post_var, 1e-20)),
            posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
            posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
        )
        # Cast on the host: a device-side float64 -> float32 convert would cost an XLA compile per constant.
        return cls(**{k: jnp.asarray(v.astype(np.float32)) for k, v in consts.items()},
                   num_timesteps=int(betas.shape[0]))

    @classmethod
    def create(
        cls,
        kind: str = "linear",
        num_timesteps: int = 1000,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        zero_terminal_snr: bool = False,
    ) -> DiffusionSchedule:
        """Build a schedule from `make_beta_schedule` arguments (optionally rescaled to zero terminal SNR)."""
        betas = make_beta_schedule(kind, num_timesteps, linear_start, linear_end, cosine_s)
        return cls.from_betas(rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas)

    def snr(self, t: jnp.ndarray) -> jnp.ndarray:
        """Signal-to-noise ratio abar_t / (1 - abar_t) at timesteps t (diffusers' compute_snr)."""
        abar = jnp.take(self.alphas_cumprod, t, axis=0)
        return abar / (1.0 - abar)


def extract(a: jnp.ndarray, t: jnp.ndarray, x_shape: tuple[int, ...]) -> jnp.ndarray:
    """Gather a[t] for a batch of timesteps t (B,) and reshape to broadcast against x of shape (B, ...)."""
    out = jnp.take(a, t, axis=0)
    return out.reshape(out.shape[:1] + (1,) * (len(x_shape) - 1))
