"""models/norms.GroupNorm and attention.gelu: the same functions as flax's GroupNorm and jax.nn.gelu, with
hand-written gradients checked against autodiff of an independent (float64 NumPy / flax) computation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.attention import gelu
from ldm_jax.models.norms import GroupNorm, LayerNorm, group_norm


def _np_group_norm(x, scale, bias, groups, eps):
    x = np.asarray(x, np.float64)
    n, c = x.shape[0], x.shape[-1]
    xg = x.reshape(n, -1, groups, c // groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = xg.var(axis=(1, 3), keepdims=True)
    return ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape) * np.asarray(scale) + np.asarray(bias)


@pytest.mark.parametrize("shape,groups", [((2, 4, 4, 96), 32), ((3, 5, 64), 8), ((1, 2, 3, 32), 32)])
def test_group_norm_matches_numpy_and_flax(shape, groups):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(1.5, 3.0, size=shape), jnp.float32)  # offset mean: catches one-pass variance
    mod = GroupNorm(num_groups=groups, epsilon=1e-6)
    p = mod.init(jax.random.key(0), x)
    ref_mod = nn.GroupNorm(num_groups=groups, epsilon=1e-6)
    assert jax.tree.structure(p) == jax.tree.structure(ref_mod.init(jax.random.key(0), x))  # same checkpoint
    p = {"params": {"scale": jnp.asarray(rng.normal(size=shape[-1]), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=shape[-1]), jnp.float32)}}
    want = _np_group_norm(x, p["params"]["scale"], p["params"]["bias"], groups, 1e-6)
    np.testing.assert_allclose(mod.apply(p, x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ref_mod.apply(p, x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_gradients_match_autodiff(silu):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(0.5, 2.0, size=(2, 6, 6, 64)), jnp.float32)
    r = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    scale = jnp.asarray(rng.normal(size=64), jnp.float32)
    bias = jnp.asarray(rng.normal(size=64), jnp.float32)

    def autodiff_gn(x, scale, bias):  # plain jnp: JAX differentiates it
        xg = x.reshape(2, -1, 32, 2)
        mean = xg.mean(axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + 1e-5)).reshape(x.shape) * scale + bias
        return y * jax.nn.sigmoid(y) if silu else y

    def loss(f):
        return lambda x, s, b: jnp.sum(jnp.sin(f(x, s, b)) * r)

    want = jax.grad(loss(autodiff_gn), (0, 1, 2))(x, scale, bias)
    got = jax.grad(loss(lambda x, s, b: group_norm(x, s, b, 32, 1e-5, silu)), (0, 1, 2))(x, scale, bias)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.abs(w).max()))


def test_group_norm_with_silu_matches_numpy_and_saturates():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(-1.0, 4.0, size=(2, 3, 5, 64)), jnp.float32)
    scale = jnp.asarray(rng.normal(0, 30.0, size=64), jnp.float32)  # large: normalised values reach +-100
    bias = jnp.asarray(rng.normal(size=64), jnp.float32)
    p = {"params": {"scale": scale, "bias": bias}}
    y = _np_group_norm(x, scale, bias, 32, 1e-6)
    want = y / (1 + np.exp(-y))  # silu in float64
    got = GroupNorm(32, epsilon=1e-6, silu=True).apply(p, x)
    assert np.all(np.isfinite(got)) and float(np.abs(y).max()) > 80
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    grads = jax.grad(lambda x: jnp.sum(group_norm(x, scale, bias, 32, 1e-6, True)))(x)
    assert np.all(np.isfinite(grads))


def test_group_norm_dtype_and_errors():
    x = jnp.ones((2, 4, 4, 64), jnp.bfloat16) * jnp.arange(64, dtype=jnp.bfloat16)
    mod = GroupNorm(32)
    p = mod.init(jax.random.key(0), x)
    assert p["params"]["scale"].dtype == jnp.float32  # float32 params whatever the compute dtype
    assert mod.apply(p, x).dtype == jnp.bfloat16
    assert GroupNorm(32, dtype=jnp.float32).apply(p, x).dtype == jnp.float32
    with pytest.raises(ValueError, match="48 channels are not divisible into 32 groups"):
        mod.init(jax.random.key(0), jnp.ones((1, 2, 2, 48)))


def test_gelu_is_the_exact_erf_gelu():
    x = jnp.linspace(-8.0, 8.0, 1001, dtype=jnp.float32)
    np.testing.assert_allclose(gelu(x), jax.nn.gelu(x, approximate=False), rtol=1e-6, atol=1e-6)
    # Against float64 math (x Phi(x)) and its derivative Phi(x) + x phi(x).
    from math import erf, pi, sqrt

    xs = np.asarray(x, np.float64)
    phi_cdf = np.array([0.5 * (1 + erf(v / sqrt(2))) for v in xs])
    np.testing.assert_allclose(gelu(x), xs * phi_cdf, rtol=1e-5, atol=1e-6)
    dgelu = jax.vmap(jax.grad(gelu))(x)
    np.testing.assert_allclose(dgelu, phi_cdf + xs * np.exp(-0.5 * xs**2) / sqrt(2 * pi), rtol=1e-5, atol=1e-5)


def test_group_norm_of_channel_parts_with_shared_rows():
    """A list of channel parts (rows 2B and B, the latter tiled) normalises like the concatenated input, with the
    same params; parts that cut through a group are refused."""
    rng = np.random.default_rng(2)
    a = jnp.asarray(rng.normal(1.0, 2.0, size=(4, 3, 3, 40)), jnp.float32)  # groups of 3 at 96 channels / 32
    b = jnp.asarray(rng.normal(-1.0, 0.5, size=(2, 3, 3, 56)), jnp.float32)
    mod = GroupNorm(num_groups=32, epsilon=1e-6)
    whole = jnp.concatenate([a, jnp.concatenate([b, b])], axis=-1)
    p = {"params": {"scale": jnp.asarray(rng.normal(size=96), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=96), jnp.float32)}}
    with pytest.raises(ValueError, match=r"parts \[40, 56\] do not split at the groups of 3"):
        mod.apply(p, [a, b])
    a2, b2 = jnp.concatenate([a, jnp.concatenate([b, b])[..., :2]], axis=-1), b[..., 2:]  # 42 + 54 channels
    assert jax.tree.structure(mod.init(jax.random.key(0), [a2, b2])) == jax.tree.structure(p)
    ya, yb = mod.apply(p, [a2, b2])
    assert ya.shape == (4, 3, 3, 42) and yb.shape == (2, 3, 3, 54)
    want = _np_group_norm(whole, p["params"]["scale"], p["params"]["bias"], 32, 1e-6)
    np.testing.assert_allclose(ya, want[..., :42], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jnp.concatenate([yb, yb]), want[..., 42:], rtol=1e-5, atol=1e-5)


def test_layer_norm_matches_numpy_and_flax_with_autodiff_gradients():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(2.0, 3.0, size=(2, 7, 48)), jnp.float32)  # nonzero mean per row
    r = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    mod, ref = LayerNorm(epsilon=1e-5), nn.LayerNorm(epsilon=1e-5)
    p = mod.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, p) == jax.tree.map(jnp.shape, ref.init(jax.random.key(0), x))
    p = {"params": {"scale": jnp.asarray(rng.normal(size=48), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=48), jnp.float32)}}
    x64 = np.asarray(x, np.float64)
    xhat = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    want = xhat * np.asarray(p["params"]["scale"]) + np.asarray(p["params"]["bias"])
    np.testing.assert_allclose(mod.apply(p, x), want, rtol=1e-5, atol=1e-5)
    loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)) * r)  # noqa: E731
    got, exp = jax.grad(loss(mod), (0, 1))(p, x), jax.grad(loss(ref), (0, 1))(p, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(exp), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.abs(w).max()))
    assert LayerNorm(dtype=jnp.bfloat16).apply(p, x).dtype == jnp.bfloat16
