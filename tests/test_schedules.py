"""Noise schedules, forward process, parameterization conversions and the training loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import (
    DiffusionSchedule,
    diffusion_loss,
    eps_from_v,
    make_beta_schedule,
    predict_eps_from_x0,
    predict_x0_from_eps,
    q_posterior,
    q_sample,
    target_for,
    to_x0_eps,
    v_from_x0_eps,
    x0_from_v,
)

T = 1000


@pytest.fixture(scope="module")
def sched():
    return DiffusionSchedule.create("linear", T, 0.0015, 0.0195)


@pytest.fixture(scope="module")
def abar64():
    return np.cumprod(1.0 - make_beta_schedule("linear", T, 0.0015, 0.0195))


def test_linear_is_linear_in_sqrt_beta():
    b = make_beta_schedule("linear", T, 0.0015, 0.0195)
    assert b.dtype == np.float64 and b.shape == (T,)
    assert b[0] == pytest.approx(0.0015, rel=1e-12) and b[-1] == pytest.approx(0.0195, rel=1e-12)
    i = np.arange(T)
    expect = (np.sqrt(0.0015) + i * (np.sqrt(0.0195) - np.sqrt(0.0015)) / (T - 1)) ** 2
    np.testing.assert_allclose(b, expect, rtol=1e-12)
    assert not np.allclose(b, np.linspace(0.0015, 0.0195, T))  # not the plain linear one


def test_sqrt_linear_and_sqrt():
    lin = 0.01 + 0.001 * np.arange(11)
    np.testing.assert_allclose(make_beta_schedule("sqrt_linear", 11, 0.01, 0.02), lin)
    np.testing.assert_allclose(make_beta_schedule("sqrt", 11, 0.01, 0.02), np.sqrt(lin))


def test_cosine_matches_formula():
    n, s = 1000, 8e-3
    b = make_beta_schedule("cosine", n, cosine_s=s)
    f = lambda t: np.cos((t / n + s) / (1 + s) * np.pi / 2) ** 2
    expect = [min(1 - f(t + 1) / f(t), 0.999) for t in range(n)]
    np.testing.assert_allclose(b, expect, rtol=1e-10)
    assert b[-1] == 0.999  # the last beta hits the clip
    np.testing.assert_allclose(np.cumprod(1 - b)[:-1], [f(t + 1) / f(0) for t in range(n - 1)], rtol=1e-9)


def test_schedule_constants(sched, abar64):
    b = make_beta_schedule("linear", T, 0.0015, 0.0195)
    assert sched.num_timesteps == T and sched.betas.dtype == jnp.float32
    ac = np.asarray(sched.alphas_cumprod)
    assert np.all(np.diff(ac) < 0) and 0 < ac[-1] < ac[0] < 1
    np.testing.assert_allclose(ac, abar64, rtol=1e-5)
    np.testing.assert_allclose(sched.alphas_cumprod_prev[1:], abar64[:-1], rtol=1e-5)
    assert float(sched.alphas_cumprod_prev[0]) == 1.0
    np.testing.assert_allclose(sched.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - abar64), rtol=1e-5)
    # posterior variance, written as a per-step loop
    pv = np.array([b[t] * (1 - (abar64[t - 1] if t else 1.0)) / (1 - abar64[t]) for t in range(T)])
    np.testing.assert_allclose(sched.posterior_variance, pv, rtol=1e-5, atol=1e-12)
    assert float(sched.posterior_variance[0]) == 0.0
    np.testing.assert_allclose(sched.posterior_log_variance_clipped[1:], np.log(pv[1:]), rtol=1e-5)
    assert float(sched.posterior_log_variance_clipped[0]) == pytest.approx(np.log(1e-20), rel=1e-6)
    # static field: a pytree of 9 arrays, usable as a jit argument
    assert len(jax.tree_util.tree_leaves(sched)) == 9
    assert jax.jit(lambda s: s.betas.sum())(sched) == pytest.approx(b.sum(), rel=1e-5)


def test_q_posterior_is_bayes_posterior(sched, abar64):
    """Posterior of x_{t-1} from conjugate Gaussian conditioning, independently of the coefficients."""
    b = make_beta_schedule("linear", T, 0.0015, 0.0195)
    t = np.array([1, 5, 200, 999])
    x0 = np.array([0.3, -0.7, 1.1, 0.2])
    xt = np.array([0.5, 0.1, -1.3, 2.0])
    prec = 1 / (1 - abar64[t - 1]) + (1 - b[t]) / b[t]
    mean = (np.sqrt(abar64[t - 1]) * x0 / (1 - abar64[t - 1]) + np.sqrt(1 - b[t]) * xt / b[t]) / prec
    m, v, lv = q_posterior(sched, jnp.asarray(x0[:, None]), jnp.asarray(xt[:, None]), jnp.asarray(t))
    np.testing.assert_allclose(m[:, 0], mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(v[:, 0], 1 / prec, rtol=1e-4)
    np.testing.assert_allclose(lv[:, 0], np.log(1 / prec), rtol=1e-4)
    m0, v0, _ = q_posterior(sched, jnp.array([[0.3]]), jnp.array([[0.9]]), jnp.array([0]))
    assert float(m0[0, 0]) == pytest.approx(0.3, abs=1e-6) and float(v0[0, 0]) == 0.0


def test_schedule_errors():
    with pytest.raises(ValueError, match="diffusion.schedule") as e:
        make_beta_schedule("quadratic")
    assert "\n" not in str(e.value) and "cosine" in str(e.value)
    with pytest.raises(ValueError, match="diffusion.schedule"):
        DiffusionSchedule.create("nope")
    with pytest.raises(ValueError, match="diffusion.num_timesteps"):
        make_beta_schedule("linear", 0)
    with pytest.raises(ValueError, match="diffusion.schedule"):
        make_beta_schedule("sqrt_linear", 10, 0.0, 0.02)  # beta_0 = 0 would make posterior 0/0


def test_q_sample_moments(sched, abar64):
    n = 200_000
    x0 = jnp.array([0.8, -0.4, 0.0])
    t = jnp.array([0, 300, 999])
    noise = jax.random.normal(jax.random.PRNGKey(0), (n, 3))
    xb = jnp.broadcast_to(x0, (n, 3))
    xt = jax.vmap(lambda x, e: q_sample(sched, x[:, None], t, e[:, None])[:, 0])(xb, noise)
    a = abar64[np.asarray(t)]
    se = np.sqrt((1 - a) / n)  # standard error of the sample mean
    assert np.all(np.abs(np.asarray(xt.mean(0)) - np.sqrt(a) * np.asarray(x0)) < 4 * se + 1e-6)
    np.testing.assert_allclose(xt.var(0), 1 - a, rtol=0.015)


def test_conversions_round_trip(sched):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
    x0 = jax.random.normal(k1, (16, 4, 4, 2))
    eps = jax.random.normal(k2, x0.shape)
    t = jax.random.randint(k3, (16,), 0, T)
    xt = q_sample(sched, x0, t, eps)
    v = v_from_x0_eps(sched, x0, eps, t)
    tol = dict(atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(x0_from_v(sched, xt, t, v), x0, **tol)
    np.testing.assert_allclose(eps_from_v(sched, xt, t, v), eps, **tol)
    # x0 from eps multiplies float32 rounding by 1/sqrt(abar) (up to ~80)
    np.testing.assert_allclose(predict_x0_from_eps(sched, xt, t, eps), x0, atol=1e-4, rtol=1e-5)
    big = t >= 50  # eps from x0 divides by sqrt(1 - abar), ~0.04 at t = 0
    np.testing.assert_allclose(predict_eps_from_x0(sched, xt, t, x0)[big], eps[big], **tol)
    for p in ("eps", "x0", "v"):
        out = target_for(p, x0, eps, sched, t)
        got_x0, got_eps = to_x0_eps(sched, xt, t, out, p)
        np.testing.assert_allclose(got_x0, x0, atol=1e-4, rtol=1e-5)
        np.testing.assert_allclose(got_eps[big], eps[big], atol=1e-4, rtol=1e-5)
    # v is a rotation of (x0, eps): |v|^2 + |x_t|^2 = |x0|^2 + |eps|^2 per element
    np.testing.assert_allclose(v**2 + xt**2, x0**2 + eps**2, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_loss_is_zero_for_oracle(sched, param):
    x0 = jax.random.normal(jax.random.PRNGKey(2), (8, 4, 4, 3))

    def oracle(x_t, t):  # closure trick: x0 is known, so the true eps follows from x_t
        eps = predict_eps_from_x0(sched, x_t, t, x0)
        return {"eps": eps, "x0": x0, "v": v_from_x0_eps(sched, x0, eps, t)}[param]

    loss, aux = diffusion_loss(sched, oracle, x0, jax.random.PRNGKey(3), parameterization=param)
    assert float(loss) < 1e-8
    bad, _ = diffusion_loss(sched, lambda x, t: jnp.zeros_like(x), x0, jax.random.PRNGKey(3), param)
    assert float(bad) > 0.1
    assert aux["t"].shape == (8,) and aux["t"].dtype == jnp.int32


@pytest.mark.parametrize("loss_type", ["l1", "l2"])
def test_loss_numbers_vs_numpy(sched, abar64, loss_type):
    x0 = jax.random.normal(jax.random.PRNGKey(4), (6, 3, 3, 2))
    key = jax.random.PRNGKey(5)
    loss, aux = jax.jit(lambda x, k: diffusion_loss(sched, lambda xt, t: 0.5 * xt + 0.1, x, k,
                                                    loss_type=loss_type))(x0, key)
    t_key, n_key = jax.random.split(key)  # documented randomness
    t = np.asarray(jax.random.randint(t_key, (6,), 0, T))
    noise = np.asarray(jax.random.normal(n_key, x0.shape), dtype=np.float64)
    np.testing.assert_array_equal(aux["t"], t)
    a = abar64[t][:, None, None, None]
    xt = np.sqrt(a) * np.asarray(x0, np.float64) + np.sqrt(1 - a) * noise
    d = 0.5 * xt + 0.1 - noise
    err = np.abs(d) if loss_type == "l1" else d**2
    assert float(loss) == pytest.approx(err.mean(), rel=1e-5)
    np.testing.assert_allclose(aux["loss_per_example"], err.reshape(6, -1).mean(1), rtol=1e-5)


def test_loss_timesteps_uniform_and_errors():
    s = DiffusionSchedule.create("linear", 10)
    x0 = jnp.zeros((2000, 1))
    _, aux = diffusion_loss(s, lambda x, t: x, x0, jax.random.PRNGKey(6))
    counts = np.bincount(np.asarray(aux["t"]), minlength=10)
    assert counts.shape == (10,) and counts.min() > 150  # all of 0..9, none >= T, ~200 each
    with pytest.raises(ValueError, match="diffusion.loss_type"):
        diffusion_loss(s, lambda x, t: x, x0, jax.random.PRNGKey(0), loss_type="huber")
    with pytest.raises(ValueError, match="diffusion.parameterization"):
        diffusion_loss(s, lambda x, t: x, x0, jax.random.PRNGKey(0), parameterization="score")
