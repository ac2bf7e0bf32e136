"""Image arrays ↔ PNG files: [-1, 1] floats to uint8, grids, atomic writes."""

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
