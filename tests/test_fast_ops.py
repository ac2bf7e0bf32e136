"""attention_impl="matmul": FastDense / matmul_attention are pure reformulations (same outputs and gradients)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.fast_ops import FastDense, dense_cls, matmul_attention
from ldm_jax.models.unet import UNetModel

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _np_attention(q, k, v, scale):
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    logits = np.einsum("blhd,bmhd->bhlm", q, k) * scale
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhlm,bmhd->blhd", p, v)


def test_fast_dense_same_params_and_bitwise_forward():
    x = jax.random.normal(jax.random.key(0), (3, 7, 12))
    pd = nn.Dense(20).init(jax.random.key(1), x)
    pf = FastDense(20).init(jax.random.key(1), x)
    assert jax.tree.structure(pd) == jax.tree.structure(pf)
    for a, b in zip(jax.tree.leaves(pd), jax.tree.leaves(pf), strict=True):
        np.testing.assert_array_equal(a, b)
    pf = jax.tree.map(lambda a: a + 0.1, pf)  # non-zero bias
    np.testing.assert_array_equal(nn.Dense(20).apply(pf, x), FastDense(20).apply(pf, x))
    np.testing.assert_allclose(FastDense(20).apply(pf, x),
                               np.asarray(x) @ np.asarray(pf["params"]["kernel"]) + np.asarray(pf["params"]["bias"]),
                               rtol=1e-5, atol=1e-5)
    assert dense_cls("matmul") is FastDense and dense_cls(None) is nn.Dense


@pytest.mark.parametrize("use_bias", [True, False])
def test_fast_dense_gradients_match_autodiff(use_bias):
    x = jax.random.normal(jax.random.key(2), (2, 5, 6))
    p = nn.Dense(4, use_bias=use_bias).init(jax.random.key(3), x)
    loss = lambda mod: (lambda p, x: jnp.sum(jnp.sin(mod.apply(p, x))))  # noqa: E731
    g_ref = jax.grad(loss(nn.Dense(4, use_bias=use_bias)), argnums=(0, 1))(p, x)
    g_new = jax.grad(loss(FastDense(4, use_bias=use_bias)), argnums=(0, 1))(p, x)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_new), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_matmul_attention_forward_and_gradients():
    ks = jax.random.split(jax.random.key(4), 3)
    q = jax.random.normal(ks[0], (2, 7, 3, 4))
    k = jax.random.normal(ks[1], (2, 5, 3, 4))  # cross-attention: L != M
    v = jax.random.normal(ks[2], (2, 5, 3, 4))
    np.testing.assert_allclose(matmul_attention(q, k, v, 0.5), _np_attention(q, k, v, 0.5), rtol=1e-5, atol=1e-6)
    ref = lambda q, k, v: jnp.sum(jnp.sin(jax.nn.dot_product_attention(q, k, v, scale=0.5)))  # noqa: E731
    new = lambda q, k, v: jnp.sum(jnp.sin(matmul_attention(q, k, v, 0.5)))  # noqa: E731
    for a, b in zip(jax.grad(ref, (0, 1, 2))(q, k, v), jax.grad(new, (0, 1, 2))(q, k, v), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_unet_matmul_impl_same_outputs_and_gradients():
    kw = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
              attention_resolutions=(2,), num_head_channels=16, use_spatial_transformer=True, context_dim=24)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    t = jnp.array([3, 700])
    c = jax.random.normal(jax.random.key(1), (2, 5, 24))
    m0, m1 = UNetModel(**kw), UNetModel(**kw, attention_impl="matmul")
    init = lambda m: jax.jit(m.init).lower(jax.random.key(0), x, t, c).compile(FAST_COMPILE)  # noqa: E731
    p, p1 = init(m0)(jax.random.key(0), x, t, c), init(m1)(jax.random.key(0), x, t, c)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p1), strict=True):
        np.testing.assert_array_equal(a, b)  # same parameter tree and init: checkpoints are interchangeable
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    p = jax.tree.unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)])
    # One jitted compilation per model, output as aux (op-by-op eager dispatch of a UNet is slow on a busy CPU).
    def vg(m):
        def loss(p):
            out = m.apply(p, x, t, c)
            return jnp.sum(jnp.sin(out)), out

        # Unoptimised XLA code compiles several times faster; the comparison does not need speed.
        return jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(p).compile(FAST_COMPILE)

    ((_, out0), g0), ((_, out1), g1) = vg(m0)(p), vg(m1)(p)
    np.testing.assert_allclose(out1, out0, rtol=1e-5, atol=1e-5)
    scale = max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g0))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * scale)


def test_unet_rejects_unknown_attention_impl():
    m = UNetModel(4, 4, 32, channel_mult=(1,), attention_resolutions=(1,), num_heads=1, attention_impl="fast")
    with pytest.raises(ValueError, match="attention_impl"):
        m.init(jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32))


def test_upsample_conv_equals_conv_of_nearest_upsampling():
    from ldm_jax.models.fast_ops import upsample_conv, upsample_conv_general_dilated

    x = jax.random.normal(jax.random.key(7), (2, 3, 5, 6))  # H != W: catches swapped phases
    w = jax.random.normal(jax.random.key(8), (3, 3, 6, 4))

    def ref(x, w):
        up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return jax.lax.conv_general_dilated(up, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

    # float64 NumPy reference of the upsampled conv
    up = np.repeat(np.repeat(np.asarray(x, np.float64), 2, 1), 2, 2)
    pad = np.pad(up, ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = sum(np.einsum("nhwi,io->nhwo", pad[:, a:a + 6, b:b + 10], np.asarray(w, np.float64)[a, b])
               for a in range(3) for b in range(3))
    np.testing.assert_allclose(upsample_conv(x, w), want, rtol=1e-5, atol=1e-5)
    r = jax.random.normal(jax.random.key(9), want.shape)
    g_ref = jax.grad(lambda x, w: jnp.sum(ref(x, w) * r), (0, 1))(x, w)
    g_new = jax.grad(lambda x, w: jnp.sum(upsample_conv(x, w) * r), (0, 1))(x, w)
    for a, b in zip(g_new, g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    # The UNet / autoencoder Upsample modules keep nn.Conv's parameters (checkpoints and converters unchanged).
    from ldm_jax.models.autoencoder import Upsample as AEUpsample
    from ldm_jax.models.unet import Upsample

    for mod in (Upsample(6, True), AEUpsample()):
        p = mod.init(jax.random.key(0), x)
        assert jax.tree.map(jnp.shape, p) == {"params": {"conv": {"kernel": (3, 3, 6, 6), "bias": (6,)}}}
        p = {"params": {"conv": {"kernel": w[..., :4].repeat(2, -1)[..., :6], "bias": jnp.arange(6.0)}}}
        np.testing.assert_allclose(mod.apply(p, x), ref(x, p["params"]["conv"]["kernel"]) + jnp.arange(6.0),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="3x3 stride-1"):
        nn.Conv(4, (5, 5), conv_general_dilated=upsample_conv_general_dilated).init(jax.random.key(0), x)


def test_pointwise_conv_equals_1x1_conv_with_the_same_params():
    from ldm_jax.models.fast_ops import pointwise_conv_general_dilated

    x = jax.random.normal(jax.random.key(10), (2, 3, 5, 6))
    fast = nn.Conv(4, (1, 1), conv_general_dilated=pointwise_conv_general_dilated)
    ref = nn.Conv(4, (1, 1))
    p = ref.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, fast.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, p)
    p = {"params": {"kernel": jax.random.normal(jax.random.key(11), (1, 1, 6, 4)), "bias": jnp.arange(4.0)}}
    w = np.asarray(p["params"]["kernel"], np.float64)[0, 0]
    want = np.einsum("nhwi,io->nhwo", np.asarray(x, np.float64), w) + np.arange(4.0)  # float64 reference
    np.testing.assert_allclose(fast.apply(p, x), want, rtol=1e-5, atol=1e-5)
    r = jax.random.normal(jax.random.key(12), want.shape)
    grad = lambda m: jax.grad(lambda p, x: jnp.sum(m.apply(p, x) * r), (0, 1))(p, x)  # noqa: E731
    for a, b in zip(jax.tree.leaves(grad(fast)), jax.tree.leaves(grad(ref)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="1x1 stride-1"):
        nn.Conv(4, (3, 3), conv_general_dilated=pointwise_conv_general_dilated).init(jax.random.key(0), x)
    # Arguments the matmul form cannot honour are refused, not ignored.
    k = jnp.ones((1, 1, 6, 4))
    with pytest.raises(ValueError, match="padding"):
        pointwise_conv_general_dilated(x, k, (1, 1), ((1, 1), (0, 0)))
    nchw = jax.lax.conv_dimension_numbers((2, 6, 3, 5), (4, 6, 1, 1), ("NCHW", "OIHW", "NCHW"))
    with pytest.raises(ValueError, match="dimension_numbers"):
        pointwise_conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=nchw)
