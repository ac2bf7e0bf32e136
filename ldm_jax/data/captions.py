"""Captions of image files and records: sidecar .txt files, Hugging Face `metadata.jsonl` / `metadata.csv`, and the
counts of caption problems (missing, empty, not UTF-8) that a run reports in metrics.json."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import threading
from collections.abc import Iterator

METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # the Hugging Face imagefolder layout


_recording = threading.local()


@contextlib.contextmanager
def record_problems() -> Iterator[list[tuple[str, int]]]:
    """Collects the (kind, index) problems this thread's source reads meet: the pipeline ships them with each batch,
    so counts stay right when worker processes (whose sources are copies) do the reading."""
    previous = getattr(_recording, "events", None)
    _recording.events = events = []
    try:
        yield events
    finally:
        _recording.events = previous


def note_problem(kind: str, index: int) -> None:
    events = getattr(_recording, "events", None)
    if events is not None:
        events.append((kind, int(index)))


class CaptionStats:
    """Counts of caption problems met so far (thread-safe); logged once each, reported in metrics.json."""

    KINDS = ("missing", "empty", "non_utf8")

    def __init__(self):
        self._seen: dict[str, set[int]] = {k: set() for k in self.KINDS}
        self._lock = threading.Lock()

    def add(self, kind: str, index: int, detail: str) -> None:
        note_problem(kind, index)
        with self._lock:
            new = index not in self._seen[kind]
            self._seen[kind].add(index)
            first = new and len(self._seen[kind]) == 1
        if first:
            logging.warning("captions: %s caption for %s (used as the empty caption, i.e. the null condition; "
                            "further cases are only counted: metrics.json caption_%s)", kind.replace("_", "-"),
                            detail, kind)

    def __getstate__(self) -> dict:  # picklable for worker processes (locks are not)
        return {"_seen": self._seen}

    def __setstate__(self, state: dict) -> None:
        self._seen, self._lock = state["_seen"], threading.Lock()

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {k: len(v) for k, v in self._seen.items()}


def decode_text(raw: bytes, stats: CaptionStats, index: int, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.add("non_utf8", index, where)
        return raw.decode("utf-8", errors="replace")


def _caption_list(value, where: str) -> list[str]:
    """A metadata `text` value (str, or a list of str) as a list of captions."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ValueError(f"data.path: {where}: 'text' must be a string or a list of strings, got {type(value).__name__}")


def read_metadata(path: str) -> dict[str, list[str]]:
    """metadata.jsonl / metadata.csv → {normalised file path: captions}; `file_name` is relative to the file."""
    base = os.path.dirname(path)
    rows: list[tuple[str, object]] = []
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    if path.endswith(".jsonl"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"data.path: {path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or "file_name" not in row:
                raise ValueError(f"data.path: {path}:{n}: each line needs a 'file_name' field")
            rows.append((str(row["file_name"]), row.get("text", "")))
    else:
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or "file_name" not in reader.fieldnames:
            raise ValueError(f"data.path: {path}: the CSV needs a 'file_name' column (and 'text')")
        rows = [(r["file_name"], r.get("text") or "") for r in reader]
    out: dict[str, list[str]] = {}
    for n, (name, value) in enumerate(rows, 1):
        key = os.path.normpath(os.path.join(base, name))
        out.setdefault(key, []).extend(_caption_list(value, f"{path} row {n}"))
    return out
