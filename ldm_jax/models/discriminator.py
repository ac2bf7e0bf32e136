"""PatchGAN discriminator (pix2pix NLayerDiscriminator, as in taming-transformers) in Flax linen."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.norms import GroupNorm

_NORMS = ("batch", "group", "none")


def _scale_init(key, shape, dtype=jnp.float32):
    """Norm scale ~ N(1, 0.02), as the reference weights_init."""
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: n_layers stride-2 4x4 convs, a stride-1 4x4 conv, a 1-channel 4x4 conv -> logits (B,h,w,1).

    Spatial size per 4x4/pad-1 conv: stride 2 gives H/2, stride 1 gives H-1 (32x32, n_layers=3 -> 2x2).
    """

    ndf: int = 64
    n_layers: int = 3
    norm: str = "batch"

    def _norm(self, x: jnp.ndarray, train: bool, i: int) -> jnp.ndarray:
        if self.norm == "batch":
            # Under jax.jit with a batch-sharded global array the batch mean/var are reductions over the
            # global batch axis, so XLA inserts the cross-device all-reduce itself: statistics are those of
            # the whole global batch (like SyncBatchNorm; the reference's DDP BatchNorm used per-GPU stats).
            # momentum 0.9 here == torch momentum 0.1; eps 1e-5 as torch.
            return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                scale_init=_scale_init, name=f"norm{i}")(x)
        if self.norm == "group":
            groups = math.gcd(32, x.shape[-1])  # 32 groups as elsewhere, fewer for tiny test widths
            return GroupNorm(num_groups=groups, epsilon=1e-5, scale_init=_scale_init, name=f"norm{i}")(x)
        return x

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        if self.norm not in _NORMS:
            raise ValueError(f"discriminator norm must be one of {_NORMS}; got {self.norm!r}")
        if self.n_layers < 1:
            raise ValueError(f"discriminator n_layers must be >= 1; got {self.n_layers}")
        w_init = nn.initializers.normal(0.02)
        normed_bias = self.norm == "none"  # a conv followed by a norm needs no bias (norm has its own shift)

        def conv(features: int, stride: int, use_bias: bool, i: int) -> nn.Conv:
            return nn.Conv(features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                           use_bias=use_bias, kernel_init=w_init, name=f"conv{i}")

        x = x.astype(jnp.float32)
        x = nn.leaky_relu(conv(self.ndf, 2, True, 0)(x), 0.2)
        for n in range(1, self.n_layers + 1):
            stride = 2 if n < self.n_layers else 1
            x = conv(self.ndf * min(2**n, 8), stride, normed_bias, n)(x)
            x = nn.leaky_relu(self._norm(x, train, n), 0.2)
        return conv(1, 1, True, self.n_layers + 1)(x)
