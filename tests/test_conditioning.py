"""Conditioning encoders: ClassEmbedder (null class) and SpatialRescaler (torch-bilinear semantics)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.conditioning import ClassEmbedder, SpatialRescaler

KEY = jax.random.key(0, impl="rbg")


def test_class_embedder_null_class():
    emb = ClassEmbedder(n_classes=11, embed_dim=8)
    params = emb.init(KEY, jnp.array([0]))
    assert emb.null_class == 10
    table = np.asarray(params["params"]["embedding"]["embedding"])
    assert table.shape == (11, 8)
    out = np.asarray(emb.apply(params, jnp.array([3, emb.null_class])))
    assert out.shape == (2, 1, 8)
    np.testing.assert_array_equal(out[:, 0], table[[3, 10]])
    assert not np.allclose(out[0], out[1])


def _torch_bilinear(x, scale):
    """numpy version of torch interpolate(mode='bilinear', align_corners=False, scale_factor=scale), NHWC."""

    def axis_weights(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) / scale - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        lam = src - i0
        m = np.zeros((n_out, n_in))
        m[np.arange(n_out), i0] += 1 - lam
        m[np.arange(n_out), i1] += lam
        return m

    my, mx = (
        axis_weights(x.shape[1], int(x.shape[1] * scale)),
        axis_weights(x.shape[2], int(x.shape[2] * scale)),
    )
    return np.einsum("yh,bhwc,xw->byxc", my, x, mx)


def test_spatial_rescaler_matches_torch_bilinear():
    x = np.random.default_rng(7).normal(size=(2, 16, 12, 5)).astype(np.float32)
    down = SpatialRescaler(n_stages=2, multiplier=0.5, in_channels=5)
    got = np.asarray(down.apply({}, jnp.asarray(x)))
    np.testing.assert_allclose(got, _torch_bilinear(_torch_bilinear(x, 0.5), 0.5), atol=1e-5)
    up = SpatialRescaler(n_stages=1, multiplier=2.0, in_channels=5)
    np.testing.assert_allclose(np.asarray(up.apply({}, jnp.asarray(x))), _torch_bilinear(x, 2.0), atol=1e-5)
    near = SpatialRescaler(n_stages=1, method="nearest", in_channels=5)
    np.testing.assert_array_equal(np.asarray(near.apply({}, jnp.asarray(x))), x[:, ::2, ::2])
    mapped = SpatialRescaler(n_stages=1, in_channels=5, out_channels=3)
    params = mapped.init(KEY, jnp.asarray(x))
    assert params["params"]["channel_mapper"]["kernel"].shape == (1, 1, 5, 3)
    assert "bias" not in params["params"]["channel_mapper"]
    assert mapped.apply(params, jnp.asarray(x)).shape == (2, 8, 6, 3)
    with pytest.raises(ValueError, match="method"):
        SpatialRescaler(method="area", in_channels=5).apply({}, jnp.asarray(x))
