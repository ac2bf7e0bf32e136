"""Packed shards: examples stored as array_record files for sets too large for folders of files, read by random
access (`data.name='packed:DIR'`). `python -m ldm_jax.data.pack` writes them.

DIR holds `{split}-NNNNN-of-MMMMM.array_record` shards and `{split}.json` (count, classes, caption flag). One record
per example: a msgpack map {image: the encoded file bytes (PNG/JPEG/WebP as given; decoded at read time),
label: int, captions: [str], key: str}. No pickle: a packed set from elsewhere cannot run code.
"""

from __future__ import annotations

import glob
import io
import json
import os
from collections.abc import Iterable

import msgpack
import numpy as np

from ldm_jax.data.captions import CaptionStats

FORMAT = "ldm_jax.packed/1"


def shard_paths(directory: str, split: str) -> list[str]:
    return sorted(glob.glob(os.path.join(directory, f"{split}-*-of-*.array_record")))


def encode_record(image: bytes, label: int, captions: Iterable[str], key: str) -> bytes:
    return msgpack.packb({"image": bytes(image), "label": int(label), "captions": list(captions), "key": str(key)},
                         use_bin_type=True)


def decode_record(raw: bytes) -> dict:
    return msgpack.unpackb(raw, raw=False)


def write_shards(records: Iterable[bytes], directory: str, split: str, examples_per_shard: int,
                 info: dict) -> list[str]:
    """Streams encoded records into shards of `examples_per_shard`, named with their count once it is known, then
    writes `{split}.json` last (a reader never sees a half-written set as complete)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    os.makedirs(directory, exist_ok=True)
    info_path = os.path.join(directory, f"{split}.json")
    for old in shard_paths(directory, split) + [info_path]:  # a re-pack replaces the split
        if os.path.exists(old):
            os.remove(old)
    partial, written, writer = [], 0, None
    try:
        for record in records:
            if written % examples_per_shard == 0:
                if writer is not None:
                    writer.close()
                partial.append(os.path.join(directory, f".{split}-{len(partial):05d}.partial"))
                writer = ArrayRecordWriter(partial[-1], "group_size:1")  # one record per chunk: cheap random access
            writer.write(record)
            written += 1
    finally:
        if writer is not None:
            writer.close()
    if not written:
        raise ValueError("pack: no readable examples to write")
    paths = [os.path.join(directory, f"{split}-{i:05d}-of-{len(partial):05d}.array_record")
             for i in range(len(partial))]
    for a, b in zip(partial, paths, strict=True):
        os.replace(a, b)
    with open(info_path + ".tmp", "w") as f:
        json.dump({"format": FORMAT, "split": split, "num_examples": written, "shards": len(paths), **info}, f,
                  indent=1)
    os.replace(info_path + ".tmp", info_path)
    return paths


class PackedSource:
    """Random access to packed shards: `get(i)` decodes example i's image bytes (uint8 H x W x 3)."""

    def __init__(self, directory: str, split: str):
        info_path = os.path.join(directory, f"{split}.json")
        if not os.path.isfile(info_path):
            raise FileNotFoundError(f"data.name: no packed split {split!r} in {directory!r} (missing {info_path}; "
                                    "write it with python -m ldm_jax.data.pack)")
        with open(info_path) as f:
            info = json.load(f)
        if info.get("format") != FORMAT:
            raise ValueError(f"data.name: {info_path} is not an ldm_jax packed set (format {info.get('format')!r})")
        paths = shard_paths(directory, split)
        if len(paths) != info["shards"]:
            raise FileNotFoundError(f"data.name: {directory!r} has {len(paths)} {split} shards, {info_path} lists "
                                    f"{info['shards']}")
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self.directory, self.split = directory, split
        self.records = ArrayRecordDataSource(paths)
        if len(self.records) != info["num_examples"]:
            raise ValueError(f"data.name: {directory!r} {split} shards hold {len(self.records)} records, "
                             f"{info_path} says {info['num_examples']}")
        self.classes = list(info.get("classes", []))
        self.has_captions = bool(info.get("has_captions", False))
        self.caption_stats = CaptionStats()

    def __len__(self) -> int:
        return len(self.records)

    def record(self, index: int) -> dict:
        """The stored record (image bytes undecoded)."""
        return decode_record(self.records[int(index)])

    def caption_corpus(self, limit: int = 100_000) -> list[str]:
        n = len(self) if limit <= 0 else min(limit, len(self))
        return [c for i in range(n) for c in self.record(i)["captions"] if c]

    def captions(self, index: int, rec: dict | None = None) -> tuple[str, ...]:
        """Example `index`'s captions (('',) when it has none: the null condition), without decoding its image."""
        rec = self.record(index) if rec is None else rec
        caps = tuple(c.strip() for c in rec["captions"] if c.strip())
        if not caps:
            self.caption_stats.add("missing" if not rec["captions"] else "empty", index, rec["key"])
        return caps or ("",)

    def get(self, index: int) -> dict:
        from ldm_jax.data.sources import decode_image

        rec = self.record(index)
        ex = {"image": decode_image(io.BytesIO(rec["image"])), "label": np.int32(rec["label"])}
        if self.has_captions:
            ex["captions"] = self.captions(index, rec)
        return ex
