"""A latent cache: a data set encoded once by a frozen stage 1, so stage 2 trains without running the encoder.

DIR/{split}/ holds `moments.npy` float32 (N, V, h, w, C') memory-mapped for random access, where V = 2 when the
horizontal flip is stored as a second view (data.random_flip) and C' is what the step needs to be exact: KL, the
posterior's mean and log-variance (2 x embed_dim channels; the step still draws its own posterior sample from its
key); VQ, the pre-quantisation latents. Beside it `labels.npy`, `captions.jsonl` (every caption of each example) and
`info.json` (the first stage and data settings it was made with; written last, so a half-written cache is never
complete). `python -m ldm_jax.cache_latents` writes one; `data.latents=DIR` trains from it.
"""

from __future__ import annotations

import json
import os

import numpy as np

FORMAT = "ldm_jax.latents/1"
# data fields a cache fixes: training with other values would see other images than the cache holds.
DATA_FIELDS = ("name", "path", "data_dir", "resolution", "width", "channels", "preprocess", "image_key",
               "label_key", "caption_key", "photo_names", "num_crops")


class LatentCacheWriter:
    """Writes split `split` of a cache of `n` examples, batch by batch in example order."""

    def __init__(self, directory: str, split: str, n: int, moment_shape: tuple[int, int, int], views: int,
                 with_captions: bool):
        self.dir = os.path.join(directory, split)
        os.makedirs(self.dir, exist_ok=True)
        info = os.path.join(self.dir, "info.json")
        if os.path.exists(info):
            os.remove(info)  # being rewritten: not complete until close()
        self.n, self.count = n, 0
        self.moments = np.lib.format.open_memmap(os.path.join(self.dir, "moments.npy"), mode="w+",
                                                 dtype=np.float32, shape=(n, views, *moment_shape))
        self.labels = np.zeros(n, np.int32)
        self.captions = open(os.path.join(self.dir, "captions.jsonl"), "w") if with_captions else None

    def add(self, moments: np.ndarray, labels: np.ndarray, captions: list[tuple[str, ...]] | None) -> None:
        k = min(len(moments), self.n - self.count)
        self.moments[self.count:self.count + k] = moments[:k]
        self.labels[self.count:self.count + k] = labels[:k]
        if self.captions is not None:
            for caps in captions[:k]:
                self.captions.write(json.dumps(list(caps)) + "\n")
        self.count += k

    def close(self, info: dict) -> None:
        if self.count != self.n:
            raise ValueError(f"latent cache: {self.count} of {self.n} examples written")
        self.moments.flush()
        del self.moments
        np.save(os.path.join(self.dir, "labels.npy"), self.labels)
        if self.captions is not None:
            self.captions.close()
        path = os.path.join(self.dir, "info.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"format": FORMAT, "num_examples": self.n, **info}, f, indent=1)
        os.replace(path + ".tmp", path)


class LatentSource:
    """Random access to a cache split: `get(i)` -> dict(moments=float32 (V, h, w, C'), label, [captions])."""

    def __init__(self, directory: str, split: str):
        self.dir = os.path.join(directory, split)
        path = os.path.join(self.dir, "info.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data.latents: no complete latent cache for split {split!r} at {self.dir!r} "
                                    "(write it with python -m ldm_jax.cache_latents)")
        with open(path) as f:
            self.info = json.load(f)
        if self.info.get("format") != FORMAT:
            raise ValueError(f"data.latents: {path} is not an ldm_jax latent cache")
        self.moments = np.load(os.path.join(self.dir, "moments.npy"), mmap_mode="r")
        self.labels = np.load(os.path.join(self.dir, "labels.npy"))
        if len(self.moments) != self.info["num_examples"] or len(self.labels) != len(self.moments):
            raise ValueError(f"data.latents: {self.dir} holds {len(self.moments)} latents, info.json says "
                             f"{self.info['num_examples']}")
        self.views = int(self.moments.shape[1])
        self.classes = list(self.info.get("classes", []))
        self._captions = None
        cap_path = os.path.join(self.dir, "captions.jsonl")
        if os.path.isfile(cap_path):
            with open(cap_path) as f:
                self._captions = [tuple(json.loads(line)) for line in f]
        self.has_captions = self._captions is not None

    def __len__(self) -> int:
        return len(self.moments)

    def caption_corpus(self, limit: int = 100_000) -> list[str]:
        caps = self._captions or []
        return [c for group in (caps if limit <= 0 else caps[:limit]) for c in group if c]

    def get(self, index: int) -> dict:
        ex = {"moments": np.asarray(self.moments[index]), "label": np.int32(self.labels[index])}
        if self._captions is not None:
            ex["captions"] = self._captions[index] or ("",)
        return ex

    def __getstate__(self) -> dict:  # worker processes re-open the memory map
        return {k: v for k, v in self.__dict__.items() if k != "moments"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.moments = np.load(os.path.join(self.dir, "moments.npy"), mmap_mode="r")
