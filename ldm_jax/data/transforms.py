"""Per-example transformations of the input pipeline: channel conversion, geometry, flips, captions; pure
functions of the example and a NumPy Generator, so they run the same in any worker process."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ldm_jax.data.sources import resize_uint8

PREPROCESS_MODES = ("pad", "resize", "random_crop")
PERM_TAG, AUG_TAG, CAP_TAG = 0, 1, 2  # separate SeedSequence streams: permutations, augmentation, captions


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (H, W, C) -> (H, W, channels): gray is repeated to RGB; RGB -> gray uses PIL's ITU-R 601 luma."""
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] in (2, 4):  # drop alpha
        image = image[..., :-1]
    c = image.shape[-1]
    if c == channels:
        return image
    if channels == 3 and c == 1:
        return np.repeat(image, 3, axis=-1)
    if channels == 1 and c == 3:
        rgb = image.astype(np.uint32)  # same integer formula as PIL convert("L"); exact for R == G == B
        luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
        return luma.astype(np.uint8)[..., None]
    raise ValueError(f"data.channels: cannot convert a {c}-channel image to {channels} channels")


def _pad_or_crop(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Centres `image` on an H x W canvas of zeros (background), cropping the centre of larger sides."""
    out = image
    for axis in (0, 1):
        n, size = out.shape[axis], hw[axis]
        if n > size:
            start = (n - size) // 2
            out = out[start:start + size] if axis == 0 else out[:, start:start + size]
        elif n < size:
            before = (size - n) // 2
            pad = [(0, 0)] * 3
            pad[axis] = (before, size - n - before)
            out = np.pad(out, pad)
    return out


@dataclasses.dataclass(frozen=True)
class Preprocessor:
    """Maps uint8 (H, W, C) to uint8 (resolution, width, channels); `augment` enables randomness."""

    resolution: int
    channels: int = 3
    mode: str = "pad"
    random_flip: bool = False
    augment: bool = True
    width: int | None = None  # None: square images

    def __post_init__(self):
        if not isinstance(self.resolution, (int, np.integer)) or self.resolution < 1:
            raise ValueError(f"data.resolution must be a positive int, got {self.resolution!r}")
        if self.width is not None and (not isinstance(self.width, (int, np.integer)) or self.width < 1):
            raise ValueError(f"data.width must be a positive int or None, got {self.width!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 or 3, got {self.channels!r}")
        if self.mode not in PREPROCESS_MODES:
            raise ValueError(f"data.preprocess must be one of {PREPROCESS_MODES}, got {self.mode!r}")

    @property
    def needs_rng(self) -> bool:
        """Whether outputs depend on random numbers (then `__call__` needs an rng)."""
        return self.augment and (self.random_flip or self.mode == "random_crop")

    def _draws(self, rng: np.random.Generator | None) -> np.ndarray:
        # Always the same three numbers (crop y, crop x, flip), so one augmentation never shifts another's randomness.
        return rng.random(3) if (self.needs_rng and rng is not None) else np.array([0.5, 0.5, 1.0])

    def flips(self, rng: np.random.Generator | None) -> bool:
        """Whether `__call__` with this rng flips the image (a latent cache picks its stored flipped view)."""
        return bool(self.random_flip and self.augment and self._draws(rng)[2] < 0.5)

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Channel conversion, geometry ('pad' | resize to cover H x W then centre/random crop), flip."""
        r, rw = self.resolution, self.width or self.resolution
        u = self._draws(rng)
        image = to_channels(np.asarray(image), self.channels)
        if self.mode == "pad":
            image = _pad_or_crop(image, (r, rw))
        else:
            h, w = image.shape[:2]
            scale = max(r / h, rw / w)
            nh, nw = max(r, round(h * scale)), max(rw, round(w * scale))
            image = resize_uint8(image, nh, nw)
            if self.mode == "random_crop" and self.augment:
                y, x = int(u[0] * (nh - r + 1)), int(u[1] * (nw - rw + 1))
            else:
                y, x = (nh - r) // 2, (nw - rw) // 2
            image = image[y:y + r, x:x + rw]
        if self.random_flip and self.augment and u[2] < 0.5:
            image = image[:, ::-1]
        return image


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1] (0 -> -1, 255 -> 1)."""
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


_FLOAT_OF_UINT8 = to_float(np.arange(256, dtype=np.uint8))


def as_float(images: Any) -> Any:
    """`to_float` for numpy or jax arrays, on the device inside a jitted step, bit for bit: a 256-entry lookup (XLA
    turns the division into a multiply by the reciprocal, which rounds 205 of the 256 values differently). Float
    input passes unchanged (batches built with `uint8_images=False`, tests, benchmarks)."""
    if images.dtype != np.uint8:
        return images
    import jax.numpy as jnp

    return jnp.take(jnp.asarray(_FLOAT_OF_UINT8), images.astype(jnp.int32), axis=0)


def pick_caption(captions: tuple[str, ...], seed: int, step: int, row: int) -> str:
    """One of an example's captions: a pure function of (seed, step, global row)."""
    if len(captions) == 1:
        return captions[0]
    return captions[int(np.random.default_rng([seed, CAP_TAG, step, row]).integers(len(captions)))]
