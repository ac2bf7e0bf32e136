"""Captions, WordPiece vocabulary, BERT tokenizer loading, and the TransformerEmbedder text encoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.data.fashion_mnist import CLASS_NAMES
from ldm_jax.data.text import NULL_TEXT, class_captions, load_bert_tokenizer, tokenize, train_wordpiece_vocab
from ldm_jax.models.conditioning import TransformerEmbedder

WORDS = ("photo", "boot", "dress", "sneaker")


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory):
    return train_wordpiece_vocab(
        class_captions(CLASS_NAMES), str(tmp_path_factory.mktemp("vocab")), vocab_size=500
    )


@pytest.fixture(scope="module")
def tok(vocab_path):
    return load_bert_tokenizer(vocab_path)


def test_class_captions_articles():
    caps = class_captions(CLASS_NAMES)
    assert len(caps) == 10
    assert caps[0] == "a photo of a t-shirt"
    assert caps[9] == "a photo of an ankle boot"
    assert class_captions(["egg", "umbrella", "bag"]) == [
        "a photo of an egg",
        "a photo of an umbrella",
        "a photo of a bag",
    ]


def test_vocab_file_has_specials_and_words(vocab_path):
    lines = open(vocab_path).read().split("\n")
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    for w in WORDS + ("ankle", "shirt", "trouser"):
        assert w in lines, w


def test_known_words_get_distinct_ids_from_dir_and_file(vocab_path, tok):
    import os

    for t in (tok, load_bert_tokenizer(os.path.dirname(vocab_path))):
        ids = t.convert_tokens_to_ids(list(WORDS))
        assert len(set(ids)) == len(WORDS)
        assert t.unk_token_id not in ids
        assert t.pad_token_id == 0 and t.cls_token_id == 2 and t.sep_token_id == 3
        # uppercase input is lower-cased (uncased vocabulary)
        assert t.tokenize("A PHOTO of a Dress") == ["a", "photo", "of", "a", "dress"]


def test_tokenize_layout(tok):
    ids = tokenize(tok, ["A photo of a dress", NULL_TEXT, "a photo of an ankle boot " * 5], max_length=10)
    assert ids.dtype == np.int32 and ids.shape == (3, 10)
    w = dict(
        zip(
            ["a", "photo", "of", "dress"],
            tok.convert_tokens_to_ids(["a", "photo", "of", "dress"]),
            strict=True,
        )
    )
    cls, sep, pad = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
    np.testing.assert_array_equal(
        ids[0], [cls, w["a"], w["photo"], w["of"], w["a"], w["dress"], sep, pad, pad, pad]
    )
    np.testing.assert_array_equal(ids[1], [cls, sep] + [pad] * 8)  # the null prompt
    assert ids[2, 0] == cls and ids[2, -1] == sep and pad not in ids[2]  # truncated, [SEP] kept
    assert tokenize(tok, "a dress").shape == (1, 77)


def test_vocab_file_pitfall_avoided(vocab_path, tok):
    from transformers import BertTokenizer

    ours = tokenize(tok, ["a photo of a sneaker"], max_length=8)[0]
    all_unk = [tok.cls_token_id] + [tok.unk_token_id] * 5 + [tok.sep_token_id, tok.pad_token_id]
    assert tok.unk_token_id not in ours
    assert list(ours) != all_unk
    # The pitfall itself, as seen with transformers 5: vocab_file= is ignored and everything maps to [UNK].
    pitfall = BertTokenizer(vocab_file=vocab_path)("a photo of a sneaker", padding="max_length", max_length=8)
    if pitfall["input_ids"] == all_unk:
        assert list(ours) != pitfall["input_ids"]


def test_missing_tokenizer_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_bert_tokenizer(str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        load_bert_tokenizer(str(tmp_path))


def test_transformer_embedder_distinguishes_prompts(tok):
    prompts = class_captions(CLASS_NAMES)[:3] + [class_captions(CLASS_NAMES)[0], NULL_TEXT]
    tokens = jnp.asarray(tokenize(tok, prompts, max_length=16))
    enc = TransformerEmbedder(
        vocab_size=tok.vocab_size, n_embed=32, n_layer=2, max_seq_len=16, heads=2, dim_head=16
    )
    params = jax.jit(enc.init)(jax.random.key(0, impl="rbg"), tokens)
    assert params["params"]["pos_emb"].shape == (16, 32)
    assert {k for k in params["params"] if k.startswith("layers_")} == {"layers_0", "layers_1"}
    out = np.asarray(jax.jit(enc.apply)(params, tokens))
    assert out.shape == (5, 16, 32) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], out[3])  # same prompt, same embedding
    for i, j in [(0, 1), (0, 2), (1, 2), (0, 4)]:
        assert np.abs(out[i] - out[j]).max() > 1e-3
    # self-attention mixes context: prompts 0 and 1 share "a photo of a", whose embeddings still differ
    assert np.abs(out[0, 1:5] - out[1, 1:5]).max() > 1e-4
    # final LayerNorm (scale 1, bias 0 at init): each token vector has mean 0, variance ~1
    np.testing.assert_allclose(out.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.var(-1), 1.0, atol=1e-2)
    with pytest.raises(ValueError, match="max_seq_len"):
        enc.apply(params, jnp.zeros((1, 17), jnp.int32))


@pytest.mark.parametrize("kind", ["bert", "clip"])
def test_training_tokenizer_is_the_one_sampling_loads(tmp_path, kind):
    """setup_text (train loop) and inference.load_text_tokenizer (sample.py) agree, for both tokenizer kinds."""
    import importlib.util

    if kind == "clip" and importlib.util.find_spec("open_clip") is None:
        pytest.skip("open-clip-torch (its BPE file) not installed")
    from ldm_jax import inference
    from ldm_jax.config_defaults import ldm_config
    from ldm_jax.data.sources import FashionMNISTSource
    from ldm_jax.training.train_ldm import setup_text

    cfg = ldm_config()
    cfg.condition.update(type="text", tokenizer=kind)
    cfg.model.update(text_max_len=16, vocab_size=0)
    tok, text_fn, null = setup_text(cfg, str(tmp_path), FashionMNISTSource("test"))
    assert cfg.model.vocab_size == len(tok) == (49408 if kind == "clip" else len(tok))
    table = text_fn(class_captions(CLASS_NAMES))  # what the input pipeline feeds the step
    assert table.shape == (len(CLASS_NAMES), 16) and len({tuple(r) for r in table}) == len(CLASS_NAMES)
    again = inference.load_text_tokenizer(cfg, str(tmp_path))  # from WORKDIR/tokenizer, as sample.py does
    np.testing.assert_array_equal(tokenize(again, class_captions(CLASS_NAMES), 16), table)
    np.testing.assert_array_equal(tokenize(again, [NULL_TEXT], 16)[0], null)
