"""Judging text-to-image samples of Fashion-MNIST pairs (`data.name='fashion_mnist_pairs'`, data/pairs.py).

Each 32×64 sample is cut into its left and right 32×32 halves; the offline Fashion-MNIST classifier names each.
- `pair_accuracy_seen` / `pair_accuracy_heldout`: both halves right, over the 90 pairs seen in training / the 10
  held-out pairs (A, (A + 3) mod 10) that the model never saw (chance: 0.01);
- `half_accuracy`: share of halves right;
- `swap_consistency`: for A != B, share of (prompt(A, B), prompt(B, A)) sample pairs drawn from the same noise whose
  two halves swap (the classifier's left of one is the right of the other and vice versa).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ldm_jax.data.pairs import NUM_CLASSES, TEMPLATES, all_pairs, heldout_pairs, pair_captions


def eval_plan(samples_per_pair: int) -> dict[str, np.ndarray]:
    """The prompts to sample: every ordered pair × `samples_per_pair`, the template cycling with k. `noise_id` is
    shared by (A, B, k) and (B, A, k), so a swap is judged on samples from the same starting noise."""
    rows = [(a, b, k) for a, b in all_pairs() for k in range(samples_per_pair)]
    a, b, k = (np.array(c, np.int32) for c in zip(*rows, strict=True))
    template = k % len(TEMPLATES)
    prompts = np.array([pair_captions(int(x), int(y))[int(t)] for x, y, t in zip(a, b, template, strict=True)])
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    return {"a": a, "b": b, "k": k, "prompt": prompts, "noise_id": (k * NUM_CLASSES + lo) * NUM_CLASSES + hi}


def split_halves(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 32, 64, C) → left and right (N, 32, 32, C)."""
    w = images.shape[2] // 2
    return images[:, :, :w], images[:, :, w:]


def judge_plan(plan: dict[str, np.ndarray], draw: Callable[[list[str], np.ndarray], np.ndarray], batch: int,
               logits_fn: Callable) -> tuple[np.ndarray, np.ndarray]:
    """The classifier's (left, right) classes for every row of `plan`. `draw(prompts, noise_ids)` returns images
    (batch, 32, 64, C) for exactly `batch` rows: the last chunk is padded with empty prompts and noise id 0 (one
    compiled batch size), and the padding's images are dropped."""
    left, right = [], []
    for s in range(0, len(plan["a"]), batch):
        prompts, ids = list(plan["prompt"][s:s + batch]), plan["noise_id"][s:s + batch]
        pad = batch - len(ids)
        images = np.asarray(draw(prompts + [""] * pad, np.concatenate([ids, np.zeros(pad, ids.dtype)])))
        for out, half in zip((left, right), split_halves(images[: len(ids)]), strict=True):
            out.append(np.argmax(np.asarray(logits_fn(half)), axis=-1))
    return np.concatenate(left), np.concatenate(right)


def pair_metrics(pred_left: np.ndarray, pred_right: np.ndarray, plan: dict[str, np.ndarray]) -> dict[str, float]:
    a, b, k = plan["a"], plan["b"], plan["k"]
    both = (pred_left == a) & (pred_right == b)
    held = np.zeros(len(a), bool)
    for x, y in heldout_pairs():
        held |= (a == x) & (b == y)
    index = {(int(x), int(y), int(z)): i for i, (x, y, z) in enumerate(zip(a, b, k, strict=True))}
    swaps = [(i, index[(int(b[i]), int(a[i]), int(k[i]))]) for i in range(len(a)) if a[i] < b[i]]
    consistent = [pred_left[i] == pred_right[j] and pred_right[i] == pred_left[j] for i, j in swaps]
    return {
        "pair_accuracy_seen": float(both[~held].mean()),
        "pair_accuracy_heldout": float(both[held].mean()),
        "half_accuracy": float(np.concatenate([pred_left == a, pred_right == b]).mean()),
        "swap_consistency": float(np.mean(consistent)),
        "pair_eval_samples": float(len(a)),
    }


def grid_prompts() -> list[str]:
    """Ten grid rows: five seen pairs then five held-out pairs (the first template)."""
    seen = [(7, 8), (0, 1), (9, 4), (3, 5), (8, 2)]
    held = heldout_pairs()[:5]
    return [pair_captions(a, b)[0] for a, b in seen + held]
