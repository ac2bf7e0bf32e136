"""Fashion-MNIST from the idx files that Debian's `dataset-fashion-mnist` package ships (no internet needed)."""

from __future__ import annotations

import gzip
import os

import numpy as np

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MISSING_HELP = (
    "Fashion-MNIST not found at {root}: run `apt-get install dataset-fashion-mnist` (as root), set "
    "LDM_JAX_FASHION_MNIST to a folder with the four *-ubyte.gz files, or use data.name='tfds:fashion_mnist'"
)


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    if (magic >> 8) != 0x08:  # 0x08 = unsigned byte
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {magic:#x})")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated idx file ({arr.size} values, header says {shape})")
    return arr.reshape(shape)


def fashion_mnist_root(root: str | None = None) -> str:
    return root or os.environ.get("LDM_JAX_FASHION_MNIST", DEFAULT_ROOT)


def load_fashion_mnist(split: str = "train", root: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 (N, 28, 28, 1), labels int32 (N,)) for split 'train' (60k) or 'test' (10k)."""
    if split not in _FILES:
        raise ValueError(f"data.split must be one of {sorted(_FILES)} for fashion_mnist, got {split!r}")
    root = fashion_mnist_root(root)
    img_file, lbl_file = (os.path.join(root, f) for f in _FILES[split])
    for f in (img_file, lbl_file):
        if not os.path.exists(f):
            raise FileNotFoundError(MISSING_HELP.format(root=root))
    images = _read_idx(img_file)[..., None]
    labels = _read_idx(lbl_file).astype(np.int32)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels for split {split!r}")
    return images, labels
