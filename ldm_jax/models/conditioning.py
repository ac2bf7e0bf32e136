"""Conditioning encoders tau_theta: class embedder, text transformer, spatial rescaler.

Semantics follow the reference ldm/modules/encoders/modules.py; layout NHWC.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.attention import CrossAttention

Dtype = Any
RESCALE_METHODS = ("nearest", "bilinear")


class ClassEmbedder(nn.Module):
    """Class label (B,) int -> context (B, 1, embed_dim).

    n_classes counts the extra null class used for classifier-free guidance, at index n_classes - 1
    (the reference's cin256 model: 1000 ImageNet classes + null = 1001).
    """

    n_classes: int
    embed_dim: int

    @property
    def null_class(self) -> int:
        """Index of the unconditional (null) class."""
        return self.n_classes - 1

    @nn.compact
    def __call__(self, labels: jax.Array) -> jax.Array:
        table = nn.Embed(self.n_classes, self.embed_dim, name="embedding")
        return table(jnp.asarray(labels, jnp.int32)[:, None])


class _EncoderBlock(nn.Module):
    """Pre-LN block as x-transformers' Encoder: x += attn(LN x); x += MLP(LN x) (GELU, hidden 4*dim)."""

    dim: int
    heads: int
    dim_head: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm1")(x)
        x = x + CrossAttention(self.dim, None, self.heads, self.dim_head, self.dtype, name="attn")(h)
        h = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm2")(x)
        h = nn.Dense(4 * self.dim, dtype=self.dtype, name="ff_in")(h)
        h = nn.Dense(self.dim, dtype=self.dtype, name="ff_out")(jax.nn.gelu(h, approximate=False))
        return x + h


class TransformerEmbedder(nn.Module):
    """Text encoder tau_theta: tokens (B, L) -> (B, L, n_embed); trained jointly with the diffusion model.

    Token + learned absolute positional embedding, n_layer pre-LN blocks (bias-free q/k/v, output with bias,
    GELU MLP x4), final LayerNorm. Like the reference (x-transformers TransformerWrapper,
    return_embeddings=True) there is no padding mask: [PAD] positions are attended to.
    """

    vocab_size: int
    n_embed: int
    n_layer: int
    max_seq_len: int = 77
    heads: int = 8
    dim_head: int = 64
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        length = tokens.shape[1]
        if length > self.max_seq_len:
            raise ValueError(f"max_seq_len is {self.max_seq_len} but tokens have length {length}")
        init = nn.initializers.normal(0.02)
        x = nn.Embed(self.vocab_size, self.n_embed, embedding_init=init, name="token_emb")(tokens)
        pos = self.param("pos_emb", init, (self.max_seq_len, self.n_embed))
        x = (x + pos[None, :length]).astype(self.dtype)
        for i in range(self.n_layer):
            x = _EncoderBlock(self.n_embed, self.heads, self.dim_head, self.dtype, name=f"layers_{i}")(x)
        return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(x)


def _resize_nearest(x: jax.Array, out_h: int, out_w: int) -> jax.Array:
    # torch 'nearest' with a scale factor picks floor(dst / scale), unlike jax.image's half-pixel rounding.
    in_h, in_w = x.shape[1], x.shape[2]
    iy = jnp.minimum(jnp.floor(jnp.arange(out_h) * (in_h / out_h)).astype(jnp.int32), in_h - 1)
    ix = jnp.minimum(jnp.floor(jnp.arange(out_w) * (in_w / out_w)).astype(jnp.int32), in_w - 1)
    return x[:, iy][:, :, ix]


class SpatialRescaler(nn.Module):
    """Resize (B, H, W, C) n_stages times by `multiplier`, then an optional 1x1 conv to out_channels.

    Used for semantic maps (e.g. 182 -> 3 channels) and low-resolution images. "bilinear" matches torch's
    interpolate(align_corners=False, antialias=False); sizes are floor(size * multiplier) per stage.
    """

    n_stages: int = 1
    method: str = "bilinear"
    multiplier: float = 0.5
    in_channels: int = 3
    out_channels: int | None = None
    bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.method not in RESCALE_METHODS:
            raise ValueError(f"method must be one of {RESCALE_METHODS}, got {self.method!r}")
        if self.n_stages < 0:
            raise ValueError(f"n_stages must be >= 0, got {self.n_stages}")
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"in_channels is {self.in_channels} but the input has {x.shape[-1]} channels")
        for _ in range(self.n_stages):
            b, h, w, c = x.shape
            oh, ow = int(h * self.multiplier), int(w * self.multiplier)
            if self.method == "nearest":
                x = _resize_nearest(x, oh, ow)
            else:
                x = jax.image.resize(x, (b, oh, ow, c), method="bilinear", antialias=False)
        if self.out_channels is not None:
            x = nn.Conv(self.out_channels, (1, 1), use_bias=self.bias, name="channel_mapper")(x)
        return x
