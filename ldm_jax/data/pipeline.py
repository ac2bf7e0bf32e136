"""Deterministic, exactly resumable, multi-host batch iterator over the sources in `sources.py`.

The global batch for step s is a pure function of (seed, s): example positions s*B .. s*B+B-1 of the endless
sequence perm(seed, 0) ++ perm(seed, 1) ++ ..., augmentation randomness from (seed, s, row). Process i of P
gets rows i*B/P .. (i+1)*B/P - 1, so the processes' slices concatenate to the single-process batch.
"""

from __future__ import annotations

import math
import queue
import threading
import weakref
import zlib
from collections.abc import Callable

import numpy as np
from ml_collections import config_dict

from ldm_jax.data.captions import CaptionStats, record_problems
from ldm_jax.data.sources import FashionMNISTSource, ImageFolderSource, PhotoSource, TFDSSource
from ldm_jax.data.transforms import (  # noqa: F401  (re-exported: the pipeline's public names)
    AUG_TAG,
    PERM_TAG,
    PREPROCESS_MODES,
    Preprocessor,
    as_float,
    pick_caption,
    to_channels,
    to_float,
)


class BatchIterator:
    """Batches dict(image=float32 (B_local, H, W, C) in [-1, 1], label=int32 (B_local,)); see module doc.
    `uint8_images`: images stay uint8 (a quarter of the bytes through worker queues and host→device copies; the
    train steps convert them on the device with `transforms.as_float`).

    With `text_fn` (captions → int32 token ids) and a captioned source, batches also hold `tokens` (B_local, L): one
    caption per example, picked by `pick_caption`, tokenised here in the input pipeline rather than in the step."""

    def __init__(self, source, batch_size: int, seed: int, preprocessor: Preprocessor, *,
                 shuffle: bool = True, num_examples: int | None = None, num_epochs: int | None = None,
                 process_index: int = 0, process_count: int = 1, prefetch: int = 0, num_workers: int = 0,
                 text_fn: Callable[[list[str]], np.ndarray] | None = None, uint8_images: bool = False):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"train.batch_size must be a positive int, got {batch_size!r}")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
        if batch_size % process_count:
            raise ValueError(f"train.batch_size {batch_size} not divisible by process_count {process_count}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if num_examples is not None and num_examples < 1:
            raise ValueError(f"data.num_examples must be positive or None, got {num_examples}")
        n = len(source) if num_examples is None else min(int(num_examples), len(source))
        if n < 1:
            raise ValueError("data.name: the dataset is empty")
        if text_fn is not None and not getattr(source, "has_captions", False):
            raise ValueError("data: this text-conditioned run needs captions, and the data set has none (image "
                             "folders: NAME.txt beside NAME.png, or metadata.jsonl/.csv with file_name and text; "
                             "tfds: data.caption_key)")
        self.latents = hasattr(source, "views")  # a LatentSource: batches carry `moments`, not `image`
        if self.latents and preprocessor.mode == "random_crop" and preprocessor.augment:
            raise ValueError("data.latents: a latent cache cannot serve data.preprocess='random_crop' (each step "
                             "would need a new crop); use 'resize' or 'pad', or train from images")
        if self.latents and preprocessor.random_flip and preprocessor.augment and source.views < 2:
            raise ValueError("data.latents: data.random_flip is on but the cache holds no flipped view (re-run "
                             "python -m ldm_jax.cache_latents with data.random_flip=True)")
        self.source, self.preprocessor, self.text_fn = source, preprocessor, text_fn
        self.uint8_images = bool(uint8_images)
        self.batch_size, self.seed, self.shuffle, self.num_examples = batch_size, int(seed), shuffle, n
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = batch_size // process_count
        self.steps_per_epoch = math.ceil(n / batch_size)
        # With num_epochs set, iteration stops after ceil(num_epochs * n / B) batches (the last may wrap).
        self.num_steps = None if num_epochs is None else math.ceil(num_epochs * n / batch_size)
        self.step = 0
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # the permutation cache and the problem counts: caller and prefetch thread
        if not isinstance(num_workers, (int, np.integer)) or num_workers < 0:
            raise ValueError(f"data.num_workers must be a non-negative int, got {num_workers!r}")
        self.prefetch, self.num_workers = int(prefetch), int(num_workers)
        self._seen: dict[str, set[int]] = {}
        self._workers = None  # grain iterator over steps (num_workers > 0)
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None

    @property
    def num_skipped(self) -> int:
        """Distinct unreadable files this iterator's batches have skipped so far (in whichever worker)."""
        return len(self._seen.get("skipped", ()))

    def caption_counts(self) -> dict[str, int]:
        """Caption problems met so far: missing, empty, non-UTF-8 (source) and truncated (tokeniser)."""
        out = {}
        if getattr(self.source, "caption_stats", None) is not None:
            out = {f"caption_{k}": len(self._seen.get(k, ())) for k in CaptionStats.KINDS}
        if self.text_fn is not None:
            out["caption_truncated"] = len(self._seen.get("truncated", ()))
        return out

    def permutation(self, epoch: int) -> np.ndarray:
        """The example order of `epoch`: a pure function of (seed, epoch) (identity when shuffle is off)."""
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                if self.shuffle:
                    perm = np.random.default_rng([self.seed, PERM_TAG, epoch]).permutation(self.num_examples)
                else:
                    perm = np.arange(self.num_examples)
                if len(self._perms) >= 4:  # batches straddle at most two epochs; keep the cache tiny
                    self._perms.pop(min(self._perms))
                self._perms[epoch] = perm
            return perm

    def indices_at(self, step: int) -> np.ndarray:
        """Source indices of this process's rows of the global batch at `step`."""
        rows = self.process_index * self.local_batch_size + np.arange(self.local_batch_size)
        pos = step * self.batch_size + rows
        epochs, offsets = np.divmod(pos, self.num_examples)
        return np.array([self.permutation(int(e))[o] for e, o in zip(epochs, offsets, strict=True)], np.int64)

    def batch_at(self, step: int) -> dict:
        """This process's slice of the global batch at `step` (pure function of seed and step)."""
        batch, problems = self._compute(step)
        self._merge(problems)
        return batch

    def _compute(self, step: int) -> tuple[dict, list[tuple[str, int]]]:
        """The batch at `step` and the (kind, index) problems its reads met (run in the worker that assembles it)."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        row0 = self.process_index * self.local_batch_size
        images, labels, captions = [], [], []
        with record_problems() as problems:
            for k, idx in enumerate(self.indices_at(step)):
                ex = self.source.get(int(idx))
                rng = None
                if self.preprocessor.needs_rng:
                    rng = np.random.default_rng([self.seed, AUG_TAG, step, row0 + k])
                if "moments" in ex:  # a latent cache: the stored view the image pipeline's flip would give
                    images.append(ex["moments"][int(self.preprocessor.flips(rng))])
                else:
                    images.append(self.preprocessor(ex["image"], rng))
                labels.append(ex["label"])
                if self.text_fn is not None:
                    captions.append(pick_caption(ex["captions"], self.seed, step, row0 + k))
        if self.latents:
            batch = {"moments": np.stack(images), "label": np.asarray(labels, np.int32)}
        else:
            images = np.stack(images)
            batch = {"image": images if self.uint8_images else to_float(images), "label": np.asarray(labels, np.int32)}
        if self.text_fn is not None:
            before = int(getattr(self.text_fn, "num_truncated", 0))
            batch["tokens"] = np.asarray(self.text_fn(captions), np.int32)
            cut = int(getattr(self.text_fn, "num_truncated", 0)) - before
            problems += [("truncated", step * self.batch_size + row0 + k) for k in range(cut)]
        return batch, problems

    def _merge(self, problems: list[tuple[str, int]]) -> None:
        with self._lock:
            for kind, index in problems:
                self._seen.setdefault(kind, set()).add(index)

    def captions_at(self, step: int) -> list[str]:
        """The captions this process's rows of batch `step` are tokenised from."""
        row0 = self.process_index * self.local_batch_size
        return [pick_caption(self.source.get(int(idx))["captions"], self.seed, step, row0 + k)
                for k, idx in enumerate(self.indices_at(step))]

    # --- iteration, with an optional background thread computing the next batches in order ---

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict:
        if self.num_steps is not None and self.step >= self.num_steps:
            raise StopIteration
        if self.num_workers > 0:
            batch = self._next_from_workers()
        elif self.prefetch > 0:
            batch = self._next_prefetched()
        else:
            batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def _next_from_workers(self) -> dict:
        # grain: a MapDataset over steps whose map is `_compute` (a pure function of the step), read ahead by
        # `num_workers` processes (worker w assembles steps start+w, start+w+num_workers, ...; grain hands them back
        # in order). A restore only changes the start, so resumes stay exact without grain's own iterator state.
        if self._workers is None:
            import grain
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain reads absl flags; library use (tests, notebooks) has none
                flags.FLAGS.mark_as_parsed()
            stop = self.num_steps if self.num_steps is not None else _ENDLESS
            steps = grain.MapDataset.range(self.step, max(stop, self.step)).map(_StepBatch(self))
            options = grain.MultiprocessingOptions(num_workers=self.num_workers,
                                                   per_worker_buffer_size=max(1, self.prefetch))
            reads = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
            self._workers = iter(steps.to_iter_dataset(reads).mp_prefetch(options, worker_init_fn=_die_with_parent))
        batch, problems = next(self._workers)
        self._merge(problems)
        return batch

    @staticmethod
    def _worker(ref: weakref.ref, start: int, q: queue.Queue, stop: threading.Event) -> None:
        # Holds only a weak reference between batches, so an abandoned iterator is collected and stops this.
        step = start
        while not stop.is_set():
            it = ref()
            if it is None or (it.num_steps is not None and step >= it.num_steps):
                return
            try:
                item = (step, it.batch_at(step), None)
            except Exception as e:  # surfaced in the caller's thread by __next__
                item = (step, None, e)
            del it
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            step += 1

    def _next_prefetched(self) -> dict:
        if self._thread is None:
            self._queue, self._stop = queue.Queue(maxsize=self.prefetch), threading.Event()
            args = (weakref.ref(self), self.step, self._queue, self._stop)
            self._thread = threading.Thread(target=self._worker, args=args, daemon=True, name="data-prefetch")
            self._thread.start()
        step, batch, error = self._queue.get()
        if error is not None:
            self.close()
            raise error
        if step != self.step:  # cannot happen unless `step` was assigned directly; recover exactly
            self.close()
            return self.batch_at(self.step)
        return batch

    def close(self) -> None:
        """Stops the prefetch thread or worker processes (iteration restarts them at the current step)."""
        if self._workers is not None:
            it, self._workers = self._workers, None
            it.close()
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = self._queue = self._stop = None

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_stop", None) is not None:
            self._stop.set()  # no join: __del__ may run on the worker thread itself

    def __getstate__(self) -> dict:  # what a worker process gets: no thread, queue or grain iterator
        drop = ("_thread", "_queue", "_stop", "_workers", "_lock", "_perms")
        return {k: (None if k in drop else v) for k, v in self.__dict__.items()} | {"_perms": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def state(self) -> dict:
        """JSON-able position; process-independent, so a run may resume with a different process count."""
        return {"step": int(self.step), "seed": self.seed, "batch_size": self.batch_size,
                "num_examples": self.num_examples, "shuffle": bool(self.shuffle)}

    def restore(self, state: dict) -> None:
        """Continues from a `state()` dict; refuses one saved with another seed, batch or dataset size."""
        mine = self.state()
        for key in ("seed", "batch_size", "num_examples", "shuffle"):
            if key in state and state[key] != mine[key]:
                raise ValueError(f"data iterator state has {key}={state[key]!r}, this run has {mine[key]!r}")
        if int(state["step"]) < 0:
            raise ValueError(f"data iterator state has a negative step {state['step']}")
        self.close()
        self.step = int(state["step"])


_ENDLESS = 2**62  # the step range of an iterator without num_epochs


def _die_with_parent(worker_index: int, worker_count: int) -> None:
    """grain worker start-up: exit when the training process dies, even by kill -9 (Linux PR_SET_PDEATHSIG), instead
    of lingering with a copy of the data source."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: grain's own shutdown on a normal exit still applies
        pass


class _StepBatch:
    """grain map: step -> (batch, problems), computed by a worker process's copy of the iterator."""

    def __init__(self, iterator: BatchIterator):
        self.iterator = iterator

    def __call__(self, step: int) -> tuple[dict, list[tuple[str, int]]]:
        return self.iterator._compute(int(step))


def default_data_config() -> config_dict.ConfigDict:
    """Fashion-MNIST defaults: 28x28 padded with background to 32x32, 1 channel, no flip."""
    return config_dict.ConfigDict({
        "name": "fashion_mnist",  # fashion_mnist | fashion_mnist_pairs | photos | folder | packed:<dir> | tfds:<n>
        "path": "",  # folder: root (may contain '{split}')
        "data_dir": config_dict.placeholder(str),  # tfds (None: $TFDS_DATA_DIR or ~/tensorflow_datasets)
        "resolution": 32,  # image height (and width, unless `width` is set)
        "width": config_dict.placeholder(int),  # None: square images
        "channels": 1,
        "preprocess": "pad",  # pad | resize | random_crop
        "random_flip": False,
        "num_examples": config_dict.placeholder(int),  # cap: use only the first n examples
        "shuffle": True,
        "prefetch": 2,  # batches computed ahead (per worker process, or by one background thread; 0: none)
        "num_workers": 0,  # worker processes assembling batches (grain); 0: one background thread
        "photo_names": "",  # photos: comma-separated skimage.data names ('' = defaults)
        "num_crops": 1024,  # photos: crops per split
        "image_key": "image",  # tfds feature names
        "label_key": "label",
        "caption_key": "",  # tfds: text feature path, e.g. 'captions/text' (coco_captions)
        "latents": "",  # stage 2: a latent cache of this data (python -m ldm_jax.cache_latents) instead of images
    })


def image_size(data_cfg: config_dict.ConfigDict) -> tuple[int, int]:
    """(height, width) of the training images."""
    return int(data_cfg.resolution), int(data_cfg.get("width") or data_cfg.resolution)


def _field(cfg: config_dict.ConfigDict, key: str, default):
    value = cfg.get(key, default)
    return default if value is None else value


def make_source(data_cfg: config_dict.ConfigDict, split: str):
    """Builds the example source named by `data_cfg.name` for `split`."""
    name = str(data_cfg.get("name", ""))
    if data_cfg.get("latents"):
        from ldm_jax.data.latents import LatentSource

        return LatentSource(str(data_cfg.latents), split)
    if name == "fashion_mnist":
        return FashionMNISTSource(split)
    if name == "fashion_mnist_pairs":
        from ldm_jax.data.pairs import FashionMNISTPairsSource

        return FashionMNISTPairsSource(split, 60_000 if split == "train" else 10_000)
    if name == "photos":
        names = _field(data_cfg, "photo_names", "")
        names = [s.strip() for s in names.split(",") if s.strip()] if isinstance(names, str) else list(names)
        # Different splits see different crops of the same photos.
        num_crops = int(_field(data_cfg, "num_crops", 1024))
        return PhotoSource(names or None, crop=int(data_cfg.resolution), num_crops=num_crops,
                           seed=zlib.crc32(split.encode()))
    if name == "folder":
        path = str(_field(data_cfg, "path", ""))
        return ImageFolderSource(path.replace("{split}", split))
    if name.startswith("packed:") and len(name) > 7:
        from ldm_jax.data.packed import PackedSource

        return PackedSource(name[7:].replace("{split}", split), split)
    if name.startswith("tfds:") and len(name) > 5:
        return TFDSSource(name[5:], split, data_dir=data_cfg.get("data_dir"),
                          image_key=_field(data_cfg, "image_key", "image"),
                          label_key=_field(data_cfg, "label_key", "label"),
                          caption_key=_field(data_cfg, "caption_key", ""))
    raise ValueError(f"data.name must be fashion_mnist, fashion_mnist_pairs, photos, folder, packed:<dir> or "
                     f"tfds:<name>, got {name!r}")


def make_dataset(data_cfg: config_dict.ConfigDict, split: str, batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1, *, augment: bool | None = None,
                 num_epochs: int | None = None, text_fn: Callable[[list[str]], np.ndarray] | None = None,
                 source=None, uint8_images: bool = False) -> BatchIterator:
    """This process's batches of `split`; augmentation (flip, random crop) defaults to split == 'train'.
    `text_fn`: tokenise one caption per example into `tokens`; `source`: an already built `make_source`;
    `uint8_images`: images as uint8 (converted by the consumer, e.g. on the device with `transforms.as_float`)."""
    preprocessor = Preprocessor(
        resolution=data_cfg.resolution, channels=data_cfg.channels, mode=data_cfg.preprocess,
        random_flip=bool(data_cfg.random_flip), augment=(split == "train") if augment is None else augment,
        width=data_cfg.get("width"))
    # Validate the cheap things before touching the data.
    if isinstance(batch_size, int) and process_count >= 1 and batch_size % process_count:
        raise ValueError(f"train.batch_size {batch_size} not divisible by process_count {process_count}")
    source = make_source(data_cfg, split) if source is None else source
    shuffle = bool(_field(data_cfg, "shuffle", True))
    return BatchIterator(source, batch_size, seed, preprocessor, shuffle=shuffle,
                         num_examples=data_cfg.get("num_examples"), num_epochs=num_epochs,
                         process_index=process_index, process_count=process_count,
                         prefetch=int(_field(data_cfg, "prefetch", 0)),
                         num_workers=int(_field(data_cfg, "num_workers", 0)), text_fn=text_fn,
                         uint8_images=uint8_images)
