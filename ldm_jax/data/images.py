"""Image arrays ↔ files: [-1, 1] floats to uint8, grids, atomic PNG writes; img2img sources and starting noise."""

from __future__ import annotations

import os
import tempfile

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats (…, H, W, C) → uint8 [0, 255] with rounding."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, nrow: int, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """uint8 (N, H, W, C) → one (rows·(H+p)+p, nrow·(W+p)+p, C) image, row-major."""
    n, h, w, c = images.shape
    rows = -(-n // nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = img
    return grid


def save_png(image: np.ndarray, path: str) -> None:
    """Writes a uint8 HWC image atomically (temp file + rename: a crash never leaves a half-written PNG)."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=directory)
    os.close(fd)
    try:
        Image.fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_grid(images: np.ndarray, path: str, nrow: int) -> None:
    """[-1, 1] float images (N, H, W, C) → a PNG grid."""
    save_png(make_grid(to_uint8(images), nrow), path)


def load_images(path: str, height: int, width: int, channels: int) -> np.ndarray:
    """An image file, or every image under a folder (sorted), resized to cover height × width and centre-cropped, as
    float32 (N, height, width, channels) in [-1, 1] (sample.py --init_image)."""
    from ldm_jax.data.pipeline import Preprocessor, to_float
    from ldm_jax.data.sources import DECODE_ERRORS, ImageFolderSource, decode_image

    if os.path.isdir(path):
        src = ImageFolderSource(path)
        raw = [src.get(i)["image"] for i in range(len(src))]
    elif os.path.isfile(path):
        try:
            raw = [decode_image(path)]
        except DECODE_ERRORS as e:
            raise ValueError(f"--init_image: cannot read {path} ({type(e).__name__})") from None
    else:
        raise FileNotFoundError(f"--init_image: no such file or folder: {path}")
    prep = Preprocessor(height, channels, "resize", augment=False, width=width)
    return to_float(np.stack([prep(im) for im in raw]))


def load_npy(path: str, flag: str = "--init_noise") -> np.ndarray:
    """A float32 array from a .npy file; never a pickle."""
    try:
        return np.load(path, allow_pickle=False).astype(np.float32)
    except (OSError, ValueError) as e:
        raise ValueError(f"{flag}: cannot read {path} as a .npy array ({str(e).splitlines()[0]})") from None
