"""Post-paper samplers: DPM-Solver++ (2M, and its SDE variant), Euler and Euler ancestral (k-diffusion, in
sigma space), UniPC (bh2, order 1 to 3), with diffusers' timestep spacings and Karras sigmas.

Every one of them, written in the variance-preserving x (what the network sees), is a linear multistep method in
the data prediction D_i = x0(x_i, t_i): an optional corrector x_i <- a x_i + b x_{i-1} + sum_k c_k D_{i-k} (UniPC),
then x_{i+1} = p x_i + sum_k q_k D_{i-k} + r noise_i. `plan()` computes those coefficients once in float64 numpy,
following diffusers' schedulers term by term; `solver_sample` runs them as one `lax.scan`. Euler's sigma-space
state x_k is the VP state divided by alpha = 1 / sqrt(1 + sigma^2), so its steps are the same kind of combination.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.gaussian import ModelFn, check_parameterization
from ldm_jax.diffusion.schedules import DiffusionSchedule

SOLVERS = ("dpmpp_2m", "dpmpp_2m_sde", "euler", "euler_a", "unipc")
SPACINGS = ("linspace", "leading", "trailing")
KARRAS = ("dpmpp_2m", "dpmpp_2m_sde", "euler", "unipc")  # solvers that take Karras sigmas (as diffusers')
_MIN_ABAR = 2.0**-24  # diffusers' stand-in for a zero-terminal-SNR schedule's abar_T = 0


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per model evaluation i (n of them): timestep fed to the network, (alpha, sigma) of its VP x, and the
    corrector / predictor coefficients over [x_i, x_{i-1}] and [D_i, D_{i-1}, ..., D_{i-K}]."""

    t: np.ndarray  # (n,) float
    alpha: np.ndarray  # (n,)
    sigma: np.ndarray  # (n,)
    x_scale: float  # x_0 = x_scale * standard noise
    corr_x: np.ndarray  # (n,)
    corr_last: np.ndarray  # (n,)
    corr_d: np.ndarray  # (n, K + 1)
    pred_x: np.ndarray  # (n,)
    pred_d: np.ndarray  # (n, K + 1)
    pred_noise: np.ndarray  # (n,)
    integer_t: bool  # the network gets int32 timesteps (rounded ones), else float32


def solver_timesteps(num_timesteps: int, steps: int, spacing: str) -> np.ndarray:
    """Descending timesteps as diffusers' DPM-Solver/UniPC schedulers space them (Euler uses its own linspace)."""
    T, S = int(num_timesteps), int(steps)
    if not 1 <= S <= T:
        raise ValueError(f"sampling.steps must be in [1, {T}], got {steps}")
    if spacing == "linspace":
        return np.linspace(0, T - 1, S + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, S + 1) * (T // (S + 1))).round()[::-1][:-1].astype(np.int64)
    if spacing == "trailing":
        return np.arange(T, 0, -T / S).round().astype(np.int64) - 1
    raise ValueError(f"sampling.spacing must be one of {', '.join(SPACINGS)} for this solver; got {spacing!r}")


def karras_sigmas(sigmas: np.ndarray, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) sigmas between the schedule's largest and smallest, descending."""
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigmas.min() ** (1 / rho), sigmas.max() ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep whose log sigma interpolates to log(sigma) (k-diffusion / diffusers)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _sigmas(abar: np.ndarray, steps: int, spacing: str, karras: bool, euler: bool) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) for the n steps, then sigma = 0 appended (diffusers' final_sigmas_type 'zero')."""
    full = np.sqrt((1 - abar) / abar)
    T = len(abar)
    if euler and spacing == "linspace":  # EulerDiscreteScheduler: fractional timesteps
        ts = np.linspace(0, T - 1, steps, dtype=np.float32)[::-1].astype(np.float64)
    elif euler and spacing == "leading":
        ts = (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.float64)
    else:
        ts = solver_timesteps(T, steps, spacing).astype(np.float64)
    if karras:
        sig = karras_sigmas(full, steps)
        ts = sigma_to_t(sig, np.log(full))
        if not euler:
            ts = ts.round()
    else:
        sig = np.interp(ts, np.arange(T), full)
    # diffusers keeps sigmas in float32: follow it, so the coefficients agree to rounding.
    return ts, np.concatenate([sig, [0.0]]).astype(np.float32).astype(np.float64)


def _alpha_sigma(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    alpha = 1.0 / np.sqrt(s**2 + 1.0)
    return alpha, s * alpha


def check_solver_options(solver: str, spacing: str = "", karras: bool = False, order: int = 2,
                         prefix: str = "sampling.") -> None:
    """One-line ValueError for an unknown solver or an option it lacks (spacing '' = its default)."""
    if solver not in SOLVERS:
        raise ValueError(f"{prefix}sampler must be one of ddpm, ddim, plms, {', '.join(SOLVERS)}; got {solver!r}")
    if spacing and spacing not in SPACINGS:
        raise ValueError(f"{prefix}spacing must be one of {', '.join(SPACINGS)} for {solver}; got {spacing!r}")
    if karras and solver not in KARRAS:
        raise ValueError(f"{prefix}karras: the {solver} sampler has no Karras sigmas (only {', '.join(KARRAS)})")
    if order != 2 and solver != "unipc" or order not in (1, 2, 3):
        raise ValueError(f"{prefix}order must be 2 for {solver} (1, 2 or 3 for unipc), got {order}")


def plan(solver: str, sched: DiffusionSchedule, steps: int, spacing: str = "linspace", karras: bool = False,
         order: int = 2) -> Plan:
    """Coefficients of `solver` for `steps` model evaluations (see the module doc)."""
    check_solver_options(solver, spacing, karras, order)
    abar = np.asarray(sched.alphas_cumprod, np.float64)
    abar = np.where(abar > 0, abar, _MIN_ABAR)  # zero terminal SNR: diffusers sets abar_T = 2**-24
    euler = solver.startswith("euler")
    ts, sig = _sigmas(abar, steps, spacing, karras, euler)
    n = len(ts)
    alpha, sigma = _alpha_sigma(sig)  # (n + 1,), the last at sigma = 0
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # +inf at the final sigma = 0
    K = 3 if solver == "unipc" else 1
    c_x, c_last, c_d = np.ones(n), np.zeros(n), np.zeros((n, K + 1))
    p_x, p_d, p_noise = np.zeros(n), np.zeros((n, K + 1)), np.zeros(n)
    x_scale = 1.0
    if euler:
        # Start: x_k = noise * init_noise_sigma (sigma_max, or sqrt(sigma_max^2 + 1) for 'leading').
        init = sig.max() if spacing in ("linspace", "trailing") else np.sqrt(sig.max() ** 2 + 1)
        x_scale = float(init * alpha[0])
        for i in range(n):
            s, s_next = sig[i], sig[i + 1]
            if solver == "euler_a":
                up = np.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
                down = np.sqrt(s_next**2 - up**2)
            else:
                up, down = 0.0, s_next
            # x_k' = x_k + (x_k - D) (down - s) / s + up * noise, x_k = x / alpha.
            p_x[i] = alpha[i + 1] / alpha[i] * down / s
            p_d[i, 0] = alpha[i + 1] * (1 - down / s)
            p_noise[i] = alpha[i + 1] * up
    elif solver.startswith("dpmpp"):
        sde = solver.endswith("sde")
        for i in range(n):
            h = lam[i + 1] - lam[i]
            first = i == 0 or i == n - 1  # lower_order_nums < 1, or the final step (final sigma zero)
            if sde:
                e = np.exp(-h)
                p_x[i] = sigma[i + 1] / sigma[i] * e
                c = alpha[i + 1] * (1 - np.exp(-2 * h))
                p_noise[i] = sigma[i + 1] * np.sqrt(1 - np.exp(-2 * h))
            else:
                p_x[i] = sigma[i + 1] / sigma[i]
                c = -alpha[i + 1] * (np.exp(-h) - 1)
            if first:
                p_d[i, 0] = c
            else:  # D0 = m0, D1 = (m0 - m1) / r0, x += c D0 + 0.5 c D1
                r0 = (lam[i] - lam[i - 1]) / h
                p_d[i, 0] = c + 0.5 * c / r0
                p_d[i, 1] = -0.5 * c / r0
    else:
        orders = [min(order, n - i, i + 1) for i in range(n)]  # lower_order_final, warm-up
        for i in range(n):
            if i > 0:  # corrector of x_i with the new D_i, with the previous step's order
                c_x[i] = 0.0
                c_last[i], coef = _unipc_update(lam, alpha, sigma, i - 1, orders[i - 1], corrector=True)
                c_d[i, : len(coef)] = coef
            p_x[i], coef = _unipc_update(lam, alpha, sigma, i, orders[i], corrector=False)
            p_d[i, : len(coef)] = coef
    return Plan(t=ts, alpha=alpha[:n], sigma=sigma[:n], x_scale=x_scale, corr_x=c_x, corr_last=c_last, corr_d=c_d,
                pred_x=p_x, pred_d=p_d, pred_noise=p_noise, integer_t=not euler)


def _unipc_update(lam, alpha, sigma, s0: int, order: int, corrector: bool) -> tuple[float, np.ndarray]:
    """UniPC-bh2 (predict_x0) from step s0 to s0 + 1: the coefficient of x_{s0} and those of
    [D_{s0+1}, D_{s0}, D_{s0-1}, ...] (corrector) or [D_{s0}, D_{s0-1}, ...] (predictor), as diffusers'
    multistep_uni_c_bh_update / multistep_uni_p_bh_update."""
    h = lam[s0 + 1] - lam[s0]
    rks = [(lam[s0 - k] - lam[s0]) / h for k in range(1, order)] + [1.0]
    hh = -h
    h_phi_1 = np.expm1(hh)
    b_h = np.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    fact, R, b = 1, [], []
    for i in range(1, order + 1):
        R.append(np.power(rks, i - 1))
        b.append(h_phi_k * fact / b_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    R, b = np.array(R), np.array(b)
    a_t = alpha[s0 + 1]
    x_coef = sigma[s0 + 1] / sigma[s0]
    off = 1 if corrector else 0  # the corrector's list starts with the new D_{s0+1}
    coef = np.zeros(order + off)
    coef[off] = -a_t * h_phi_1  # m0 = D_{s0}
    if corrector:
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(R, b)
        # - a_t B_h (sum_k rho_k (m_k - m0) / r_k + rho_last (D_new - m0))
        coef[0] += -a_t * b_h * rhos[-1]
        coef[off] += a_t * b_h * rhos[-1]
    else:
        if order == 1:
            return x_coef, coef
        rhos = np.array([0.5]) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
    for k in range(1, order):
        w = -a_t * b_h * rhos[k - 1] / rks[k - 1]
        coef[off + k] += w
        coef[off] -= w
    return x_coef, coef


def solver_sample(model_fn: ModelFn, sched: DiffusionSchedule, shape: tuple[int, ...], key: jax.Array,
                  solver: str = "dpmpp_2m", steps: int = 20, spacing: str = "linspace", karras: bool = False,
                  order: int = 2, parameterization: str = "eps", x_T: jnp.ndarray | None = None,
                  noises: jnp.ndarray | None = None, trajectory: bool = False) -> jnp.ndarray:
    """Samples with one of SOLVERS. x_T: the standard starting noise (scaled as the solver starts); noises:
    (n, *shape) per-step standard noises of the stochastic solvers (drawn from `key` if not given);
    trajectory: return every step's (VP) x, (n, *shape), instead of the last."""
    check_parameterization(parameterization)
    p = plan(solver, sched, steps, spacing, karras, order)
    n = len(p.t)
    x_key, n_key = jax.random.split(key)
    x = jax.random.normal(x_key, shape, jnp.float32) if x_T is None else jnp.asarray(x_T, jnp.float32)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"sampling x_T shape {tuple(x.shape)} != sample shape {tuple(shape)}")
    stochastic = bool(np.any(p.pred_noise))
    if stochastic and noises is None:
        noises = jax.random.normal(n_key, (n, *shape), jnp.float32)
    if noises is None:
        noises = jnp.zeros((n, 1), jnp.float32)  # unused
    elif tuple(noises.shape) != (n, *shape):
        raise ValueError(f"sampling noises shape {tuple(noises.shape)} != {(n, *shape)}")
    f32 = lambda a: jnp.asarray(np.asarray(a, np.float32))  # noqa: E731
    t_dtype = jnp.int32 if p.integer_t else jnp.float32
    xs = (f32(p.t).astype(t_dtype), f32(p.alpha), f32(p.sigma), f32(p.corr_x), f32(p.corr_last), f32(p.corr_d),
          f32(p.pred_x), f32(p.pred_d), f32(p.pred_noise), noises)
    K = p.pred_d.shape[1] - 1

    def to_x0(x, out, a, s):
        if parameterization == "eps":
            return (x - s * out) / a
        if parameterization == "v":
            return a * x - s * out
        return out

    def combine(coefs, d_new, hist):
        out = coefs[0] * d_new
        for k in range(K):
            out = out + coefs[k + 1] * hist[k]
        return out

    def body(carry, inp):
        x, last, hist = carry
        t, a, s, cx, cl, cd, px, pd, pn, noise = inp
        d = to_x0(x, model_fn(x, jnp.full((shape[0],), t, t_dtype)).astype(jnp.float32), a, s)
        x = cx * x + cl * last + combine(cd, d, hist)
        x_next = px * x + combine(pd, d, hist)
        if stochastic:
            x_next = x_next + pn * noise
        return (x_next, x, jnp.concatenate([d[None], hist[:-1]])), x_next if trajectory else None

    init = (x * p.x_scale, jnp.zeros_like(x), jnp.zeros((K, *shape), jnp.float32))
    (x, _, _), xs_out = jax.lax.scan(body, init, xs)
    return xs_out if trajectory else x
