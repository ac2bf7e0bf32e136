"""CLIP's byte-level BPE tokenizer (transformers' `CLIPTokenizer`), offline.

Sources, in this order: a tokenizer directory (a diffusers `tokenizer/` folder with vocab.json + merges.txt, or
one written by `save_pretrained`), a `bpe_simple_vocab_16e6.txt.gz` file, or, with no path, the copy of that file
inside the `open-clip-torch` wheel (`pip install --no-deps open-clip-torch`). Never downloads. Prompts become
<|startoftext|> ... <|endoftext|> padded to the length with the pad token (<|endoftext|> for SD v1's tokenizer).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from typing import Any

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_N_MERGES = 49152 - 256 - 2  # what open_clip's SimpleTokenizer keeps of the file: vocabulary size 49408


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def vocab_from_bpe(bpe_path: str, n_merges: int = _N_MERGES) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a CLIP BPE merges file (gzip, first line a header), as open_clip builds them."""
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:n_merges + 1] if line.strip()]
    chars = list(_bytes_to_unicode().values())
    words = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {w: i for i, w in enumerate(words)}, merges


def default_bpe_path() -> str | None:
    """open_clip's BPE file if the open-clip-torch wheel is installed (not imported: it needs torch), else None."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], BPE_FILE)
    return path if os.path.isfile(path) else None


def load_clip_tokenizer(path: str | None = None) -> Any:
    """A transformers CLIPTokenizer from a tokenizer directory, a BPE .txt.gz file, or open_clip's copy."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import CLIPTokenizer

    if path and os.path.isdir(path):
        names = set(os.listdir(path))
        if not ({"vocab.json", "merges.txt"} <= names or "tokenizer.json" in names):
            raise FileNotFoundError(f"tokenizer directory {path} has no vocab.json + merges.txt or tokenizer.json")
        try:
            return CLIPTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # tokenizers raises bare Exceptions for malformed vocab/merges files
            raise ValueError(f"tokenizer directory {path}: not a CLIP BPE tokenizer ({e})") from e
    if path and not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP tokenizer not found: {path} (a tokenizer directory or {BPE_FILE})")
    path = path or default_bpe_path()
    if path is None:
        raise FileNotFoundError(f"no CLIP tokenizer: pass a tokenizer directory or {BPE_FILE}, or run "
                                "`pip install --no-deps open-clip-torch` (its wheel ships the file)")
    vocab, merges = vocab_from_bpe(path)
    return CLIPTokenizer(vocab=vocab, merges=merges)
