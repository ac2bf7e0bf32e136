"""Issue #19: DPM-Solver++ (2M, SDE), Euler, Euler ancestral and UniPC follow diffusers' PyTorch schedulers step by
step: a fixed smooth stand-in network (the same formula in torch and jax), the same starting noise and the same
per-step noises, whole trajectories compared at 10 and 25 steps."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_euler_ancestral_discrete as ea_module

from ldm_jax.diffusion import DiffusionSchedule
from ldm_jax.diffusion.samplers import classifier_free_guidance
from ldm_jax.diffusion.solvers import solver_sample

SHAPE = (2, 4, 4, 3)
GUIDANCE = 3.0


def net(x, t, cond, xp):
    """Stand-in network: smooth in x and t; `cond` shifts it (0 = unconditional)."""
    tt = t.reshape(-1, 1, 1, 1) if xp is jnp else t.reshape(-1, 1, 1, 1).to(x.dtype)
    return 0.7 * xp.tanh(0.9 * x + 0.3 * xp.sin(tt / 150.0) + cond) + 0.2 * x


def diffusers_scheduler(solver, schedule, pred, karras, spacing):
    kw = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, prediction_type=pred,
              beta_schedule="scaled_linear" if schedule == "linear" else "squaredcos_cap_v2",
              timestep_spacing=spacing)
    if solver.startswith("dpmpp"):
        algo = "sde-dpmsolver++" if solver.endswith("sde") else "dpmsolver++"
        return diffusers.DPMSolverMultistepScheduler(algorithm_type=algo, solver_order=2, use_karras_sigmas=karras,
                                                     **kw)
    if solver == "euler":
        return diffusers.EulerDiscreteScheduler(use_karras_sigmas=karras, **kw)
    if solver == "euler_a":
        return diffusers.EulerAncestralDiscreteScheduler(**kw)
    return diffusers.UniPCMultistepScheduler(solver_order=2, solver_type="bh2", use_karras_sigmas=karras, **kw)


def run_diffusers(sch, steps, z, noises, guidance, monkeypatch):
    sch.set_timesteps(steps)
    x = torch.from_numpy(z) * sch.init_noise_sigma
    it = iter(torch.from_numpy(n) for n in noises)
    monkeypatch.setattr(ea_module, "randn_tensor", lambda *a, **k: next(it))
    traj = []
    for t in sch.timesteps:
        xin = sch.scale_model_input(x, t)
        tb = t.reshape(1).expand(x.shape[0])
        out = net(xin, tb, 0.5, torch)
        if guidance != 1.0:
            out_u = net(xin, tb, 0.0, torch)
            out = out_u + guidance * (out - out_u)
        kw = {"variance_noise": next(it)} if isinstance(sch, diffusers.DPMSolverMultistepScheduler) and \
            sch.config.algorithm_type.startswith("sde") else {}
        x = sch.step(out, t, x, **kw).prev_sample
        traj.append(x.numpy().copy())
    return np.stack(traj)


def ours(solver, sched, steps, z, noises, pred, karras, spacing, guidance):
    def model_cond(x, t, c):
        return net(x, t.astype(jnp.float32), c[:, None, None, None], jnp)

    cond, uncond = jnp.full((SHAPE[0],), 0.5), jnp.zeros((SHAPE[0],))
    model_fn = classifier_free_guidance(model_cond, cond, uncond, guidance)
    return solver_sample(model_fn, sched, SHAPE, jax.random.key(0), solver=solver, steps=steps, spacing=spacing,
                         karras=karras, parameterization=pred, x_T=jnp.asarray(z),
                         noises=None if noises is None else jnp.asarray(noises), trajectory=True)


CASES = [
    # solver, schedule, pred, karras, spacing
    ("dpmpp_2m", "linear", "epsilon", False, "linspace"),
    ("dpmpp_2m", "linear", "v_prediction", False, "trailing"),
    ("dpmpp_2m", "linear", "epsilon", True, "linspace"),
    ("dpmpp_2m", "cosine", "epsilon", False, "leading"),
    ("dpmpp_2m_sde", "linear", "epsilon", False, "linspace"),
    ("dpmpp_2m_sde", "cosine", "v_prediction", False, "linspace"),
    ("euler", "linear", "epsilon", False, "linspace"),
    ("euler", "linear", "v_prediction", True, "linspace"),
    ("euler", "cosine", "epsilon", False, "trailing"),
    ("euler_a", "linear", "epsilon", False, "linspace"),
    ("euler_a", "cosine", "v_prediction", False, "leading"),
    ("unipc", "linear", "epsilon", False, "linspace"),
    ("unipc", "linear", "v_prediction", True, "linspace"),
    ("unipc", "cosine", "epsilon", False, "trailing"),
]


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("solver, schedule, pred, karras, spacing", CASES)
def test_solver_matches_diffusers(solver, schedule, pred, karras, spacing, steps, monkeypatch):
    guidance = GUIDANCE if steps == 10 else 1.0
    sch = diffusers_scheduler(solver, schedule, pred, karras, spacing)
    # Both sides on diffusers' float32 alphas_cumprod, so the comparison isolates the solver.
    ours_sched = DiffusionSchedule.create(schedule, 1000, 0.00085, 0.012)
    ours_sched = ours_sched.replace(alphas_cumprod=jnp.asarray(sch.alphas_cumprod.numpy()))
    rng = np.random.default_rng(steps)
    z = rng.standard_normal(SHAPE).astype(np.float32)
    noises = rng.standard_normal((steps, *SHAPE)).astype(np.float32)
    ref = run_diffusers(sch, steps, z, noises, guidance, monkeypatch)
    got = np.asarray(ours(solver, ours_sched, steps, z, noises if solver in ("dpmpp_2m_sde", "euler_a") else None,
                          "v" if pred == "v_prediction" else "eps", karras, spacing, guidance))
    if solver.startswith("euler"):  # diffusers' Euler state is x / alpha (sigma space)
        sig = np.asarray(sch.sigmas.numpy(), np.float64)[1:]
        got = got * np.sqrt(1 + sig**2).reshape(-1, 1, 1, 1, 1)
    assert got.shape == ref.shape
    rel = np.abs(got - ref).max(axis=(1, 2, 3, 4)) / np.abs(ref).max(axis=(1, 2, 3, 4))
    assert rel.max() <= 1e-5, f"{solver}: step {rel.argmax()} differs by {rel.max():.2e} relative"
    assert np.isfinite(got).all()


# --- spacings, guidance rescale and the training objectives ---

@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [10, 25, 50])
def test_ddim_spacings_match_diffusers(spacing, steps):
    from ldm_jax.diffusion.samplers import ddim_timesteps

    sch = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=0)
    sch.set_timesteps(steps)
    np.testing.assert_array_equal(ddim_timesteps(1000, steps, spacing), np.sort(sch.timesteps.numpy()))


def test_guidance_rescale_matches_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    rng = np.random.default_rng(0)
    out_u, out_c = rng.standard_normal((2, *SHAPE)).astype(np.float32)
    model = lambda x, t, c: jnp.concatenate([jnp.asarray(out_u), jnp.asarray(out_c)])  # noqa: E731
    ones = jnp.ones((SHAPE[0],))
    got = classifier_free_guidance(model, ones, 0 * ones, 7.5, shared_x=True, rescale=0.7)(jnp.zeros(SHAPE), ones)
    guided = out_u + 7.5 * (out_c - out_u)
    ref = rescale_noise_cfg(torch.from_numpy(guided).permute(0, 3, 1, 2), torch.from_numpy(out_c).permute(0, 3, 1, 2),
                            guidance_rescale=0.7).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)
    assert np.abs(ref - guided).max() > 0.1  # the rescale does something


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_zero_terminal_snr_and_snr_match_diffusers(schedule):
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr
    from diffusers.training_utils import compute_snr

    from ldm_jax.diffusion.schedules import make_beta_schedule

    betas = make_beta_schedule(schedule, 1000, 0.00085, 0.012)
    ours = DiffusionSchedule.create(schedule, 1000, 0.00085, 0.012, zero_terminal_snr=True)
    ref_betas = rescale_zero_terminal_snr(torch.from_numpy(betas)).numpy()
    np.testing.assert_allclose(np.asarray(ours.betas), ref_betas, rtol=1e-6)
    assert float(ours.alphas_cumprod[-1]) == 0.0 and float(ours.alphas_cumprod[0]) == pytest.approx(1 - betas[0])
    plain = DiffusionSchedule.create(schedule, 1000, 0.00085, 0.012)
    sch = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear" if schedule == "linear" else "squaredcos_cap_v2")
    t = np.array([0, 1, 10, 250, 500, 900, 999])
    # 1e-4: near t = 0, SNR = abar / (1 - abar) magnifies the float32 rounding of abar (both sides float32).
    np.testing.assert_allclose(np.asarray(plain.snr(jnp.asarray(t))), compute_snr(sch, torch.from_numpy(t)).numpy(),
                               rtol=1e-4)


@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
def test_min_snr_loss_weights(parameterization):
    from ldm_jax.diffusion.gaussian import diffusion_loss, min_snr_weight

    sched = DiffusionSchedule.create("linear", 1000, 0.00085, 0.012)
    t = jnp.arange(0, 1000, 37)
    snr = np.asarray(sched.alphas_cumprod, np.float64)[np.asarray(t)]
    snr = snr / (1 - snr)
    closed = {"eps": np.minimum(snr, 5) / snr, "v": np.minimum(snr, 5) / (snr + 1), "x0": np.minimum(snr, 5)}
    np.testing.assert_allclose(np.asarray(min_snr_weight(sched, t, 5.0, parameterization)), closed[parameterization],
                               rtol=1e-5)
    x0 = jax.random.normal(jax.random.key(1), (64, 4, 4, 3))
    model = lambda x, t: 0.5 * x  # noqa: E731
    key = jax.random.key(2)
    plain, aux = diffusion_loss(sched, model, x0, key, parameterization)
    weighted, aux_w = diffusion_loss(sched, model, x0, key, parameterization, snr_gamma=5.0)
    w = min_snr_weight(sched, aux["t"], 5.0, parameterization)
    np.testing.assert_allclose(float(weighted), float(jnp.mean(aux["loss_per_example"] * w)), rtol=1e-6)
    assert float(weighted) != pytest.approx(float(plain))
    # Off by default: exactly the paper's loss.
    same, _ = diffusion_loss(sched, model, x0, key, parameterization, snr_gamma=0.0, offset_noise=0.0)
    assert float(same) == float(plain)


def test_offset_noise_shifts_each_channel():
    from ldm_jax.diffusion.gaussian import diffusion_loss

    sched = DiffusionSchedule.create("linear", 1000, 0.00085, 0.012)
    x0 = jnp.zeros((64, 8, 8, 3))
    seen = {}

    def model(x, t):
        seen["x"] = x
        return jnp.zeros_like(x)

    diffusion_loss(sched, model, x0, jax.random.key(0), "eps", offset_noise=1.0)
    noise = np.asarray(seen["x"]) / np.asarray(sched.sqrt_one_minus_alphas_cumprod)[np.asarray(
        diffusion_loss(sched, model, x0, jax.random.key(0), "eps", offset_noise=1.0)[1]["t"])].reshape(-1, 1, 1, 1)
    per_channel_mean = noise.mean(axis=(1, 2))  # (B, C): ~ N(0, 1) offsets, not ~ N(0, 1/64)
    assert 0.6 < per_channel_mean.std() < 1.4


def test_sampling_options_keep_the_configs_sampler_options_to_that_sampler():
    from ldm_jax.config_defaults import ldm_config
    from ldm_jax.inference import sampling_options

    cfg = ldm_config()
    cfg.sampling.update(sampler="ddim", steps=50, eta=1.0, guidance=3.0, spacing="quad")
    assert sampling_options(cfg)["eta"] == 1.0 and sampling_options(cfg)["spacing"] == "quad"
    other = sampling_options(cfg, sampler="dpmpp_2m", steps=20)
    assert other == dict(sampler="dpmpp_2m", steps=20, eta=0.0, guidance=3.0, spacing="", karras=False, order=2,
                         guidance_rescale=0.0)
    assert sampling_options(cfg, sampler="ddim")["eta"] == 1.0  # naming the config's own sampler keeps them
    assert sampling_options(cfg, sampler="euler_a", eta=0.5)["eta"] == 0.5  # given values always win
