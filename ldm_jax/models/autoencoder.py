"""Stage-1 perceptual compression: convolutional Encoder/Decoder, AutoencoderKL and VQModel (NHWC).

Semantics follow the reference autoencoder (taming-transformers / latent-diffusion `model.py`): GroupNorm(32, 1e-6),
swish, stride-2 downsampling after (0,1,0,1) padding, nearest-neighbour upsampling + conv, a middle block
(res, attention, res), the decoder using one more res block per level. Downsampling factor f = 2**(len(ch_mult)-1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ldm_jax.models.fast_ops import upsample_conv_general_dilated
from ldm_jax.models.norms import GroupNorm
from ldm_jax.models.quantizer import VectorQuantizer

Dtype = Any


def _norm(groups: int, name: str | None = None, swish: bool = False) -> GroupNorm:
    return GroupNorm(num_groups=groups, epsilon=1e-6, silu=swish, name=name)


class ResnetBlock(nn.Module):
    """norm → swish → conv → norm → swish → dropout → conv, plus a 1×1 shortcut when channels change."""

    out_channels: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    groups: int = 32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        h = _norm(self.groups, "norm1", swish=True)(x)
        h = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype, name="conv1")(h)
        h = _norm(self.groups, "norm2", swish=True)(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1×1 q/k/v/proj convs, residual."""

    dtype: Dtype = jnp.float32
    groups: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        hn = _norm(self.groups, "norm")(x)
        q, k, v = (nn.Conv(c, (1, 1), dtype=self.dtype, name=n)(hn).reshape(b, h * w, 1, c) for n in "qkv")
        out = jax.nn.dot_product_attention(q, k, v).reshape(b, h, w, c)
        return x + nn.Conv(c, (1, 1), dtype=self.dtype, name="proj_out")(out)


class Downsample(nn.Module):
    """Stride-2 3×3 conv after asymmetric zero padding (right/bottom only), as the reference."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding="VALID", dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 then a 3×3 conv."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # The 3x3 conv of the upsampled x, computed at the low resolution (models/fast_ops.upsample_conv).
        return nn.Conv(x.shape[-1], (3, 3), dtype=self.dtype, name="conv",
                       conv_general_dilated=upsample_conv_general_dilated)(x)


class Encoder(nn.Module):
    """Image (B, H, W, in_channels) → (B, H/f, W/f, z_channels × (2 if double_z else 1))."""

    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = ()
    resolution: int = 256
    z_channels: int = 4
    double_z: bool = True
    mid_attn: bool = True
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    norm_groups: int = 32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        g = self.norm_groups
        h = nn.Conv(self.ch, (3, 3), dtype=self.dtype, name="conv_in")(x)
        res = self.resolution
        for i, mult in enumerate(self.ch_mult):
            for j in range(self.num_res_blocks):
                h = ResnetBlock(self.ch * mult, self.dropout, self.dtype, g, name=f"down_{i}_block_{j}")(h, train)
                if res in self.attn_resolutions:
                    h = AttnBlock(self.dtype, g, name=f"down_{i}_attn_{j}")(h)
            if i != len(self.ch_mult) - 1:
                h = Downsample(self.dtype, name=f"down_{i}_downsample")(h)
                res //= 2
        h = _mid_block(h, self.dropout, self.mid_attn, self.dtype, g, train)
        h = _norm(g, "norm_out", swish=True)(h)
        out_ch = 2 * self.z_channels if self.double_z else self.z_channels
        return nn.Conv(out_ch, (3, 3), dtype=self.dtype, name="conv_out")(h)


class Decoder(nn.Module):
    """Latent (B, h, w, z_channels) → image (B, h·f, w·f, out_ch). `return_features` also gives the input of
    `conv_out` (needed for the adaptive GAN weight, which differentiates w.r.t. that last kernel)."""

    ch: int = 128
    out_ch: int = 3
    ch_mult: Sequence[int] = (1, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = ()
    resolution: int = 256
    mid_attn: bool = True
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    norm_groups: int = 32

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False, return_features: bool = False):
        g = self.norm_groups
        h = nn.Conv(self.ch * self.ch_mult[-1], (3, 3), dtype=self.dtype, name="conv_in")(z)
        h = _mid_block(h, self.dropout, self.mid_attn, self.dtype, g, train)
        res = self.resolution // 2 ** (len(self.ch_mult) - 1)
        for i in reversed(range(len(self.ch_mult))):
            for j in range(self.num_res_blocks + 1):
                h = ResnetBlock(self.ch * self.ch_mult[i], self.dropout, self.dtype, g, name=f"up_{i}_block_{j}")(
                    h, train
                )
                if res in self.attn_resolutions:
                    h = AttnBlock(self.dtype, g, name=f"up_{i}_attn_{j}")(h)
            if i != 0:
                h = Upsample(self.dtype, name=f"up_{i}_upsample")(h)
                res *= 2
        h = _norm(g, "norm_out", swish=True)(h)
        out = nn.Conv(self.out_ch, (3, 3), dtype=self.dtype, name="conv_out")(h)
        return (out, h) if return_features else out


def _mid_block(h: jax.Array, dropout: float, attn: bool, dtype: Dtype, groups: int, train: bool) -> jax.Array:
    # Called inside the parent's compact scope, so the submodules are named under the parent.
    c = h.shape[-1]
    h = ResnetBlock(c, dropout, dtype, groups, name="mid_block_1")(h, train)
    if attn:
        h = AttnBlock(dtype, groups, name="mid_attn_1")(h)
    return ResnetBlock(c, dropout, dtype, groups, name="mid_block_2")(h, train)


@flax.struct.dataclass
class DiagonalGaussian:
    """Diagonal Gaussian posterior q(z|x); log-variance clamped to [-30, 20] as the reference."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) summed over latent dims, per example: (B,)."""
        return 0.5 * jnp.sum(self.mean**2 + jnp.exp(self.logvar) - 1.0 - self.logvar, axis=(1, 2, 3))


class _Autoencoder(nn.Module):
    """Fields shared by both stage-1 models (see configs/kl_f8.py for meanings)."""

    embed_dim: int = 4
    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = ()
    resolution: int = 256
    in_channels: int = 3
    z_channels: int = 4
    mid_attn: bool = True
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    norm_groups: int = 32
    # False drops the 1×1 conv (diffusers' use_quant_conv / use_post_quant_conv; the reference always has both);
    # then embed_dim must equal z_channels.
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def _decoder(self) -> Decoder:
        return Decoder(self.ch, self.in_channels, self.ch_mult, self.num_res_blocks, self.attn_resolutions,
                       self.resolution, self.mid_attn, self.dropout, self.dtype, self.norm_groups, name="decoder")

    def _quant_convs(self, quant_features: int) -> None:
        if not (self.use_quant_conv and self.use_post_quant_conv) and self.embed_dim != self.z_channels:
            raise ValueError(f"model.embed_dim={self.embed_dim} must equal model.z_channels={self.z_channels} "
                             "without quant_conv/post_quant_conv")
        self.quant_conv = nn.Conv(quant_features, (1, 1), dtype=self.dtype) if self.use_quant_conv else None
        self.post_quant_conv = nn.Conv(self.z_channels, (1, 1), dtype=self.dtype) if self.use_post_quant_conv else None

    def _quant(self, h: jax.Array) -> jax.Array:
        return h if self.quant_conv is None else self.quant_conv(h)

    def _post_quant(self, z: jax.Array) -> jax.Array:
        return z if self.post_quant_conv is None else self.post_quant_conv(z)

    def _encoder(self, double_z: bool) -> Encoder:
        return Encoder(self.ch, self.ch_mult, self.num_res_blocks, self.attn_resolutions, self.resolution,
                       self.z_channels, double_z, self.mid_attn, self.dropout, self.dtype, self.norm_groups,
                       name="encoder")


class AutoencoderKL(_Autoencoder):
    """KL-regularised autoencoder: encode → DiagonalGaussian over (B, H/f, W/f, embed_dim)."""

    def setup(self):
        self.encoder = self._encoder(double_z=True)
        self.decoder = self._decoder()
        self._quant_convs(2 * self.embed_dim)

    def encode(self, x: jax.Array, train: bool = False) -> DiagonalGaussian:
        moments = self._quant(self.encoder(x, train)).astype(jnp.float32)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: jax.Array, train: bool = False, return_features: bool = False):
        return self.decoder(self._post_quant(z), train, return_features)

    def encode_latent(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """What stage 2 diffuses: a posterior sample (with `key`) or its mode."""
        return self.latent_from_moments(self.encode_moments(x), key)

    def encode_moments(self, x: jax.Array) -> jax.Array:
        """The posterior's mean and (unclamped) log-variance, concatenated on channels (a latent cache stores it)."""
        return self._quant(self.encoder(x, False)).astype(jnp.float32)

    @staticmethod
    def latent_from_moments(moments: jax.Array, key: jax.Array | None = None) -> jax.Array:
        post = DiagonalGaussian.from_moments(moments)
        return post.mode() if key is None else post.sample(key)

    def decode_latent(self, z: jax.Array) -> jax.Array:
        return self.decode(z)

    def __call__(self, x: jax.Array, key: jax.Array | None = None, train: bool = False) -> dict[str, Any]:
        post = self.encode(x, train)
        z = post.mode() if key is None else post.sample(key)
        rec, feats = self.decode(z, train, return_features=True)
        return {"rec": rec, "posterior": post, "features": feats}


class VQModel(_Autoencoder):
    """Vector-quantised autoencoder. `encode_latent` gives PRE-quantisation latents (what stage 2 diffuses, as
    in the paper: the quantiser is absorbed into the decoder); `decode_latent` quantises first."""

    n_embed: int = 8192
    beta: float = 0.25
    legacy_beta: bool = False
    ema_decay: float | None = None  # None: codebook learned by gradient; else EMA (k-means style) updates.
    dead_code_threshold: float = 0.0  # EMA cluster size below which a code is restarted (needs ema_decay).

    def setup(self):
        self.encoder = self._encoder(double_z=False)
        self.decoder = self._decoder()
        self._quant_convs(self.embed_dim)
        self.quantize = VectorQuantizer(
            self.n_embed, self.embed_dim, self.beta, self.legacy_beta, self.ema_decay, self.dead_code_threshold
        )

    def encode(self, x: jax.Array, train: bool = False) -> jax.Array:
        return self._quant(self.encoder(x, train)).astype(jnp.float32)

    def decode(self, z: jax.Array, train: bool = False, return_features: bool = False):
        """Decode already-quantised latents."""
        return self.decoder(self._post_quant(z), train, return_features)

    def encode_latent(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        del key  # deterministic
        return self.encode(x)

    def encode_moments(self, x: jax.Array) -> jax.Array:
        """What a latent cache stores: the pre-quantisation latents themselves."""
        return self.encode(x)

    @staticmethod
    def latent_from_moments(moments: jax.Array, key: jax.Array | None = None) -> jax.Array:
        del key
        return moments

    def decode_latent(self, h: jax.Array) -> jax.Array:
        zq, _, _ = self.quantize(h)
        return self.decode(zq)

    def decode_code(self, indices: jax.Array) -> jax.Array:
        return self.decode(self.quantize.lookup(indices))

    def __call__(self, x: jax.Array, key: jax.Array | None = None, train: bool = False) -> dict[str, Any]:
        del key
        h = self.encode(x, train)
        zq, qloss, info = self.quantize(h, train=train)
        rec, feats = self.decode(zq, train, return_features=True)
        return {"rec": rec, "qloss": qloss, "features": feats, **info}


def build_autoencoder(cfg: Any) -> _Autoencoder:
    """Builds AutoencoderKL or VQModel from a `model` ConfigDict (field `type`: 'kl' or 'vq')."""
    kw = dict(
        embed_dim=cfg.embed_dim, ch=cfg.ch, ch_mult=tuple(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
        attn_resolutions=tuple(cfg.attn_resolutions), resolution=cfg.resolution, in_channels=cfg.in_channels,
        z_channels=cfg.z_channels, mid_attn=cfg.get("mid_attn", True), dropout=cfg.get("dropout", 0.0),
        dtype=jnp.dtype(cfg.get("dtype", "float32")), norm_groups=cfg.get("norm_groups", 32),
        use_quant_conv=cfg.get("use_quant_conv", True), use_post_quant_conv=cfg.get("use_post_quant_conv", True),
    )
    for m in cfg.ch_mult:
        if (cfg.ch * m) % kw["norm_groups"]:
            raise ValueError(f"model.ch × ch_mult ({cfg.ch}×{m}) must be divisible by model.norm_groups "
                             f"({kw['norm_groups']})")
    if cfg.type == "kl":
        return AutoencoderKL(**kw)
    if cfg.type == "vq":
        if cfg.get("dead_code_threshold", 0.0) > 0 and cfg.get("ema_decay") is None:
            raise ValueError("model.dead_code_threshold > 0 needs model.ema_decay (restarts act on the EMA codebook)")
        return VQModel(**kw, n_embed=cfg.n_embed, beta=cfg.get("beta", 0.25), legacy_beta=cfg.get("legacy_beta", False),
                       ema_decay=cfg.get("ema_decay"), dead_code_threshold=cfg.get("dead_code_threshold", 0.0))
    raise ValueError(f"model.type must be 'kl' or 'vq', got {cfg.type!r}")
