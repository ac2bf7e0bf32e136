"""LPIPS (Zhang et al. 2018) with a VGG16 trunk and the v0.1 linear heads, in Flax linen.

Semantics follow the reference `lpips` package as used by taming-transformers / latent-diffusion:
ScalingLayer -> VGG16 relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 -> unit-normalise channels ->
squared difference -> 1x1 linear head (no bias, non-negative weights) -> spatial mean -> sum over layers.
Pretrained weights come from `ldm_jax.models.lpips_weights.load_lpips_params`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

# (channels, number of 3x3 convs) per VGG16 block; a 2x2 max-pool precedes every block but the first.
VGG16_BLOCKS: tuple[tuple[int, int], ...] = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
# LPIPS ScalingLayer constants: map [-1, 1] inputs to the ImageNet-normalised range VGG was trained on.
LPIPS_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
LPIPS_SCALE = np.array([0.458, 0.448, 0.450], np.float32)
_NORM_EPS = 1e-10  # as the reference normalize_tensor


def vgg_conv_names() -> list[str]:
    """Flax names of the 13 VGG16 convs in forward order: conv1_1, conv1_2, conv2_1, ..., conv5_3."""
    return [f"conv{b + 1}_{j + 1}" for b, (_, n) in enumerate(VGG16_BLOCKS) for j in range(n)]


def lpips_param_shapes() -> dict[str, tuple[int, ...]]:
    """Flat '/'-joined variable names of `LPIPS` (including the 'params/' prefix) -> expected shapes."""
    shapes: dict[str, tuple[int, ...]] = {}
    names = iter(vgg_conv_names())
    c_in = 3
    for ch, n in VGG16_BLOCKS:
        for _ in range(n):
            name = next(names)
            shapes[f"params/vgg/{name}/kernel"] = (3, 3, c_in, ch)
            shapes[f"params/vgg/{name}/bias"] = (ch,)
            c_in = ch
    for k, (ch, _) in enumerate(VGG16_BLOCKS):
        shapes[f"params/lin{k}/kernel"] = (1, 1, ch, 1)
    return shapes


class VGG16Features(nn.Module):
    """torchvision VGG16 conv trunk (NHWC); returns the relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 taps."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> list[jnp.ndarray]:
        names = iter(vgg_conv_names())
        taps = []
        for b, (ch, n) in enumerate(VGG16_BLOCKS):
            if b > 0:
                # torch MaxPool2d(2, 2) floors odd sizes, as VALID pooling does.
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
            for _ in range(n):
                conv = nn.Conv(ch, (3, 3), padding=((1, 1), (1, 1)), dtype=jnp.float32,
                               param_dtype=jnp.float32, name=next(names))
                x = nn.relu(conv(x))
            taps.append(x)
        return taps


def _unit_normalize(feat: jnp.ndarray) -> jnp.ndarray:
    """feat / (||feat||_channels + eps), with a zero (not NaN) gradient where a pixel's features are all 0."""
    sq = jnp.sum(feat * feat, axis=-1, keepdims=True)
    # sqrt'(0) is inf and inf * 0 = NaN in the backward pass; ReLU features can be all-zero at a pixel.
    pos = sq > 0
    norm = jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)
    return feat / (norm + _NORM_EPS)


def _nonneg_init(key, shape, dtype=jnp.float32):
    """Uniform-average head init (only used without pretrained weights; the v0.1 heads are non-negative)."""
    del key
    return jnp.full(shape, 1.0 / shape[-2], dtype)


def _prepare(img: jnp.ndarray, name: str) -> jnp.ndarray:
    """Cast to float32, check NHWC with 1 or 3 channels, repeat grayscale to RGB, apply the ScalingLayer."""
    if img.ndim != 4 or img.shape[-1] not in (1, 3):
        raise ValueError(f"LPIPS input {name} must be NHWC with 1 or 3 channels; got shape {img.shape}")
    img = img.astype(jnp.float32)
    if img.shape[-1] == 1:
        img = jnp.repeat(img, 3, axis=-1)
    return (img - LPIPS_SHIFT) / LPIPS_SCALE


class LPIPS(nn.Module):
    """LPIPS-VGG v0.1 distance: `__call__(x, y) -> (B,)` for NHWC images in [-1, 1] (1 or 3 channels)."""

    @nn.compact
    def __call__(self, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs must have equal shapes; got {x.shape} and {y.shape}")
        x, y = _prepare(x, "x"), _prepare(y, "y")
        b = x.shape[0]
        # One trunk pass over both images: one set of convs to compile and dispatch instead of two.
        feats = VGG16Features(name="vgg")(jnp.concatenate([x, y], axis=0))
        total = jnp.zeros((b,), jnp.float32)
        for k, f in enumerate(feats):
            diff = (_unit_normalize(f[:b]) - _unit_normalize(f[b:])) ** 2
            head = nn.Conv(1, (1, 1), use_bias=False, kernel_init=_nonneg_init, dtype=jnp.float32,
                           param_dtype=jnp.float32, name=f"lin{k}")
            total = total + jnp.mean(head(diff), axis=(1, 2, 3))
        return total
