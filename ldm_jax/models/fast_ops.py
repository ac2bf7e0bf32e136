"""Attention and Dense with hand-written VJPs whose matmuls XLA:CPU runs fast (`attention_impl="matmul"`).

Pure reformulations: the forward passes compute the same expressions as jax.nn.dot_product_attention and
flax's nn.Dense (Dense bit-for-bit; attention up to float rounding), and the backward passes are the exact
gradients. Why: autodiff of those ops leaves XLA:CPU batched dots that contract a non-minor dimension of the
big operand (softmax probabilities, Dense output gradients) and broadcasts it materialises; these VJPs avoid both
(attention fwd+bwd ~2.3x and Dense ~1.6x faster on a 2-core CPU; figures in docs/benchmarks.md). On GPU prefer
"cudnn".
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def _scaled(q: jax.Array, scale: float) -> jax.Array:
    # The scale goes on q (L x d), not on the (L x M) logits: XLA:CPU materialised a broadcast of the scalar
    # at the logits' full size for its fused softmax (12.6 MB at 8 x 6 heads x 256^2).
    return q * jnp.asarray(scale, q.dtype)


def _attn_fwd_core(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
    # (B, heads, L, d) operands; logits and softmax in float32, as jax.nn.dot_product_attention.
    logits = jnp.matmul(_scaled(q, scale), jnp.swapaxes(k, -1, -2), preferred_element_type=jnp.float32)
    p = jax.nn.softmax(logits, axis=-1)
    return jnp.matmul(p.astype(v.dtype), v), p


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention_bhld(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    # Without differentiation (sampling): normalise after the value product, (e @ v) / sum(e), which divides
    # the (L x d) output instead of the (L x M) matrix (flash-attention's deferred normalisation).
    logits = jnp.matmul(_scaled(q, scale), jnp.swapaxes(k, -1, -2), preferred_element_type=jnp.float32)
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    out = jnp.matmul(e.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / jnp.sum(e, axis=-1, keepdims=True)).astype(v.dtype)


def _attention_fwd(q, k, v, scale):
    out, p = _attn_fwd_core(q, k, v, scale)
    return out, (q, k, v, p, out)


def _attention_bwd(scale, res, dout):
    q, k, v, p, out = res
    f32 = jnp.float32
    do = dout.astype(f32)
    # Every product keeps the (L x M) matrix (p or ds) as a plain right-hand or left-hand operand; only the
    # small (L x d) operands are transposed.
    dv_t = jnp.matmul(jnp.swapaxes(do, -1, -2), p)  # (B, h, d, M)
    dp = jnp.matmul(do, jnp.swapaxes(v.astype(f32), -1, -2))  # (B, h, L, M)
    ds = p * (dp - jnp.sum(do * out.astype(f32), axis=-1, keepdims=True))  # softmax VJP: sum(p dp) = sum(do out)
    dq = jnp.matmul(ds, _scaled(k.astype(f32), scale))
    dk_t = jnp.matmul(jnp.swapaxes(_scaled(q.astype(f32), scale), -1, -2), ds)  # (B, h, d, M)
    return (dq.astype(q.dtype), jnp.swapaxes(dk_t, -1, -2).astype(k.dtype),
            jnp.swapaxes(dv_t, -1, -2).astype(v.dtype))


_attention_bhld.defvjp(_attention_fwd, _attention_bwd)


def matmul_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """Softmax attention on (B, L, heads, d) tensors -> (B, L, heads, d); the VJP is hand-written (see module)."""
    tr = lambda t: jnp.swapaxes(t, 1, 2)  # noqa: E731
    return tr(_attention_bhld(tr(q), tr(k), tr(v), float(scale)))


@jax.custom_vjp
def dense_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x (..., K) @ kernel (K, N), exactly as nn.Dense computes it; dkernel contracts the flattened rows of x
    with those of the output gradient directly (no transposed copy of the larger operand)."""
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _dense_fwd(x, kernel):
    return dense_matmul(x, kernel), (x, kernel)


def _dense_bwd(res, dy):
    x, kernel = res
    x2, d2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dk = jnp.matmul(x2.T, d2)
    dx = jnp.matmul(d2, kernel.T).reshape(x.shape)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


dense_matmul.defvjp(_dense_fwd, _dense_bwd)


class FastDense(nn.Module):
    """Drop-in for nn.Dense (same params, init and forward) whose backward uses `dense_matmul`'s VJP."""

    features: int
    use_bias: bool = True
    dtype: Dtype | None = None
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(x)[-1], self.features), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = dense_matmul(x, kernel)
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


def dense_cls(attention_impl: str | None) -> type[nn.Module]:
    """The Dense layer that goes with an attention_impl: FastDense for "matmul", else nn.Dense."""
    return FastDense if attention_impl == "matmul" else nn.Dense


# Nearest-neighbour x2 upsampling followed by a 3x3 convolution (padding 1), computed at the low resolution: output
# pixel (2i + a, 2j + b) only sees the 2x2 input pixels around (i, j), so each of the four phases (a, b) is a 2x2
# convolution whose kernel sums the 3x3 taps that land on the same input pixel. 4 instead of 9 multiply-adds per
# output and input channel (2.25x fewer FLOPs), the same function up to float rounding, the same 3x3 parameters.
# Phase 0: tap 0 reads input row i-1, taps 1 and 2 row i; phase 1: taps 0 and 1 read row i, tap 2 row i+1.
_PHASE_ROWS = (((0,), (1, 2)), ((0, 1), (2,)))


def _phase_kernel(w: jax.Array, a: int, b: int) -> jax.Array:
    rows = [sum(w[t] for t in taps) for taps in _PHASE_ROWS[a]]  # 2 x (3, I, O)
    return jnp.stack([jnp.stack([sum(r[t] for t in taps) for taps in _PHASE_ROWS[b]]) for r in rows])


def upsample_conv(x: jax.Array, kernel: jax.Array, precision: Any = None) -> jax.Array:
    """conv3x3(nearest_upsample_x2(x), kernel) with padding 1, NHWC / HWIO, without materialising the upsampled x."""
    pads = ((1, 0), (0, 1))  # phase 0 reads rows i-1, i; phase 1 reads rows i, i+1
    y = [[jax.lax.conv_general_dilated(x, _phase_kernel(kernel, a, b), (1, 1), (pads[a], pads[b]),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
          for b in (0, 1)] for a in (0, 1)]
    n, h, w, _ = x.shape
    out = jnp.stack([jnp.stack(row, axis=3) for row in y], axis=2)  # (N, H, 2, W, 2, O)
    return out.reshape(n, 2 * h, 2 * w, kernel.shape[-1])


def upsample_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                                  dimension_numbers=None, feature_group_count=1, precision=None):
    """For nn.Conv(conv_general_dilated=...) given the low-resolution input: the conv of its x2 nearest upsampling
    (3x3 kernel, stride 1, padding 1 or SAME only)."""
    pad_ok = padding == "SAME" or tuple(map(tuple, padding)) == ((1, 1), (1, 1))
    if rhs.shape[:2] != (3, 3) or tuple(window_strides) != (1, 1) or feature_group_count != 1 or not pad_ok:
        raise ValueError("upsample_conv: only 3x3 stride-1 convolutions with padding 1 are supported")
    return upsample_conv(lhs, rhs, precision)


def pointwise_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                                   dimension_numbers=None, feature_group_count=1, precision=None):
    """For nn.Conv(conv_general_dilated=...) with a 1x1 kernel: the same product as `dense_matmul` (NHWC input,
    HWIO kernel). Its weight gradient is one dot over the rows, where XLA:CPU's convolution gradient first
    transposed both operands to a batch-minor layout (e.g. 8x32x32x288 per UNet skip connection)."""
    plain = all(d in (None, 1) or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
    if rhs.shape[:2] != (1, 1) or tuple(window_strides) != (1, 1) or feature_group_count != 1 or not plain:
        raise ValueError("pointwise_conv: only 1x1 stride-1 undilated convolutions are supported")
    no_pad = padding in ("SAME", "VALID") or all(tuple(p) == (0, 0) for p in padding)
    specs = tuple(tuple(getattr(dimension_numbers, k, ())) for k in ("lhs_spec", "rhs_spec", "out_spec"))
    nhwc = dimension_numbers is None or specs == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    if not (no_pad and nhwc):  # the matmul form is only the same product for unpadded NHWC/HWIO operands
        raise ValueError(f"pointwise_conv: padding {padding!r} / dimension_numbers {dimension_numbers!r} are not "
                         "supported (unpadded NHWC input, HWIO kernel only)")
    if precision is not None:
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, dimension_numbers=dimension_numbers,
                                            precision=precision)
    return dense_matmul(lhs, rhs[0, 0])
