"""Fashion-MNIST pairs: two garments side by side with a caption naming both and their places.

Image 32×64×1: garment A (left) and B (right), each 28×28 padded to 32×32. Captions: four templates that name the
pair in either order ("a bag on the left and a sneaker on the right", "a sneaker on the right and a bag on the
left", ...), so a model must read word order and "left"/"right", not a bag of class words. The ten ordered pairs
(A, (A + 3) mod 10) never appear in the training split, as images or captions: `pair_accuracy_heldout` measures
composition rather than memorised pairs. Example i is a pure function of (split, i).
"""

from __future__ import annotations

import numpy as np

from ldm_jax.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from ldm_jax.data.text import article

NUM_CLASSES = len(CLASS_NAMES)
HALF = 32  # each garment's square
TEMPLATES = (
    "{a} on the left and {b} on the right",
    "{b} on the right and {a} on the left",
    "{a} to the left of {b}",
    "{b} to the right of {a}",
)


def heldout_pairs() -> list[tuple[int, int]]:
    """The ordered (left, right) class pairs kept out of training: (A, (A + 3) mod 10)."""
    return [(a, (a + 3) % NUM_CLASSES) for a in range(NUM_CLASSES)]


def all_pairs() -> list[tuple[int, int]]:
    return [(a, b) for a in range(NUM_CLASSES) for b in range(NUM_CLASSES)]


def pair_captions(a: int, b: int) -> tuple[str, ...]:
    """The four captions of left class `a` and right class `b`."""
    na, nb = CLASS_NAMES[a], CLASS_NAMES[b]
    return tuple(t.format(a=f"{article(na)} {na}", b=f"{article(nb)} {nb}") for t in TEMPLATES)


def pair_image(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two uint8 28×28×1 garments → uint8 32×64×1 (each padded by 2 px of background)."""
    pad = ((2, 2), (2, 2), (0, 0))
    return np.concatenate([np.pad(left, pad), np.pad(right, pad)], axis=1)


class FashionMNISTPairsSource:
    """`num_examples` random pairs from a Fashion-MNIST split. The class pair is uniform over the allowed ordered
    pairs (90 in 'train': the held-out ten excluded; all 100 otherwise), then one random image of each class.
    Label = 10 A + B; captions = the four templates."""

    has_captions = True
    _SPLIT_TAG = {"train": 0, "test": 1}

    def __init__(self, split: str = "train", num_examples: int = 60_000, root: str | None = None):
        if split not in self._SPLIT_TAG:
            raise ValueError(f"data split must be 'train' or 'test' for fashion_mnist_pairs, got {split!r}")
        self.images, labels = load_fashion_mnist(split, root)
        self.by_class = [np.flatnonzero(labels == k) for k in range(NUM_CLASSES)]
        held = set(heldout_pairs())
        self.pairs = [p for p in all_pairs() if split != "train" or p not in held]
        self.num_examples, self._tag = int(num_examples), self._SPLIT_TAG[split]

    def __len__(self) -> int:
        return self.num_examples

    def get(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"pairs index {index} out of range [0, {self.num_examples})")
        u = np.random.default_rng([0x9A125, self._tag, index]).random(3)
        a, b = self.pairs[int(u[0] * len(self.pairs))]
        ia = self.by_class[a][int(u[1] * len(self.by_class[a]))]
        ib = self.by_class[b][int(u[2] * len(self.by_class[b]))]
        return {"image": pair_image(self.images[ia], self.images[ib]), "label": np.int32(a * NUM_CLASSES + b),
                "captions": pair_captions(a, b)}

    def caption_corpus(self, limit: int = 0) -> list[str]:
        return [c for a, b in self.pairs for c in pair_captions(a, b)]
