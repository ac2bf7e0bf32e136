"""Samplers with the analytic optimal denoiser of Gaussian data, checked against numpy and the data law."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import (
    DiffusionSchedule,
    classifier_free_guidance,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    get_sampler,
    make_beta_schedule,
    plms_sample,
)

T, MU, S = 1000, 0.5, 1.0  # data x0 ~ N(MU, S^2), dimension 1
N = 4000


def oracle(sched, param="eps", mu=MU, s=S):
    """Exact E[eps | x_t], E[x0 | x_t] or E[v | x_t] for Gaussian data."""

    def fn(x, t):
        a = sched.alphas_cumprod[t].reshape((-1,) + (1,) * (x.ndim - 1))
        eps = (x - jnp.sqrt(a) * mu) * jnp.sqrt(1 - a) / (a * s**2 + 1 - a)
        x0 = mu + jnp.sqrt(a) * s**2 * (x - jnp.sqrt(a) * mu) / (a * s**2 + 1 - a)
        return {"eps": eps, "x0": x0, "v": jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0}[param]

    return fn


@pytest.fixture(scope="module")
def sched():
    return DiffusionSchedule.create("linear", T, 0.0015, 0.0195)


@pytest.fixture(scope="module")
def abar64():
    return np.cumprod(1.0 - make_beta_schedule("linear", T, 0.0015, 0.0195))


@pytest.fixture(scope="module")
def ddim_eps(sched):
    return jax.jit(lambda key, x_T: ddim_sample(oracle(sched), sched, (N, 1), key, steps=50, x_T=x_T))


@pytest.fixture(scope="module")
def x_T():
    return jax.random.normal(jax.random.PRNGKey(42), (N, 1))


def _eps_np(x, a):
    return (x - np.sqrt(a) * MU) * np.sqrt(1 - a) / (a * S**2 + 1 - a)


def test_ddim_timesteps():
    np.testing.assert_array_equal(ddim_timesteps(1000, 50), np.arange(0, 1000, 20) + 1)
    quad = (np.linspace(0, np.sqrt(800), 50) ** 2).astype(int) + 1
    np.testing.assert_array_equal(ddim_timesteps(1000, 50, "quad"), np.unique(quad))
    np.testing.assert_array_equal(ddim_timesteps(1000, 3), [1, 334, 667, 999])  # the reference would hit 1000
    np.testing.assert_array_equal(ddim_timesteps(10, 10), np.arange(1, 10))
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="sampling.steps"):
            ddim_timesteps(1000, bad)
    with pytest.raises(ValueError, match="sampling.spacing"):
        ddim_timesteps(1000, 50, "log")


def test_ddim_matches_numpy_reference(sched, abar64, ddim_eps, x_T):
    ts = np.arange(0, T, 20) + 1
    a, a_prev = abar64[ts], np.concatenate([[abar64[0]], abar64[ts[:-1]]])
    x = np.asarray(x_T, np.float64)
    for i in range(len(ts) - 1, -1, -1):
        e = _eps_np(x, a[i])
        x0 = (x - np.sqrt(1 - a[i]) * e) / np.sqrt(a[i])
        x = np.sqrt(a_prev[i]) * x0 + np.sqrt(1 - a_prev[i]) * e
    np.testing.assert_allclose(ddim_eps(jax.random.PRNGKey(0), x_T), x, atol=2e-4, rtol=1e-4)


def test_ddim_deterministic_and_distribution(sched, ddim_eps, x_T):
    key = jax.random.PRNGKey(0)
    a, b = ddim_eps(key, x_T), ddim_eps(key, x_T)
    np.testing.assert_array_equal(a, b)
    c = ddim_eps(key, x_T + 0.5)
    assert np.abs(np.asarray(c - a)).min() > 1e-3
    # x_T from the key: same key -> same samples, another key -> other samples
    # the schedule may be a traced jit argument (num_timesteps is static)
    f = jax.jit(lambda sc, k: ddim_sample(oracle(sc), sc, (N, 1), k, steps=50))
    x = f(sched, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(x, f(sched, jax.random.PRNGKey(1)))
    assert not np.allclose(x, f(sched, jax.random.PRNGKey(2)))
    assert abs(float(x.mean()) - MU) < 0.05 and abs(float(x.std()) / S - 1) < 0.05


def test_ddim_parameterizations_agree(sched, ddim_eps, x_T):
    ref = ddim_eps(jax.random.PRNGKey(0), x_T)
    for p in ("x0", "v"):
        out = jax.jit(lambda x, p=p: ddim_sample(oracle(sched, p), sched, (N, 1), jax.random.PRNGKey(0),
                                                 steps=50, x_T=x, parameterization=p))(x_T)
        np.testing.assert_allclose(out, ref, atol=2e-3)


def test_ddim_eta1_distribution(sched):
    f = jax.jit(lambda k: ddim_sample(oracle(sched), sched, (N, 1), k, steps=500, eta=1.0))
    x = f(jax.random.PRNGKey(3))
    assert abs(float(x.mean()) - MU) < 0.05 and abs(float(x.std()) / S - 1) < 0.05


def test_plms_matches_numpy_reference_and_distribution(sched, abar64, x_T):
    steps = 20
    ts = np.arange(0, T, T // steps) + 1
    a, a_prev = abar64[ts], np.concatenate([[abar64[0]], abar64[ts[:-1]]])
    time_range = ts[::-1]

    def step(x, e, i):
        x0 = (x - np.sqrt(1 - a[i]) * e) / np.sqrt(a[i])
        return np.sqrt(a_prev[i]) * x0 + np.sqrt(1 - a_prev[i]) * e

    x, old = np.asarray(x_T, np.float64), []
    for i, t in enumerate(time_range):  # transcription of the reference p_sample_plms
        index = len(ts) - i - 1
        e = _eps_np(x, abar64[t])
        if not old:
            t_next = time_range[min(i + 1, len(ts) - 1)]
            e_p = (e + _eps_np(step(x, e, index), abar64[t_next])) / 2
        elif len(old) == 1:
            e_p = (3 * e - old[-1]) / 2
        elif len(old) == 2:
            e_p = (23 * e - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_p = (55 * e - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        x = step(x, e_p, index)
        old = (old + [e])[-3:]
    f = jax.jit(lambda k, xt: plms_sample(oracle(sched), sched, (N, 1), k, steps=steps, x_T=xt))
    out = f(jax.random.PRNGKey(0), x_T)
    np.testing.assert_allclose(out, x, atol=2e-4, rtol=1e-4)
    assert abs(float(out.mean()) - MU) < 0.05 and abs(float(out.std()) / S - 1) < 0.05
    with pytest.raises(ValueError, match="sampling.eta"):
        plms_sample(oracle(sched), sched, (2, 1), jax.random.PRNGKey(0), eta=0.5)


def test_ddpm_distribution_and_no_final_noise():
    s = DiffusionSchedule.create("sqrt_linear", 200, 1e-3, 0.1)  # shorter chain, still abar_T ~ 1e-3
    x = jax.jit(lambda k: ddpm_sample(oracle(s), s, (N, 1), k))(jax.random.PRNGKey(4))
    assert abs(float(x.mean()) - MU) < 0.05 and abs(float(x.std()) / S - 1) < 0.05
    # x0-model predicting a constant: the t=0 posterior mean is exactly x0 and no noise is added there
    c = jax.jit(lambda k: ddpm_sample(lambda x, t: jnp.full_like(x, 0.25), s, (64, 2, 2, 1), k,
                                      parameterization="x0"))(jax.random.PRNGKey(5))
    np.testing.assert_allclose(c, 0.25, atol=1e-6)
    # clip_denoised bounds the x0 prediction: constant 3 is clipped to 1
    c = ddpm_sample(lambda x, t: jnp.full_like(x, 3.0), s, (4, 1), jax.random.PRNGKey(5),
                    parameterization="x0", clip_denoised=True)
    np.testing.assert_allclose(c, 1.0, atol=1e-6)


def test_masked_ddim_keeps_known_region(sched):
    shape = (8, 4, 4, 1)
    known = jax.random.normal(jax.random.PRNGKey(6), shape) * S + MU
    f = jax.jit(lambda m, paste: ddim_sample(oracle(sched), sched, shape, jax.random.PRNGKey(7), steps=20,
                                             keep_mask=m, x0_known=known, paste_known=paste), static_argnums=1)
    ones = jnp.ones(shape)
    np.testing.assert_array_equal(f(ones, True), known)
    # reference semantics (no final paste): the last step starts from q_sample(known, t=1), so it stays close
    # (error ~ sqrt(1 - abar_1) ~ 0.055 per unit of eps misprediction), far closer than a free sample
    rms = float(jnp.sqrt(jnp.mean((f(ones, False) - known) ** 2)))
    assert 0 < rms < 0.1
    half = jnp.zeros(shape).at[:, :, :2].set(1.0)
    out = f(half, True)
    np.testing.assert_array_equal(out[:, :, :2], known[:, :, :2])
    assert np.abs(np.asarray(out[:, :, 2:] - known[:, :, 2:])).mean() > 0.1  # generated, not copied
    with pytest.raises(ValueError, match="x0_known"):
        ddim_sample(oracle(sched), sched, shape, jax.random.PRNGKey(0), keep_mask=ones)


def test_classifier_free_guidance():
    calls = []

    def model(x, t, c):
        calls.append((x.shape, t.shape, c["emb"].shape))
        return x * c["emb"][:, None] + c["bias"][:, None] + 0.01 * t[:, None]

    b = 3
    x = jnp.arange(b * 2, dtype=jnp.float32).reshape(b, 2)
    t = jnp.array([1, 5, 9], jnp.int32)
    cond = {"emb": jnp.array([1.0, 2.0, -1.0]), "bias": jnp.array([0.5, 0.0, 1.0])}
    uncond = {"emb": jnp.zeros(b), "bias": jnp.full((b,), -0.5)}
    xn, tn = np.asarray(x), np.asarray(t, np.float64)[:, None]
    out_c = xn * np.array([1.0, 2.0, -1.0])[:, None] + np.array([0.5, 0.0, 1.0])[:, None] + 0.01 * tn
    out_u = -0.5 + 0.01 * tn + 0 * xn

    np.testing.assert_allclose(classifier_free_guidance(model, cond, uncond, 1.0)(x, t), out_c, rtol=1e-6)
    assert calls == [((b, 2), (b,), (b,))]
    calls.clear()
    g = classifier_free_guidance(model, cond, uncond, 3.5)(x, t)
    np.testing.assert_allclose(g, out_u + 3.5 * (out_c - out_u), rtol=1e-5, atol=1e-6)
    assert calls == [((2 * b, 2), (2 * b,), (2 * b,))]  # one call on a batch of 2B
    np.testing.assert_allclose(classifier_free_guidance(model, cond, uncond, 0.0)(x, t), out_u, atol=1e-6)
    with pytest.raises(ValueError, match="sampling.guidance"):
        classifier_free_guidance(model, cond, uncond, -1.0)
    calls.clear()

    def shared_model(x, t, c):  # accepts x/t of batch B with 2B conditions, as UNetModel does
        return model(jnp.concatenate([x, x]), jnp.concatenate([t, t]), c)

    g_shared = classifier_free_guidance(shared_model, cond, uncond, 3.5, shared_x=True)(x, t)
    np.testing.assert_allclose(g_shared, g, rtol=1e-6)
    assert calls == [((2 * b, 2), (2 * b,), (2 * b,))]


def test_get_sampler():
    assert get_sampler("ddim") is ddim_sample and get_sampler("plms") is plms_sample
    assert get_sampler("ddpm") is ddpm_sample
    with pytest.raises(ValueError, match="sampling.sampler") as e:
        get_sampler("heun")
    names = ("ddpm", "ddim", "plms", "dpmpp_2m", "euler_a", "unipc")
    assert "\n" not in str(e.value) and all(n in str(e.value) for n in names)
    with pytest.raises(ValueError, match="diffusion.parameterization"):
        ddim_sample(lambda x, t: x, DiffusionSchedule.create("linear", 10), (1, 1), jax.random.PRNGKey(0),
                    steps=5, parameterization="score")
