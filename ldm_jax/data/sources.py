"""Random-access example sources: `len(src)` and `src.get(i) -> dict(image=uint8 (H, W, C), label=int32)`, plus
`captions` (a tuple of str; the pipeline picks one per example) from sources with `has_captions`."""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import warnings
from collections.abc import Sequence
from functools import cache

import numpy as np
from PIL import Image

from ldm_jax.data.captions import METADATA_FILES, CaptionStats, decode_text, note_problem, read_metadata
from ldm_jax.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from ldm_jax.data.text import class_captions

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# skimage.data loaders that ship inside the wheel (no pooch download) and show natural scenes or textures.
DEFAULT_PHOTOS = (
    "astronaut", "camera", "cat", "chelsea", "coffee", "rocket", "coins", "moon", "brick", "grass", "gravel",
    "clock", "hubble_deep_field", "immunohistochemistry", "retina",
)
# What PIL raises on unreadable files: unidentified/truncated -> OSError; some broken PNGs -> SyntaxError.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _example(image: np.ndarray, label: int, captions: tuple[str, ...] | None = None) -> dict:
    ex = {"image": image, "label": np.int32(label)}
    if captions is not None:
        ex["captions"] = captions
    return ex


def resize_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resizes uint8 (H, W, C) with PIL: area averaging (BOX) when shrinking, bicubic when enlarging."""
    h, w, c = image.shape
    if (h, w) == (height, width):
        return image
    resample = Image.BOX if (height <= h and width <= w) else Image.BICUBIC
    planes = [np.asarray(Image.fromarray(image[..., k]).resize((width, height), resample)) for k in range(c)]
    return np.stack(planes, axis=-1)


class InMemorySource:
    """Arrays held in memory: images uint8 (N, H, W, C), labels int (N,)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
            raise ValueError(f"InMemorySource wants uint8 (N,H,W,C) images and N labels, got {images.shape} "
                             f"{images.dtype} and {len(labels)} labels")
        self.images, self.labels = images, np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self.images)

    def get(self, index: int) -> dict:
        """Returns example `index` (views into the arrays: do not modify in place)."""
        return _example(self.images[index], self.labels[index])


class FashionMNISTSource(InMemorySource):
    """Fashion-MNIST split ('train' 60k / 'test' 10k), 28x28x1 uint8, labels 0..9; caption: the class caption."""

    has_captions = True
    CAPTIONS = tuple(class_captions(CLASS_NAMES))

    def __init__(self, split: str = "train", root: str | None = None):
        super().__init__(*load_fashion_mnist(split, root))

    def get(self, index: int) -> dict:
        ex = super().get(index)
        ex["captions"] = (self.CAPTIONS[int(ex["label"])],)
        return ex

    def caption_corpus(self, limit: int = 0) -> list[str]:
        return list(self.CAPTIONS)


@cache
def _load_photo(name: str) -> np.ndarray:
    """Loads one skimage.data photo as uint8 RGB (grayscale -> 3 channels, alpha dropped)."""
    if importlib.util.find_spec("skimage") is None:
        raise ImportError("data.name 'photos' needs scikit-image: pip install scikit-image")
    import skimage.data

    loader = getattr(skimage.data, name, None)
    if name.startswith("_") or not callable(loader):
        raise ValueError(f"data.photo_names: {name!r} is not a skimage.data loader")
    try:
        img = np.asarray(loader())
    except Exception as e:  # loaders outside the wheel need pooch + network
        raise ValueError(f"data.photo_names: skimage.data.{name} cannot be loaded offline "
                         f"({type(e).__name__})") from None
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise ValueError(f"data.photo_names: skimage.data.{name} is not uint8 ({img.shape} {img.dtype})")
    if img.ndim == 2:
        img = img[..., None]
    img = img[..., :3]
    return np.ascontiguousarray(np.broadcast_to(img, img.shape[:2] + (3,))) if img.shape[-1] == 1 else img


class PhotoSource:
    """Deterministic random crops of the natural photos scikit-image ships: a small offline RGB image set.

    Crop i comes from photo i % len(names) (its label); it covers a square of crop*s pixels,
    s ~ U(scale_range) capped by the photo's shorter side, at a random position, resized to crop x crop.
    A pure function of (seed, i).
    """

    def __init__(self, names: Sequence[str] | None = None, crop: int = 64, num_crops: int = 1024,
                 seed: int = 0, scale_range: tuple[float, float] = (1.0, 3.0)):
        self.names = tuple(names) if names else DEFAULT_PHOTOS
        if crop < 1 or num_crops < 1:
            raise ValueError(f"PhotoSource: crop ({crop}) and num_crops ({num_crops}) must be positive")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"PhotoSource: bad scale_range {scale_range}")
        self.crop, self.num_crops, self.seed = int(crop), int(num_crops), int(seed)
        self.scale_range = scale_range
        for name in self.names:  # fail early, with the field name, on an unusable photo
            _load_photo(name)

    def __len__(self) -> int:
        return self.num_crops

    def get(self, index: int) -> dict:
        """Returns crop `index` (uint8 crop x crop x 3) and the photo's index as label."""
        if not 0 <= index < self.num_crops:
            raise IndexError(f"PhotoSource index {index} out of range [0, {self.num_crops})")
        photo_idx = index % len(self.names)
        photo = _load_photo(self.names[photo_idx])
        h, w = photo.shape[:2]
        u = np.random.default_rng([self.seed, index]).random(3)
        scale = self.scale_range[0] + u[0] * (self.scale_range[1] - self.scale_range[0])
        side = max(1, min(h, w, int(round(self.crop * scale))))
        y, x = int(u[1] * (h - side + 1)), int(u[2] * (w - side + 1))
        patch = resize_uint8(photo[y:y + side, x:x + side], self.crop, self.crop)
        return _example(patch, photo_idx)


_LOGGED_BAD_FILES = 10  # unreadable files named in the log; later ones are only counted


def decode_image(file: str) -> np.ndarray:
    """An image file as uint8 (H, W, 3): palettes expanded, alpha dropped, 16-bit gray scaled (not clipped)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # palette-transparency / EXIF warnings are noise here
        with Image.open(file) as im:
            if im.mode.startswith("I"):  # 16/32-bit grayscale: PIL's RGB conversion would clip at 255
                gray = np.asarray(im, dtype=np.float64) / 257.0  # 65535 -> 255
                gray = np.clip(np.round(gray), 0, 255).astype(np.uint8)
                return np.repeat(gray[..., None], 3, axis=-1)
            return np.asarray(im.convert("RGB"))  # convert() forces the full decode; palettes expand


class ImageFolderSource:
    """Images under `path` (recursive, sorted), decoded lazily with PIL to RGB, with optional captions.

    Label = index of the sorted first-level subfolder holding the file (0 for files directly in `path`).
    Captions, if the folder has any: `metadata.jsonl` / `metadata.csv` files (`file_name` relative to the metadata
    file, caption in `text`: a string or a list), else sidecar `NAME.txt` files beside `NAME.png` (one caption per
    non-empty line). A file without one gets the empty caption (the null condition), counted in `caption_stats`.
    An unreadable file is replaced by the next readable one (index + 1, + 2, ... wrapping) and counted once in
    `num_skipped`, so a corrupt file never stops training and the output stays deterministic.
    """

    def __init__(self, path: str, extensions: Sequence[str] = IMAGE_EXTENSIONS):
        if not path or not os.path.isdir(path):
            raise FileNotFoundError(f"data.path: image folder {path!r} does not exist")
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        self.path = path
        self.classes = sorted(d for d in os.listdir(path)
                              if not d.startswith(".") and os.path.isdir(os.path.join(path, d)))
        class_index = {d: i for i, d in enumerate(self.classes)}
        files, labels, sidecars, metadata = [], [], set(), []
        for root, dirs, names in os.walk(path, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # sorted walk -> deterministic order
            rel = os.path.relpath(root, path)
            label = 0 if rel == "." else class_index.get(rel.split(os.sep)[0], 0)
            for n in sorted(names):
                stem, ext = os.path.splitext(n)
                if n.startswith("."):
                    continue
                if ext.lower() in exts:
                    files.append(os.path.join(root, n))
                    labels.append(label)
                elif ext.lower() == ".txt":
                    sidecars.add(os.path.normpath(os.path.join(root, stem)))
                elif n in METADATA_FILES:
                    metadata.append(os.path.join(root, n))
        if not files:
            raise FileNotFoundError(f"data.path: no image files ({', '.join(exts)}) under {path!r}")
        self.files, self.labels = files, np.asarray(labels, np.int32)
        self._bad: set[int] = set()
        self._lock = threading.Lock()  # the prefetch thread and the caller may both decode
        self.caption_stats = CaptionStats()
        self._captions: dict[str, list[str]] | None = None
        self._sidecar: list[str | None] | None = None
        if metadata:
            self._captions = {}
            for m in metadata:
                self._captions.update(read_metadata(m))
            has = [os.path.normpath(f) in self._captions for f in files]
        else:
            stems = [os.path.normpath(os.path.splitext(f)[0]) for f in files]
            has = [s in sidecars for s in stems]
            if any(has):
                self._sidecar = [s + ".txt" if h else None for s, h in zip(stems, has, strict=True)]
        self.has_captions = any(has)
        self.num_captioned = int(sum(has))
        if self.has_captions and not all(has):
            logging.warning("captions: %d of %d images under %s have no caption (they train as the null "
                            "condition)", len(files) - self.num_captioned, len(files), path)

    def __len__(self) -> int:
        return len(self.files)

    def __getstate__(self) -> dict:  # picklable for worker processes (locks are not)
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def num_skipped(self) -> int:
        """Number of distinct unreadable files met so far."""
        return len(self._bad)

    @property
    def skipped_files(self) -> list[str]:
        """Paths of the unreadable files met so far."""
        with self._lock:
            return [self.files[i] for i in sorted(self._bad)]

    def captions(self, index: int) -> tuple[str, ...]:
        """The captions of file `index` (('',) when it has none: the null condition)."""
        file = self.files[index]
        if self._captions is not None:
            caps = self._captions.get(os.path.normpath(file))
            if caps is None:
                self.caption_stats.add("missing", index, file)
                return ("",)
        else:
            sidecar = self._sidecar[index] if self._sidecar is not None else None
            if sidecar is None:
                self.caption_stats.add("missing", index, file)
                return ("",)
            try:
                with open(sidecar, "rb") as f:
                    raw = f.read()
            except OSError:
                self.caption_stats.add("missing", index, sidecar)
                return ("",)
            caps = decode_text(raw, self.caption_stats, index, sidecar).splitlines()
        caps = [c.strip() for c in caps if c.strip()]
        if not caps:
            self.caption_stats.add("empty", index, file)
            return ("",)
        return tuple(caps)

    def caption_corpus(self, limit: int = 100_000) -> list[str]:
        """Captions of the first `limit` files (0: all), e.g. to train a WordPiece vocabulary on."""
        n = len(self.files) if limit <= 0 else min(limit, len(self.files))
        return [c for i in range(n) for c in self.captions(i) if c]

    def get(self, index: int) -> dict:
        """Returns file `index` decoded (uint8 H x W x 3), or the next readable file if it is unreadable."""
        n = len(self.files)
        if not 0 <= index < n:
            raise IndexError(f"ImageFolderSource index {index} out of range [0, {n})")
        for k in range(n):
            j = (index + k) % n
            if j in self._bad:
                continue
            try:
                image = decode_image(self.files[j])
            except DECODE_ERRORS as e:
                note_problem("skipped", j)
                with self._lock:
                    new = j not in self._bad
                    self._bad.add(j)
                    count = len(self._bad)
                if new and count <= _LOGGED_BAD_FILES:
                    logging.warning("data.path: skipping unreadable image %s (%s)", self.files[j], _first_line(e))
                elif new and count == _LOGGED_BAD_FILES + 1:
                    logging.warning("data.path: more unreadable images skipped; the count goes to metrics.json "
                                    "(skipped_files)")
                continue
            return _example(image, self.labels[j], self.captions(j) if self.has_captions else None)
        raise ValueError(f"data.path: none of the {n} image files under {self.path!r} can be decoded")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class TFDSSource:
    """A prepared tensorflow-datasets dataset, read by random access without TensorFlow (array_record).

    Never downloads: a dataset missing from data_dir is an error. Datasets prepared as tfrecord are read into
    memory through tfds.load, only when TensorFlow is importable.
    """

    def __init__(self, name: str, split: str, data_dir: str | None = None, image_key: str = "image",
                 label_key: str = "label", caption_key: str = ""):
        try:
            import tensorflow_datasets as tfds
        except ImportError:
            raise ImportError("data.name 'tfds:...' needs tensorflow-datasets: pip install tensorflow-datasets") \
                from None
        self.name, self.split, self.image_key, self.label_key = name, split, image_key, label_key
        self.caption_key, self.has_captions = caption_key, bool(caption_key)
        self.caption_stats = CaptionStats()
        try:
            builder = tfds.builder(name, data_dir=data_dir)  # only reads metadata; never downloads
        except Exception as e:
            raise ValueError(f"data.name: tfds dataset {name!r} not found ({_first_line(e)})") from None
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"data.name: tfds dataset {name!r} is not prepared in {os.fspath(builder.data_dir)!r} "
                f"(downloads are disabled; set data.data_dir or run "
                f"`tfds build {name} --file_format=array_record` once)")
        file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
        self._records = None
        if file_format in ("array_record", "parquet"):
            try:
                self._records = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
            except (ValueError, KeyError) as e:
                raise ValueError(f"tfds dataset {name!r}: bad split {split!r} ({_first_line(e)})") from None
        elif importlib.util.find_spec("tensorflow") is not None:
            # tfrecord has no random access: read the split once into memory (needs TensorFlow).
            ds = tfds.load(name, split=split, data_dir=data_dir, download=False)
            self._records = list(tfds.as_numpy(ds))
        else:
            raise ValueError(
                f"data.name: tfds dataset {name!r} is stored as {file_format}; without TensorFlow only "
                f"array_record is readable: re-run `tfds build {name} --file_format=array_record` "
                f"or pip install tensorflow-datasets")

    def __len__(self) -> int:
        return len(self._records)

    def get(self, index: int) -> dict:
        """Returns record `index` as dict(image=uint8 (H, W, C), label=int32; 0 when there is no label)."""
        rec = self._records[index]
        if self.image_key not in rec:
            raise ValueError(f"data.image_key: tfds dataset {self.name!r} has no feature {self.image_key!r} "
                             f"(features: {sorted(rec)})")
        image = np.asarray(rec[self.image_key])
        if image.ndim == 2:
            image = image[..., None]
        if image.dtype != np.uint8 or image.ndim != 3:
            raise ValueError(f"data.image_key: feature {self.image_key!r} of {self.name!r} is not a uint8 "
                             f"image ({image.shape} {image.dtype})")
        label = rec.get(self.label_key, 0)
        captions = self.captions(index, rec) if self.has_captions else None
        return _example(image, int(np.asarray(label).reshape(-1)[0]) if np.size(label) else 0, captions)

    def captions(self, index: int, rec: dict | None = None) -> tuple[str, ...]:
        """The text feature at `caption_key` (a '/'-separated feature path; one or several strings)."""
        node = self._records[index] if rec is None else rec
        for part in self.caption_key.split("/"):
            if not isinstance(node, dict) or part not in node:
                keys = sorted(node) if isinstance(node, dict) else type(node).__name__
                raise ValueError(f"data.caption_key: tfds dataset {self.name!r} has no feature {self.caption_key!r} "
                                 f"(at {part!r}: {keys})")
            node = node[part]
        values = [node] if isinstance(node, (str, bytes)) else list(np.asarray(node, dtype=object).reshape(-1))
        caps = []
        for v in values:
            text = decode_text(v, self.caption_stats, index, self.name) if isinstance(v, bytes) else str(v)
            if text.strip():
                caps.append(text.strip())
        if not caps:
            self.caption_stats.add("empty", index, f"{self.name} record {index}")
            return ("",)
        return tuple(caps)

    def caption_corpus(self, limit: int = 100_000) -> list[str]:
        n = len(self) if limit <= 0 else min(limit, len(self))
        return [c for i in range(n) for c in self.captions(i) if c]
