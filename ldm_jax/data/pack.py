"""Pack a data set into array_record shards (data/packed.py) for random-access reading by worker processes.

python -m ldm_jax.data.pack SRC --out DIR [--split train] [--examples_per_shard 10000]
    [--data_dir D] [--image_key image] [--label_key label] [--caption_key captions/text]

SRC: an image folder (labels from sub-folders, captions from sidecar .txt or metadata.jsonl/.csv, as data.name=folder
reads it), `tfds:<name>` (a prepared tensorflow-datasets set), or WebDataset-style tar shards (a .tar file, a folder
of them, or a glob): members grouped by key, image from .jpg/.jpeg/.png/.webp, caption from .txt or from .json's
"caption"/"text", label from .cls. Image bytes are stored as given (no re-encoding), after a trial decode: unreadable
images are left out and counted. Then train with data.name='packed:DIR'.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
import tarfile
import time
from collections.abc import Iterator

from ldm_jax.data.packed import encode_record, write_shards

WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _readable(data: bytes) -> bool:
    from ldm_jax.data.sources import DECODE_ERRORS, decode_image

    try:
        decode_image(io.BytesIO(data))
        return True
    except DECODE_ERRORS:
        return False


def folder_examples(path: str) -> tuple[Iterator[tuple[bytes, int, tuple[str, ...], str]], dict]:
    from ldm_jax.data.sources import ImageFolderSource

    src = ImageFolderSource(path)

    def gen():
        for i, file in enumerate(src.files):
            with open(file, "rb") as f:
                data = f.read()
            caps = src.captions(i) if src.has_captions else ()
            yield data, int(src.labels[i]), tuple(c for c in caps if c), os.path.relpath(file, path)

    return gen(), {"classes": src.classes, "has_captions": src.has_captions}


def tfds_examples(name: str, split: str, data_dir: str | None, image_key: str, label_key: str,
                  caption_key: str) -> tuple[Iterator, dict]:
    from PIL import Image

    from ldm_jax.data.sources import TFDSSource

    src = TFDSSource(name, split, data_dir=data_dir, image_key=image_key, label_key=label_key,
                     caption_key=caption_key)

    def gen():
        for i in range(len(src)):
            ex = src.get(i)
            buf = io.BytesIO()
            image = ex["image"]
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
            yield buf.getvalue(), int(ex["label"]), tuple(c for c in ex.get("captions", ()) if c), f"{name}/{i}"

    return gen(), {"classes": [], "has_captions": src.has_captions}


def tar_paths(src: str) -> list[str]:
    if os.path.isdir(src):
        return sorted(glob.glob(os.path.join(src, "*.tar")))
    return sorted(glob.glob(src)) if any(c in src for c in "*?[") else [src]


def _wds_sample(parts: dict[str, bytes], key: str) -> tuple[bytes, int, tuple[str, ...], str] | None:
    image = next((parts[e] for e in WDS_IMAGE_EXTS if e in parts), None)
    if image is None:
        return None
    caps: list[str] = []
    if "txt" in parts:
        caps = parts["txt"].decode("utf-8", errors="replace").splitlines()
    elif "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except ValueError:
            meta = {}
        text = meta.get("caption", meta.get("text", "")) if isinstance(meta, dict) else ""
        caps = text if isinstance(text, list) else [str(text)]
    caps = [c.strip() for c in caps if c.strip()]
    try:
        label = int(parts["cls"].decode().strip()) if "cls" in parts else 0
    except ValueError:
        label = 0
    return image, label, tuple(caps), key


def webdataset_examples(paths: list[str]) -> tuple[Iterator[tuple[bytes, int, tuple[str, ...], str]], dict]:
    """(image bytes, label, captions, key) of each sample of the tar shards, streamed in shard then member order
    (a sample's files are adjacent in a WebDataset tar); `info['has_captions']` is final once consumed."""
    info = {"classes": [], "has_captions": False}

    def gen():
        for path in paths:
            try:
                with tarfile.open(path) as tar:
                    key, parts = None, {}
                    for member in [*tar, None]:
                        if member is not None and (not member.isfile() or "." not in os.path.basename(member.name)):
                            continue
                        stem = ext = None
                        if member is not None:  # WebDataset: the key ends at the first dot of the base name
                            stem, ext = os.path.basename(member.name).split(".", 1)
                            stem = os.path.join(os.path.dirname(member.name), stem)
                        if stem != key and parts:
                            sample = _wds_sample(parts, f"{os.path.basename(path)}/{key}")
                            if sample is not None:
                                info["has_captions"] |= bool(sample[2])
                                yield sample
                            parts = {}
                        if member is not None:
                            key = stem
                            parts[ext.lower()] = tar.extractfile(member).read()
            except (tarfile.TarError, OSError) as e:
                raise ValueError(f"pack: {path} is not a readable tar file ({e})") from None

    return gen(), info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ldm_jax.data.pack", description=__doc__.split("\n")[0])
    p.add_argument("src", help="image folder, tfds:<name>, or WebDataset .tar shard(s) (file, folder or glob)")
    p.add_argument("--out", required=True, help="output directory of the shards")
    p.add_argument("--split", default="train", help="split name written (and read, for tfds)")
    p.add_argument("--examples_per_shard", type=int, default=10_000)
    p.add_argument("--data_dir", default=None, help="tfds data_dir")
    p.add_argument("--image_key", default="image")
    p.add_argument("--label_key", default="label")
    p.add_argument("--caption_key", default="", help="tfds text feature path, e.g. captions/text")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Packs SRC; returns the exit status (bad input: one line on stderr, status 2)."""
    args = parse_args(argv)
    t0 = time.time()
    try:
        if args.examples_per_shard < 1:
            raise ValueError(f"--examples_per_shard must be >= 1, got {args.examples_per_shard}")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise FileExistsError(f"--out {args.out!r} exists and is not a directory")
        if args.src.startswith("tfds:"):
            examples, info = tfds_examples(args.src[5:], args.split, args.data_dir, args.image_key,
                                           args.label_key, args.caption_key)
        elif os.path.isdir(args.src) and not glob.glob(os.path.join(args.src, "*.tar")):
            examples, info = folder_examples(args.src)
        else:
            paths = tar_paths(args.src)
            if not paths or not all(os.path.isfile(p) for p in paths):
                raise FileNotFoundError(f"pack: SRC {args.src!r} is neither an image folder, tfds:<name>, nor "
                                        "existing .tar shards")
            examples, info = webdataset_examples(paths)
        counts = {"packed": 0, "skipped": 0}

        def readable():
            for e in examples:
                ok = _readable(e[0])
                counts["packed" if ok else "skipped"] += 1
                if ok:
                    yield encode_record(*e)

        paths = write_shards(readable(), args.out, args.split, args.examples_per_shard, info)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"pack: error: {e}", file=sys.stderr)
        return 2
    skipped = counts["skipped"]
    print(f"packed {counts['packed']} examples into {len(paths)} shard(s) under {args.out} in "
          f"{time.time() - t0:.1f} s" + (f"; skipped {skipped} unreadable image(s)" if skipped else ""))
    print(f"train with --config.data.name=packed:{args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
