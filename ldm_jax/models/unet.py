"""The latent-diffusion UNet, NHWC, Flax linen.

Semantics follow the reference ldm/modules/diffusionmodules/openaimodel.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.attention import SpatialTransformer, attention, match_batch, repeat_batch
from ldm_jax.models.fast_ops import dense_cls, pointwise_conv_general_dilated, upsample_conv_general_dilated
from ldm_jax.models.norms import GroupNorm

Dtype = Any
REMAT_POLICIES = (None, "full", "dots_saveable", "nothing_saveable")
_zeros = nn.initializers.zeros
_default_kernel = nn.initializers.lecun_normal()


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding (B,) -> (B, dim) float32 in [cos, sin] order, zero-padded when dim is odd."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def validate_unet_config(
    *,
    model_channels: int,
    channel_mult: Sequence[int],
    num_res_blocks: int,
    attention_resolutions: Sequence[int],
    num_heads: int = -1,
    num_head_channels: int = -1,
    use_spatial_transformer: bool = False,
    transformer_depth: int = 1,
    context_dim: int | None = None,
    dropout: float = 0.0,
    remat_policy: str | None = None,
    attention_impl: str | None = None,
    dtype: Dtype = jnp.float32,
) -> None:
    """Raise ValueError (one line naming the field) for a config the reference would reject or mis-build."""
    if not channel_mult or any(m < 1 for m in channel_mult):
        raise ValueError(f"channel_mult must be a non-empty sequence of positive ints, got {channel_mult}")
    if num_res_blocks < 0:
        raise ValueError(f"num_res_blocks must be >= 0, got {num_res_blocks}")
    bad = [c for c in (model_channels * m for m in channel_mult) if c % 32]
    if model_channels < 1 or bad:
        raise ValueError(f"model_channels * channel_mult must be multiples of 32 (GroupNorm32), got {bad}")
    reached = {2**i for i in range(len(channel_mult))}
    unreached = sorted(set(attention_resolutions) - reached)
    if unreached:
        raise ValueError(
            f"attention_resolutions {unreached} never reached: channel_mult {tuple(channel_mult)} gives "
            f"downsample factors {sorted(reached)} (max ds = {2 ** (len(channel_mult) - 1)})"
        )
    if (num_heads == -1) == (num_head_channels == -1):
        raise ValueError(
            f"num_heads / num_head_channels: give exactly one (the other -1), got {num_heads} / {num_head_channels}"
        )
    # Channel counts that carry attention: attention levels (down and up paths) and the middle block.
    att_chs = {model_channels * m for i, m in enumerate(channel_mult) if 2**i in attention_resolutions}
    att_chs.add(model_channels * channel_mult[-1])
    for ch in sorted(att_chs):
        if num_head_channels != -1 and (num_head_channels < 1 or ch % num_head_channels):
            raise ValueError(f"num_head_channels {num_head_channels} does not divide attention channels {ch}")
        if num_heads != -1 and (num_heads < 1 or ch % num_heads):
            raise ValueError(f"num_heads {num_heads} does not divide attention channels {ch}")
    if use_spatial_transformer and context_dim is None:
        raise ValueError("context_dim must be set when use_spatial_transformer is True")
    if use_spatial_transformer and transformer_depth < 1:
        raise ValueError(f"transformer_depth must be >= 1, got {transformer_depth}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got {remat_policy!r}")
    if attention_impl not in (None, "xla", "cudnn", "matmul"):
        raise ValueError(f"attention_impl must be None, 'xla', 'cudnn' or 'matmul', got {attention_impl!r}")
    if attention_impl == "cudnn" and jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"attention_impl 'cudnn' needs dtype bfloat16 or float16, got {jnp.dtype(dtype).name}")


class GroupNorm32(nn.Module):
    """GroupNorm(32 groups, eps 1e-5) computed in float32, result cast back to the input dtype; then SiLU if
    `silu` (fused into the norm's VJP)."""

    epsilon: float = 1e-5
    silu: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return GroupNorm(num_groups=32, epsilon=self.epsilon, silu=self.silu, name="norm")(x)


def _upsample_nearest(x: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Downsample(nn.Module):
    """Halve H and W: 3x3 stride-2 conv (padding 1) if use_conv, else 2x2 average pooling."""

    channels: int
    use_conv: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_conv:
            return nn.Conv(
                self.channels, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=self.dtype, name="op"
            )(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
    """Double H and W by nearest neighbour, then a 3x3 conv if use_conv."""

    channels: int
    use_conv: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_conv:  # the same 3x3 conv of the upsampled x, computed at the low resolution (fast_ops)
            return nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="conv",
                           conv_general_dilated=upsample_conv_general_dilated)(x)
        return _upsample_nearest(x)


class ChannelPartsConv(nn.Module):
    """nn.Conv (the same params, init and function; stride 1, SAME padding) of an input given as channel parts whose
    rows may differ (B or k*B, see `skip_parts`): the sum of each part's conv with its slice of the kernel, computed
    on the part's own rows and then tiled, plus the bias."""

    features: int
    kernel_size: int
    dtype: Dtype = jnp.float32
    kernel_init: Any = _default_kernel

    @nn.compact
    def __call__(self, parts: Sequence[jax.Array]) -> jax.Array:
        k, c = self.kernel_size, sum(p.shape[-1] for p in parts)
        kernel = self.param("kernel", self.kernel_init, (k, k, c, self.features), jnp.float32).astype(self.dtype)
        bias = self.param("bias", _zeros, (self.features,), jnp.float32).astype(self.dtype)
        n, out, start = max(p.shape[0] for p in parts), None, 0
        for p in parts:
            y = jax.lax.conv_general_dilated(p.astype(self.dtype), kernel[:, :, start:start + p.shape[-1]], (1, 1),
                                             "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            out = repeat_batch(y, n) if out is None else out + repeat_batch(y, n)
            start += p.shape[-1]
        return out + bias


def skip_parts(h: jax.Array, skip: jax.Array, groups: int = 32) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The output blocks' input concat([h, skip], channels). When the skip has fewer rows than h (a guided batch
    [uncond; cond] shares the condition-free input blocks), it is returned as two channel parts instead: h with
    the skip channels that share h's last GroupNorm group (tiled to h's rows), and the rest of the skip on its own
    rows, so that the ResBlock normalises and convolves that rest once per x (exact: groups are independent and
    a convolution is a sum over its input channels)."""
    if skip.shape[0] >= h.shape[0]:
        return jnp.concatenate(match_batch(h, skip), axis=-1)
    size = (h.shape[-1] + skip.shape[-1]) // groups
    s = -h.shape[-1] % size if size else 0
    head = jnp.concatenate([h, repeat_batch(skip[..., :s], h.shape[0])], axis=-1) if s else h
    return (head, skip[..., s:]) if s < skip.shape[-1] else head


class ResBlock(nn.Module):
    """GN-SiLU-conv, + time-embedding projection (or scale-shift), GN-SiLU-dropout-zero conv, + skip."""

    out_channels: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    up: bool = False
    down: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array | tuple[jax.Array, ...], emb: jax.Array, train: bool = False) -> jax.Array:
        """x (N, H, W, C), or a tuple of its channel parts from `skip_parts` (rows N or fewer); emb (N, D)."""
        conv = lambda name, k, init=_default_kernel, fn=None: nn.Conv(
            self.out_channels, (k, k), padding="SAME", dtype=self.dtype, kernel_init=init, name=name,
            conv_general_dilated=fn,
        )
        parts = x if isinstance(x, tuple) else None
        if parts is not None:  # the input conv of each part on its own rows (skip_parts)
            if self.up or self.down:
                raise ValueError("ResBlock: channel-part inputs are only supported without up/down sampling")
            hs = GroupNorm32(silu=True, name="in_norm")(parts)
            h = ChannelPartsConv(self.out_channels, 3, self.dtype, name="in_conv")(hs)
        else:
            h = GroupNorm32(silu=True, name="in_norm")(x)
            if self.up:  # resample both paths between the activation and the conv, as the reference; the conv of
                x = _upsample_nearest(x)  # the upsampled h is computed at the low resolution (fast_ops.upsample_conv)
                h = conv("in_conv", 3, fn=upsample_conv_general_dilated)(h)
            else:
                if self.down:
                    h, x = (nn.avg_pool(t, (2, 2), strides=(2, 2)) for t in (h, x))
                h = conv("in_conv", 3)(h)
        k = 2 if self.use_scale_shift_norm else 1
        e = nn.Dense(k * self.out_channels, dtype=self.dtype, name="emb_proj")(nn.silu(emb.astype(self.dtype)))
        e = e[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = nn.silu(GroupNorm32(name="out_norm")(h) * (1 + scale) + shift)
        else:
            h = GroupNorm32(silu=True, name="out_norm")(h + e)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv("out_conv", 3, _zeros)(h)
        if parts is not None:
            if sum(t.shape[-1] for t in parts) != self.out_channels:
                return ChannelPartsConv(self.out_channels, 1, self.dtype, name="skip")(parts) + h
            x = jnp.concatenate(match_batch(*parts), axis=-1)
        if x.shape[-1] != self.out_channels:
            x = conv("skip", 1, fn=pointwise_conv_general_dilated)(x)
        return x + h


class AttentionBlock(nn.Module):
    """Spatial self-attention: GroupNorm32 -> 1x1 qkv -> multi-head attention -> zero 1x1 proj, + x."""

    channels: int
    num_heads: int
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        d = c // self.num_heads
        t = GroupNorm32(name="norm")(x).reshape(b, hh * ww, c)
        dense = dense_cls(self.attention_impl)
        qkv = dense(3 * c, dtype=self.dtype, name="qkv")(t)
        q, k, v = (a.reshape(b, hh * ww, self.num_heads, d) for a in jnp.split(qkv, 3, axis=-1))
        a = attention(q, k, v, d**-0.5, self.attention_impl)
        a = dense(c, dtype=self.dtype, kernel_init=_zeros, name="proj_out")(a.reshape(b, hh * ww, c))
        return x + a.reshape(b, hh, ww, c).astype(x.dtype)


class UNetModel(nn.Module):
    """Diffusion UNet eps_theta(x, t, context, y) with the reference openaimodel structure; NHWC."""

    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: Sequence[int] = (1, 2, 4, 8)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = ()
    dropout: float = 0.0
    num_heads: int = -1
    num_head_channels: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    conv_resample: bool = True
    use_spatial_transformer: bool = False
    transformer_depth: int = 1
    context_dim: int | None = None
    num_classes: int | None = None
    dtype: Dtype = jnp.float32
    remat_policy: str | None = None
    attention_impl: str | None = None

    def setup(self) -> None:
        validate_unet_config(
            model_channels=self.model_channels,
            channel_mult=self.channel_mult,
            num_res_blocks=self.num_res_blocks,
            attention_resolutions=self.attention_resolutions,
            num_heads=self.num_heads,
            num_head_channels=self.num_head_channels,
            use_spatial_transformer=self.use_spatial_transformer,
            transformer_depth=self.transformer_depth,
            context_dim=self.context_dim,
            dropout=self.dropout,
            remat_policy=self.remat_policy,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
        )
        res_cls, st_cls = ResBlock, SpatialTransformer
        if self.remat_policy is not None:
            policy = {
                "full": None,
                "dots_saveable": jax.checkpoint_policies.dots_saveable,
                "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
            }[self.remat_policy]
            res_cls = nn.remat(ResBlock, policy=policy, static_argnums=(3,))  # (self, x, emb, train)
            st_cls = nn.remat(SpatialTransformer, policy=policy)
        dt, mc = self.dtype, self.model_channels
        ted = 4 * mc
        # Time/label embeddings and the output head stay float32, as in the reference's fp16 mode.
        self.time_embed_0 = nn.Dense(ted)
        self.time_embed_2 = nn.Dense(ted)
        if self.num_classes is not None:
            self.label_emb = nn.Embed(self.num_classes, ted)

        def res(out_ch: int, up: bool = False, down: bool = False) -> nn.Module:
            return res_cls(out_ch, self.dropout, self.use_scale_shift_norm, up, down, dt)

        def attn(ch: int) -> nn.Module:
            heads = self.num_heads if self.num_head_channels == -1 else ch // self.num_head_channels
            if self.use_spatial_transformer:
                return st_cls(ch, heads, ch // heads, self.transformer_depth, self.context_dim, dt, self.attention_impl)
            return AttentionBlock(ch, heads, dt, self.attention_impl)

        inputs: list[list[nn.Module]] = [[nn.Conv(mc, (3, 3), padding="SAME", dtype=dt)]]
        ch, ds = mc, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                ch = mult * mc
                layers = [res(ch)]
                if ds in self.attention_resolutions:
                    layers.append(attn(ch))
                inputs.append(layers)
            if level != len(self.channel_mult) - 1:
                inputs.append([res(ch, down=True) if self.resblock_updown else Downsample(ch, self.conv_resample, dt)])
                ds *= 2
        self.input_blocks = inputs
        self.middle_block = [res(ch), attn(ch), res(ch)]
        outputs: list[list[nn.Module]] = []
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                ch = mult * mc
                layers = [res(ch)]
                if ds in self.attention_resolutions:
                    layers.append(attn(ch))
                if level and i == self.num_res_blocks:
                    layers.append(res(ch, up=True) if self.resblock_updown else Upsample(ch, self.conv_resample, dt))
                    ds //= 2
                outputs.append(layers)
        self.output_blocks = outputs
        self.out_norm = GroupNorm32(silu=True)
        self.out_conv = nn.Conv(self.out_channels, (3, 3), padding="SAME", kernel_init=_zeros)

    def _run(
        self,
        layers: Sequence[nn.Module],
        h: jax.Array | tuple[jax.Array, ...],
        emb: jax.Array,
        context: jax.Array | None,
        train: bool,
    ) -> jax.Array:
        for layer in layers:
            if isinstance(layer, ResBlock):
                if isinstance(h, tuple):  # skip_parts: the first part has the most rows
                    h = layer(h, repeat_batch(emb, h[0].shape[0]), train)
                else:
                    h = layer(*match_batch(h, emb), train)  # label embeddings of a guided batch: tile h (__call__)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context)
            else:
                h = layer(h)
        return h

    def __call__(
        self,
        x: jax.Array,
        timesteps: jax.Array,
        context: jax.Array | None = None,
        y: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        """Predict (N, H, W, out_channels) float32 from x (B, H, W, in_channels) and timesteps (B,).

        N = B, or N = k*B when the context / labels have k*B rows: the output is then that of x and timesteps
        tiled k times ([x; x] for a guided batch [uncond; cond]), but the layers before the first use of the
        condition run on B rows only (for a cross-attention UNet: everything up to the first cross-attention).
        """
        n = max([x.shape[0]] + [c.shape[0] for c in (context, y) if c is not None])
        if n % x.shape[0]:
            raise ValueError(f"context/labels batch {n} must be a multiple of x's batch {x.shape[0]}")
        if self.num_classes is not None and y is None:
            raise ValueError("y: class labels are required when num_classes is set")
        if self.num_classes is None and y is not None:
            raise ValueError("y: class labels given but num_classes is None")
        if self.use_spatial_transformer:
            if context is None:
                raise ValueError("context: required when use_spatial_transformer is True")
            if context.shape[-1] != self.context_dim:
                raise ValueError(f"context_dim is {self.context_dim} but context has {context.shape[-1]} features")
            context = context.astype(self.dtype)
        emb = self.time_embed_2(nn.silu(self.time_embed_0(timestep_embedding(timesteps, self.model_channels))))
        if self.num_classes is not None:
            emb = repeat_batch(emb, n) + self.label_emb(y)
        h, hs = x.astype(self.dtype), []
        for layers in self.input_blocks:
            h = self._run(layers, h, emb, context, train)
            hs.append(h)
        h = self._run(self.middle_block, h, emb, context, train)
        for layers in self.output_blocks:
            h = self._run(layers, skip_parts(h, hs.pop()), emb, context, train)
        h = self.out_norm(repeat_batch(h, n).astype(jnp.float32))
        return self.out_conv(h)
