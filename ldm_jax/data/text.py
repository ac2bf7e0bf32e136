"""Captions and a BERT-style WordPiece tokenizer for text conditioning (offline; no hub downloads)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

NULL_TEXT = ""  # the unconditional prompt for classifier-free guidance, as the reference
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def class_captions(class_names: Sequence[str]) -> list[str]:
    """One caption per class: "a photo of a t-shirt", "a photo of an ankle boot", ..."""
    return [f"a photo of {article(name)} {name}" for name in class_names]


def train_wordpiece_vocab(
    texts: Iterable[str], out_dir: str, vocab_size: int = 1000, min_frequency: int = 1
) -> str:
    """Train a lowercase BERT WordPiece vocabulary on texts; write out_dir/vocab.txt and return its path."""
    from tokenizers import BertWordPieceTokenizer

    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    os.makedirs(out_dir, exist_ok=True)
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(
        list(texts),
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    tok.save_model(out_dir)  # writes out_dir/vocab.txt
    return os.path.join(out_dir, "vocab.txt")


def load_bert_tokenizer(path: str) -> Any:
    """Load a lowercase BertTokenizer from a directory (from_pretrained) or a vocab.txt file, offline.

    Uses `BertTokenizer(vocab=...)`: in transformers 5 `BertTokenizer(vocab_file=...)` silently maps every
    word to [UNK].
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertTokenizer

    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "vocab.txt")):
            raise FileNotFoundError(f"tokenizer directory {path} has no vocab.txt")
        return BertTokenizer.from_pretrained(path, local_files_only=True)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer vocab not found: {path}")
    return BertTokenizer(vocab=path, do_lower_case=True)


def load_tokenizer(kind: str, path: str) -> Any:
    """The text model's tokenizer from `path`: condition.tokenizer 'bert' (WordPiece) or 'clip' (BPE)."""
    if kind == "clip":
        from ldm_jax.data.clip_tokenizer import load_clip_tokenizer

        return load_clip_tokenizer(path)
    if kind != "bert":
        raise ValueError(f"condition.tokenizer must be 'bert' or 'clip', got {kind!r}")
    return load_bert_tokenizer(path)


def tokenize(tokenizer: Any, texts: Sequence[str] | str, max_length: int = 77) -> np.ndarray:
    """Token ids int32 (B, max_length): [CLS] ... [SEP] then [PAD]; truncated, keeping [SEP]."""
    if isinstance(texts, str):
        texts = [texts]
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 for [CLS] and [SEP], got {max_length}")
    enc = tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="np"
    )
    return np.asarray(enc["input_ids"], dtype=np.int32)


class TextEncoder:
    """Captions → token ids int32 (B, max_length) in the input pipeline; counts captions cut at max_length."""

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer, self.max_length = tokenizer, int(max_length)
        self.num_truncated = 0
        self._warned = False

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        # One tokeniser pass without truncation, then the cut `tokenize` makes (the content is shortened, the
        # closing [SEP] / <|endoftext|> kept) and its padding, so the lengths come for free.
        ids = self.tokenizer(list(texts), truncation=False)["input_ids"]
        out = np.full((len(ids), self.max_length), self.tokenizer.pad_token_id, np.int32)
        longest = 0
        for i, seq in enumerate(ids):
            if len(seq) > self.max_length:
                self.num_truncated += 1
                longest = max(longest, len(seq))
                seq = seq[: self.max_length - 1] + seq[-1:]
            out[i, : len(seq)] = seq
        if longest and not self._warned:
            self._warned = True
            logging.warning("captions: a caption of %d tokens was cut to model.text_max_len=%d (further cuts are "
                            "only counted: metrics.json caption_truncated)", longest, self.max_length)
        return out
