"""Per-image reconstruction metrics (PSNR, SSIM) for NHWC images in [-1, 1], jit-able jnp code."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# SSIM constants of Wang et al. 2004 as used by skimage with gaussian_weights=True.
_SSIM_SIGMA = 1.5
_SSIM_TRUNCATE = 3.5  # skimage's value: radius int(3.5 * 1.5 + 0.5) = 5, i.e. an 11-tap window
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03


def _check_pair(x: jax.Array, y: jax.Array) -> None:
    if x.shape != y.shape:
        raise ValueError(f"image metrics need equal shapes, got {x.shape} and {y.shape}")
    if x.ndim != 4:
        raise ValueError(f"image metrics need NHWC images (4 dims), got shape {x.shape}")


def psnr(x: jax.Array, y: jax.Array, data_range: float = 2.0) -> jax.Array:
    """Peak signal-to-noise ratio in dB per image, (B,); inf where the images are identical."""
    _check_pair(x, y)
    diff = x.astype(jnp.float32) - y.astype(jnp.float32)
    mse = jnp.mean(jnp.square(diff), axis=(1, 2, 3))
    return 10.0 * jnp.log10(data_range**2 / mse)


def _gaussian_taps(sigma: float = _SSIM_SIGMA, truncate: float = _SSIM_TRUNCATE) -> np.ndarray:
    """1-D normalised Gaussian taps exactly as scipy.ndimage.gaussian_filter builds them."""
    radius = int(truncate * sigma + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (t / sigma) ** 2)
    return (w / w.sum()).astype(np.float32)


def _blur_valid(img: jax.Array, taps: jax.Array) -> jax.Array:
    """Separable Gaussian filter on (N, H, W, 1) keeping only windows fully inside the image.

    skimage filters with reflect padding and then crops the filter radius, which leaves exactly the
    'valid' positions, so padding never influences the result.
    """
    k = taps.shape[0]
    dn = ("NHWC", "HWIO", "NHWC")
    hi = jax.lax.Precision.HIGHEST  # local means of squares cancel badly at reduced matmul precision
    out = jax.lax.conv_general_dilated(img, taps.reshape(k, 1, 1, 1), (1, 1), "VALID",
                                       dimension_numbers=dn, precision=hi)
    return jax.lax.conv_general_dilated(out, taps.reshape(1, k, 1, 1), (1, 1), "VALID",
                                        dimension_numbers=dn, precision=hi)


def ssim(x: jax.Array, y: jax.Array, data_range: float = 2.0) -> jax.Array:
    """Mean SSIM per image, (B,): 11x11 Gaussian window (sigma 1.5), per channel then averaged (skimage)."""
    _check_pair(x, y)
    taps_np = _gaussian_taps()
    b, h, w, c = x.shape
    if h < taps_np.shape[0] or w < taps_np.shape[0]:
        raise ValueError(f"ssim needs images of at least {taps_np.shape[0]}x{taps_np.shape[0]}, got {h}x{w}")
    taps = jnp.asarray(taps_np)
    # Channels become batch entries so one single-channel filter serves all of them.
    to_planes = lambda a: jnp.transpose(a.astype(jnp.float32), (0, 3, 1, 2)).reshape(b * c, h, w, 1)
    x1, y1 = to_planes(x), to_planes(y)
    stacked = jnp.concatenate([x1, y1, x1 * x1, y1 * y1, x1 * y1], axis=0)
    ux, uy, uxx, uyy, uxy = jnp.split(_blur_valid(stacked, taps), 5, axis=0)
    vx = uxx - ux * ux  # population covariance (use_sample_covariance=False)
    vy = uyy - uy * uy
    vxy = uxy - ux * uy
    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    per_plane = jnp.mean(s, axis=(1, 2, 3))
    return jnp.mean(per_plane.reshape(b, c), axis=1)
