"""CLIP text transformer (the text tower of OpenAI CLIP), the frozen text encoder of Stable Diffusion v1.

Semantics follow transformers' `CLIPTextModel` (its `last_hidden_state`, which SD v1 cross-attends to): token +
learned absolute position embeddings, pre-LN blocks with causal self-attention (q/k/v/out projections with bias,
scale dim_head**-0.5), an MLP with quick_gelu (x·sigmoid(1.702x)) or exact GELU, and a final LayerNorm. SD v1 uses
ViT-L/14's text tower: width 768, 12 layers, 12 heads, MLP 3072, 77 tokens, vocabulary 49408. Parameter names
mirror transformers' so that converted weights map one to one (see ldm_jax/convert/clip.py).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
ACTIVATIONS = ("quick_gelu", "gelu")


def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    raise ValueError(f"model.clip.act must be one of {ACTIVATIONS}, got {name!r}")


class CLIPAttention(nn.Module):
    """Multi-head self-attention with a causal mask (token i attends to tokens <= i)."""

    width: int
    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        d = self.width // self.heads
        proj = lambda name: nn.Dense(self.width, dtype=self.dtype, name=name)  # noqa: E731
        split = lambda t: t.reshape(b, n, self.heads, d)  # noqa: E731
        q, k, v = (split(proj(name)(x)) for name in ("q_proj", "k_proj", "v_proj"))
        out = jax.nn.dot_product_attention(q, k, v, scale=d**-0.5, is_causal=True)
        return proj("out_proj")(out.reshape(b, n, self.width))


class CLIPMLP(nn.Module):
    width: int
    mlp_dim: int
    act: str = "quick_gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _activation(self.act)(nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x))
        return nn.Dense(self.width, dtype=self.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """x += attn(LN1 x); x += MLP(LN2 x)."""

    width: int
    heads: int
    mlp_dim: int
    act: str = "quick_gelu"
    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ln = lambda name: nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name=name)  # noqa: E731
        x = x + CLIPAttention(self.width, self.heads, self.dtype, name="self_attn")(ln("layer_norm1")(x))
        return x + CLIPMLP(self.width, self.mlp_dim, self.act, self.dtype, name="mlp")(ln("layer_norm2")(x))


class CLIPTextTransformer(nn.Module):
    """Tokens (B, L) int -> hidden states (B, L, width) after the final LayerNorm (CLIPTextModel's
    last_hidden_state). No padding mask, as SD v1 (padding tokens are only seen by later positions' keys,
    which the causal mask hides from earlier ones)."""

    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    max_len: int = 77
    act: str = "quick_gelu"
    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        if self.width % self.heads:
            raise ValueError(f"model.clip.heads={self.heads} does not divide model.clip.width={self.width}")
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"model.clip.max_len is {self.max_len} but tokens have length {length}")
        _activation(self.act)  # validate before building anything
        init = nn.initializers.normal(0.02)
        x = nn.Embed(self.vocab_size, self.width, embedding_init=init, name="token_embedding")(tokens)
        pos = self.param("position_embedding", init, (self.max_len, self.width))
        x = (x + pos[None, :length]).astype(self.dtype)
        for i in range(self.layers):
            x = CLIPEncoderLayer(self.width, self.heads, self.mlp_dim, self.act, self.eps, self.dtype,
                                 name=f"layers_{i}")(x)
        return nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="final_layer_norm")(x)


def clip_kwargs(cfg: Any) -> dict[str, Any]:
    """CLIPTextTransformer kwargs from a `model.clip` ConfigDict/dict (missing fields: SD v1's ViT-L/14)."""
    get = cfg.get
    return dict(vocab_size=int(get("vocab_size", 49408)), width=int(get("width", 768)),
                layers=int(get("layers", 12)), heads=int(get("heads", 12)), mlp_dim=int(get("mlp_dim", 3072)),
                max_len=int(get("max_len", 77)), act=str(get("act", "quick_gelu")), eps=float(get("eps", 1e-5)))
