"""GroupNorm (optionally fused with SiLU) and LayerNorm with hand-written VJPs: the same functions as flax's
nn.GroupNorm and nn.LayerNorm.

Why: XLA:CPU reduces a (N, H*W, groups, C/groups) view slowly when C/groups is small (3 channels per group at
96 channels), several times slower than this formulation (figures: docs/benchmarks.md, "GroupNorm"). Statistics
are reduced over H*W per channel first (the minor axis stays contiguous), then over the few channels of each
group; the variance is two-pass, E[(x - mean)^2], in float32 whatever the input dtype. The backward is the
closed-form GroupNorm gradient, reduced the same way. An optional SiLU runs inside the same VJP, so norm +
activation cost one elementwise pass forward and two backward (the UNet's and autoencoder's GroupNorm -> SiLU
pairs; about half the time of the unfused pair).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


# Group <-> channel maps are tiny dots with a 0/1 matrix rather than reshape/repeat: XLA:CPU then materialises
# the (N, C) coefficients, where a repeat fused into the big elementwise loop cost it 3-4x in index arithmetic.
# HIGHEST keeps the products exact on backends whose default float32 dot precision is lower.
_EXACT = jax.lax.Precision.HIGHEST


def _expand(groups: int, c: int) -> jax.Array:
    """(groups, C) 0/1 matrix: channel j belongs to group j // (C / groups)."""
    return jnp.asarray(np.repeat(np.eye(groups, dtype=np.float32), c // groups, axis=1))


def _to_groups(per_channel: jax.Array, groups: int) -> jax.Array:
    """(N, C) -> (N, groups): the sum over each group's channels."""
    return jnp.dot(per_channel, _expand(groups, per_channel.shape[-1]).T, precision=_EXACT)


def _to_channels(per_group: jax.Array, c: int) -> jax.Array:
    """(N, groups) -> (N, C): each group's value repeated over its channels."""
    return jnp.dot(per_group, _expand(per_group.shape[-1], c), precision=_EXACT)


def _coefficients(x3: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, eps: float):
    """Per (sample, channel): mean, rstd, and y = x * a + b, the normalised and affine-transformed x."""
    n, length, c = x3.shape
    count = length * (c // groups)
    mean = _to_channels(_to_groups(jnp.sum(x3, axis=1), groups) / count, c)
    # Two-pass variance, E[(x - mean)^2], in float32.
    var = _to_groups(jnp.sum(jnp.square(x3 - mean[:, None, :]), axis=1), groups) / count
    rstd = _to_channels(jax.lax.rsqrt(var + eps), c)
    a = rstd * scale
    return mean, rstd, a, bias - mean * a


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, eps: float,
               silu: bool = False) -> jax.Array:
    """GroupNorm of x (N, ..., C) over (spatial dims, channels of a group), then SiLU if `silu`; float32 out."""
    return _group_norm_fwd(x, scale, bias, groups, eps, silu)[0]


def _group_norm_fwd(x, scale, bias, groups, eps, silu):
    x3 = x.reshape(x.shape[0], -1, x.shape[-1]).astype(jnp.float32)
    mean, rstd, a, b = _coefficients(x3, scale.astype(jnp.float32), bias.astype(jnp.float32), groups, eps)
    y = x3 * a[:, None, :] + b[:, None, :]
    if silu:  # z / (1 + exp(-z)) = z * sigmoid(z), ending in a divide: XLA then keeps the activation as one fusion
        y = y / (1 + jnp.exp(-y))  # (a trailing multiply was re-fused into every consumer, e.g. the transposes)
    return y.reshape(x.shape), (x, scale, mean, rstd, a, b)


def _group_norm_bwd(groups, eps, silu, res, dy):
    x, scale, mean, rstd, a, b = res
    n, c = x.shape[0], x.shape[-1]
    x3 = x.reshape(n, -1, c).astype(jnp.float32)
    dz = dy.reshape(x3.shape).astype(jnp.float32)
    if silu:  # recomputed from x: cheaper than keeping the pre-activation
        z = x3 * a[:, None, :] + b[:, None, :]
        # sigmoid via tanh: not the forward's exp(-z), which XLA would otherwise share (CSE) between the passes
        # and so keep as one more full-size array
        s = 0.5 + 0.5 * jnp.tanh(0.5 * z)
        dz = dz * (s * (1 + z * (1 - s)))
    gamma = scale.astype(jnp.float32)
    count = x3.shape[1] * (c // groups)
    sum_dz = jnp.sum(dz, axis=1)  # (N, C)
    sum_dz_xhat = rstd * (jnp.sum(dz * x3, axis=1) - mean * sum_dz)  # sum over L of dz * (x - mean) * rstd
    # dx = rstd * (g - mean_g(g) - xhat * mean_g(g * xhat)) with g = dz * gamma, written as dz * a + x * k1 + k0.
    m1 = _to_channels(_to_groups(gamma * sum_dz, groups), c) / count
    m2 = _to_channels(_to_groups(gamma * sum_dz_xhat, groups), c) / count
    k1 = -rstd * rstd * m2
    k0 = mean * rstd * rstd * m2 - rstd * m1
    dx = dz * a[:, None, :] + x3 * k1[:, None, :] + k0[:, None, :]
    dscale, dbias = jnp.sum(sum_dz_xhat, axis=0), jnp.sum(sum_dz, axis=0)
    return dx.reshape(x.shape).astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
    """Drop-in for nn.GroupNorm(num_groups, epsilon) over the last axis: same params ('scale', 'bias'), init
    and forward (to float rounding); result in `dtype` (default: the input's). `silu=True` applies SiLU to the
    result inside the same VJP (one backward pass for norm and activation)."""

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    scale_init: Any = nn.initializers.ones
    bias_init: Any = nn.initializers.zeros
    silu: bool = False

    @nn.compact
    def __call__(self, x: jax.Array | Sequence[jax.Array]) -> jax.Array | list[jax.Array]:
        """x (N, ..., C); or a list of channel parts of that input (rows may differ, e.g. a guided batch's shared
        skip connection), each a whole number of groups: their normalised parts, as a list."""
        split = isinstance(x, (list, tuple))
        parts = list(x) if split else [x]
        c = sum(p.shape[-1] for p in parts)
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible into {self.num_groups} groups")
        size = c // self.num_groups
        if any(p.shape[-1] % size for p in parts):
            raise ValueError(f"GroupNorm: channel parts {[p.shape[-1] for p in parts]} do not split at the groups "
                             f"of {size} channels")
        scale = self.param("scale", self.scale_init, (c,), jnp.float32)
        bias = self.param("bias", self.bias_init, (c,), jnp.float32)
        out, start = [], 0
        for p in parts:  # groups are independent: each part is normalised with its own slice of scale and bias
            stop = start + p.shape[-1]
            y = group_norm(p, scale[start:stop], bias[start:stop], p.shape[-1] // size, self.epsilon, self.silu)
            out.append(y.astype(self.dtype or p.dtype))
            start = stop
        return out if split else out[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm of x over its last axis (two-pass variance, float32); float32 output."""
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True) + eps)
    y = (xf - mean) * rstd * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y, (x, mean, rstd, scale)


def _layer_norm_bwd(eps, res, dy):
    x, mean, rstd, scale = res
    xhat = (x.astype(jnp.float32) - mean) * rstd
    g = dy * scale.astype(jnp.float32)
    rows = tuple(range(x.ndim - 1))
    dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True) - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
    dscale, dbias = jnp.sum(dy * xhat, axis=rows), jnp.sum(dy, axis=rows)
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
    """Drop-in for nn.LayerNorm(epsilon) over the last axis (same params 'scale', 'bias' and init; forward equal
    to float rounding) with the closed-form backward: autodiff's version materialised the scale's broadcast to the
    full input on XLA:CPU and ran ~1.5x slower. Result in `dtype` (default: x's)."""

    epsilon: float = 1e-6
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
        return layer_norm(x, scale, bias, self.epsilon).astype(self.dtype or x.dtype)
