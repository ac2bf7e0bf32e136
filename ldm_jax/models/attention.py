"""Transformer pieces of the latent-diffusion UNet: CrossAttention, GEGLU feed-forward, SpatialTransformer.

Semantics follow the reference ldm/modules/attention.py; layout is NHWC and tokens are (B, L, C).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.fast_ops import dense_cls, matmul_attention, pointwise_conv_general_dilated
from ldm_jax.models.norms import GroupNorm, LayerNorm

Dtype = Any


def repeat_batch(x: jax.Array, n: int) -> jax.Array:
    """x (B, ...) tiled along the batch to n = k*B rows: [x; x; ...], the layout of a guided batch [uncond; cond].

    The networks accept conditions (context, labels) with k times the batch of x: the layers before the first use
    of the condition then run once per x, and their output is tiled here. Classifier-free guidance uses it to
    share the condition-free prefix of the UNet between its two halves (exact: the same per-sample computation).
    """
    b = x.shape[0]
    if b == n:
        return x
    if n % b:
        raise ValueError(f"condition batch {n} is not a multiple of the input batch {b}")
    return jnp.concatenate([x] * (n // b), axis=0)


def match_batch(*xs: jax.Array) -> list[jax.Array]:
    """The arrays tiled (repeat_batch) to the largest batch among them."""
    n = max(x.shape[0] for x in xs)
    return [repeat_batch(x, n) for x in xs]


_CUDNN_BLOCK = 64  # cuDNN flash attention wants sequence lengths in multiples of this (e.g. text length 77)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, impl: str | None = None) -> jax.Array:
    """Softmax attention on (B, L, heads, d) via jax.nn.dot_product_attention(implementation=impl).

    For "cudnn", lengths that are not multiples of 64 (77 text tokens, 16 pixels) are padded and masked.
    "matmul" is the same computation with a hand-written VJP that XLA:CPU runs faster (models/fast_ops.py).
    """
    if impl == "matmul":
        return matmul_attention(q, k, v, scale)
    if impl == "cudnn" and (q.shape[1] % _CUDNN_BLOCK or k.shape[1] % _CUDNN_BLOCK):
        return padded_attention(q, k, v, scale, impl)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=impl)


def padded_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, scale: float, impl: str | None = None, block: int = _CUDNN_BLOCK
) -> jax.Array:
    """attention() with q and k/v zero-padded to multiples of `block`, the padding masked via seq lengths."""
    b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    pad = lambda t, n: jnp.pad(t, ((0, 0), (0, n), (0, 0), (0, 0)))
    out = jax.nn.dot_product_attention(
        pad(q, -lq % block),
        pad(k, -lk % block),
        pad(v, -lk % block),
        scale=scale,
        implementation=impl,
        query_seq_lengths=jnp.full((b,), lq, jnp.int32),
        key_value_seq_lengths=jnp.full((b,), lk, jnp.int32),
    )
    return out[:, :lq]


class CrossAttention(nn.Module):
    """Multi-head attention of x over context (self-attention when context is None).

    q/k/v projections have no bias, the output projection has one, the scale is dim_head**-0.5.
    `attention_impl` goes to `jax.nn.dot_product_attention(implementation=...)`: None/"xla", or "cudnn" on GPU
    (cudnn needs float16/bfloat16 compute; other lengths than multiples of 64 are padded and masked), or
    "matmul" (hand-written VJPs for the attention and the Dense layers: faster training on CPU).
    """

    query_dim: int
    context_dim: int | None = None
    heads: int = 8
    dim_head: int = 64
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        if context is None:
            context = x
        want = self.context_dim or self.query_dim
        if context.shape[-1] != want:
            raise ValueError(f"context_dim is {want} but the context (or x, if none) has {context.shape[-1]} features")
        inner = self.heads * self.dim_head
        dense = lambda name, feats, bias: dense_cls(self.attention_impl)(feats, use_bias=bias, dtype=self.dtype,
                                                                         name=name)
        q = dense("to_q", inner, False)(x)
        k = dense("to_k", inner, False)(context)
        v = dense("to_v", inner, False)(context)
        split = lambda t: t.reshape(t.shape[:-1] + (self.heads, self.dim_head))
        out = attention(split(q), split(k), split(v), self.dim_head**-0.5, self.attention_impl)
        out = out.reshape(out.shape[:-2] + (inner,))
        return dense("to_out", self.query_dim, True)(out)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU as torch's F.gelu computes it, 0.5 x (1 + erf(x / sqrt 2)). jax.nn.gelu(approximate=False)
    uses erfc (equal to float rounding), whose backward XLA:CPU runs 2x slower: FeedForward fwd+bwd 65 -> 55 ms
    at 8x256 tokens of 192 (docs/benchmarks.md)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * (2.0**-0.5)))


class GEGLU(nn.Module):
    """Dense to 2*dim_out, then value * GELU(gate) (exact erf GELU, as torch's F.gelu)."""

    dim_out: int
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None  # "matmul": FastDense (same params and forward)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = dense_cls(self.attention_impl)(2 * self.dim_out, dtype=self.dtype, name="proj")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * gelu(gate)


class FeedForward(nn.Module):
    """GEGLU(dim -> mult*dim) then Dense back to dim_out (default dim)."""

    dim: int
    dim_out: int | None = None
    mult: int = 4
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None  # "matmul": FastDense (same params and forward)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = GEGLU(self.dim * self.mult, dtype=self.dtype, attention_impl=self.attention_impl, name="geglu")(x)
        return dense_cls(self.attention_impl)(self.dim_out or self.dim, dtype=self.dtype, name="out")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LN block: x += self-attn(LN x); x += cross-attn(LN x, context); x += FF(LN x)."""

    dim: int
    n_heads: int
    d_head: int
    context_dim: int | None = None
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        ln = lambda name: LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
        attn = lambda name, ctx_dim: CrossAttention(
            self.dim, ctx_dim, self.n_heads, self.d_head, self.dtype, self.attention_impl, name=name
        )
        x = x + attn("attn1", None)(ln("norm1")(x))
        if context is not None:  # a guided batch shares x: self-attention ran once per x, tile before the condition
            x = repeat_batch(x, context.shape[0])
        x = x + attn("attn2", self.context_dim)(ln("norm2")(x), context)
        ff = FeedForward(self.dim, dtype=self.dtype, attention_impl=self.attention_impl, name="ff")
        x = x + ff(ln("norm3")(x))
        return x


class SpatialTransformer(nn.Module):
    """GroupNorm(32, eps 1e-6) -> 1x1 proj_in -> depth blocks on (B, H*W, C) -> zero 1x1 proj_out, + x."""

    in_channels: int
    n_heads: int
    d_head: int
    depth: int = 1
    context_dim: int | None = None
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        b, h, w, c = x.shape
        if c != self.in_channels:
            raise ValueError(f"in_channels is {self.in_channels} but the input has {c} channels")
        inner = self.n_heads * self.d_head
        # Norm statistics in float32 (autocast runs group_norm in fp32 in the reference too).
        y = GroupNorm(num_groups=32, epsilon=1e-6, dtype=jnp.float32, name="norm")(x)
        conv1x1 = functools.partial(nn.Conv, kernel_size=(1, 1), dtype=self.dtype,
                                    conv_general_dilated=pointwise_conv_general_dilated)
        y = conv1x1(inner, name="proj_in")(y.astype(self.dtype))
        y = y.reshape(b, h * w, inner)
        for i in range(self.depth):
            y = BasicTransformerBlock(
                inner,
                self.n_heads,
                self.d_head,
                self.context_dim,
                self.dtype,
                self.attention_impl,
                name=f"transformer_blocks_{i}",
            )(y, context)
        y = y.reshape(y.shape[0], h, w, inner)  # y may have the context's (k times larger) batch
        y = conv1x1(c, kernel_init=nn.initializers.zeros, name="proj_out")(y)
        return repeat_batch(x, y.shape[0]) + y.astype(x.dtype)
