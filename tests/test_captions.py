"""Captioned data: sidecar .txt and metadata.jsonl/.csv folders, a tfds text feature, the per-example caption choice
(deterministic, resumable), tokenisation in the pipeline, caption problems counted, the Fashion-MNIST pairs set."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from ml_collections import config_dict
from PIL import Image

from ldm_jax.data.pipeline import default_data_config, make_dataset, make_source, pick_caption
from ldm_jax.data.sources import ImageFolderSource
from ldm_jax.data.text import TextEncoder, load_tokenizer, tokenize, train_wordpiece_vocab

WORDS = ["red", "green", "blue", "small", "large", "cat", "dog", "bird", "tree", "house"]


def _cfg(**kw) -> config_dict.ConfigDict:
    c = default_data_config()
    c.update(**{"name": "folder", "resolution": 8, "channels": 3, "preprocess": "resize", "prefetch": 0, **kw})
    return c


def _png(path, value: int, size=(10, 12)) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = [f"a {a} {b}" for a in WORDS for b in WORDS]
    path = train_wordpiece_vocab(corpus, str(tmp_path_factory.mktemp("tok")), vocab_size=100)
    return load_tokenizer("bert", path)


def test_sidecar_captions_labels_and_problems(tmp_path):
    root = tmp_path / "data"
    for i in range(6):
        cls = "cats" if i < 3 else "dogs"
        _png(str(root / cls / f"img{i}.png"), 40 * i)
        if i == 0:
            (root / cls / f"img{i}.txt").write_text("a red cat\n\na small cat\n")
        elif i == 1:
            (root / cls / f"img{i}.txt").write_bytes(b"a blue \xff cat")  # not UTF-8
        elif i == 2:
            (root / cls / f"img{i}.txt").write_text("  \n")  # empty
        elif i != 5:  # img5 has no caption
            (root / cls / f"img{i}.txt").write_text(f"a dog number {i}")
    src = ImageFolderSource(str(root))
    assert src.has_captions and src.num_captioned == 5
    ex = [src.get(i) for i in range(6)]
    assert [e["label"] for e in ex] == [0, 0, 0, 1, 1, 1]  # labels from sub-folders still work
    assert ex[0]["captions"] == ("a red cat", "a small cat")
    assert ex[1]["captions"] == ("a blue \ufffd cat",)
    assert ex[2]["captions"] == ("",) and ex[5]["captions"] == ("",)
    assert ex[3]["captions"] == ("a dog number 3",)
    assert src.caption_stats.counts() == {"missing": 1, "empty": 1, "non_utf8": 1}
    assert src.caption_corpus() == ["a red cat", "a small cat", "a blue \ufffd cat", "a dog number 3", "a dog number 4"]


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_metadata_captions(tmp_path, kind):
    root = tmp_path / "data"
    for i in range(4):
        _png(str(root / "train" / f"{i}.png"), 50 * i)
    rows = [("train/0.png", "a red tree"), ("train/1.png", ["a blue house", "a large house"]),
            ("train/3.png", "a green bird")]
    if kind == "jsonl":
        (root / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f, "text": t}) for f, t in rows))
    else:
        (root / "metadata.csv").write_text("file_name,text\n" + "\n".join(f'{f},"{t}"' for f, t in rows
                                                                          if isinstance(t, str)))
    src = ImageFolderSource(str(root))
    caps = [src.get(i)["captions"] for i in range(4)]
    assert caps[0] == ("a red tree",) and caps[2] == ("",) and caps[3] == ("a green bird",)
    assert caps[1] == (("a blue house", "a large house") if kind == "jsonl" else ("",))
    assert src.caption_stats.counts()["missing"] == (1 if kind == "jsonl" else 2)


def test_caption_choice_tokens_and_exact_resume(tmp_path, tokenizer):
    root = tmp_path / "data"
    for i in range(10):
        _png(str(root / f"{i:02d}.png"), 20 * i)
        (root / f"{i:02d}.txt").write_text("\n".join(f"a {WORDS[i]} {WORDS[j]}" for j in range(4)))
    cfg = _cfg(path=str(root))
    enc = TextEncoder(tokenizer, 8)
    ds = make_dataset(cfg, "train", 4, seed=3, text_fn=enc)
    batches = [ds.batch_at(s) for s in range(6)]
    for s, b in enumerate(batches):  # ids are the tokenizer's own, for the captions the pipeline picked
        np.testing.assert_array_equal(b["tokens"], np.asarray(tokenizer(ds.captions_at(s), padding="max_length",
                                                                        truncation=True, max_length=8)["input_ids"]))
    chosen = [c for s in range(6) for c in ds.captions_at(s)]
    assert len(set(chosen)) > 8  # several captions per image are used
    # A pure function of (seed, step, row): the same in a fresh iterator, and after a resume mid-way.
    again = make_dataset(cfg, "train", 4, seed=3, text_fn=TextEncoder(tokenizer, 8))
    again.restore({**ds.state(), "step": 3})
    for s in range(3, 6):
        np.testing.assert_array_equal(next(again)["tokens"], batches[s]["tokens"])
    # Two processes' slices concatenate to the single-process batch.
    halves = [make_dataset(cfg, "train", 4, 3, p, 2, text_fn=TextEncoder(tokenizer, 8)).batch_at(2) for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([h["tokens"] for h in halves]), batches[2]["tokens"])
    assert pick_caption(("x", "y", "z"), 3, 5, 1) == pick_caption(("x", "y", "z"), 3, 5, 1)
    # Too long for 8 tokens: cut, counted.
    assert enc.num_truncated == 0
    long = TextEncoder(tokenizer, 4)
    assert long(["a red cat dog bird", "a"]).shape == (2, 4) and long.num_truncated == 1


def test_worker_processes_give_the_same_batches_and_counts(tmp_path, tokenizer):
    """grain worker processes (data.num_workers): the same batches as in-process assembly, for 1 and 2 workers and
    after a restore mid-stream; caption problems met in the workers are counted in the main process."""
    root = tmp_path / "data"
    for i in range(12):
        _png(str(root / f"{i:02d}.png"), 20 * i)
        if i % 4:  # every 4th image has no caption; one caption is too long for 6 tokens
            (root / f"{i:02d}.txt").write_text(f"a {WORDS[i % 10]} {WORDS[(i + 1) % 10]}" + " cat dog" * (i == 5))
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "12.png")
    (root / "13.png").write_bytes(b"not a png")  # skipped (its neighbour 00.png is used), counted
    cfg = _cfg(path=str(root), random_flip=True, preprocess="random_crop")
    want = make_dataset(cfg, "train", 4, seed=5, text_fn=TextEncoder(tokenizer, 6))
    batches = [want.batch_at(s) for s in range(8)]
    for workers in (1, 2):
        cfg.num_workers = workers
        with make_dataset(cfg, "train", 4, seed=5, text_fn=TextEncoder(tokenizer, 6)) as ds:
            got = [next(ds) for _ in range(8)]
            for a, b in zip(got, batches, strict=True):
                assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
            assert ds.num_skipped == want.num_skipped == 1
            assert ds.caption_counts() == want.caption_counts()
            assert ds.caption_counts()["caption_missing"] == 4 and ds.caption_counts()["caption_truncated"] >= 1
            ds.restore(ds.state() | {"step": 3})
            np.testing.assert_array_equal(next(ds)["image"], batches[3]["image"])


def test_text_encoder_equals_tokenize_on_long_captions(tokenizer):
    from ldm_jax.data.clip_tokenizer import load_clip_tokenizer

    texts = ["a red cat dog bird tree house", "a", "", "a small green bird in a large tree near a house"]
    for tok in (tokenizer, load_clip_tokenizer(None)):
        for n in (3, 5, 40):
            np.testing.assert_array_equal(TextEncoder(tok, n)(texts), tokenize(tok, texts, n))


def test_uncaptioned_folder_refused_for_text(tmp_path, tokenizer):
    root = tmp_path / "data"
    for i in range(3):
        _png(str(root / f"{i}.png"), i)
    with pytest.raises(ValueError, match="needs captions"):
        make_dataset(_cfg(path=str(root)), "train", 2, 0, text_fn=TextEncoder(tokenizer, 8))
    assert "tokens" not in make_dataset(_cfg(path=str(root)), "train", 2, 0).batch_at(0)


def test_fashion_mnist_pairs():
    from ldm_jax.data.pairs import heldout_pairs, pair_captions

    cfg = default_data_config()
    cfg.update(name="fashion_mnist_pairs", resolution=32, width=64, channels=1, prefetch=0)
    train, test = make_source(cfg, "train"), make_source(cfg, "test")
    held = set(heldout_pairs())
    seen = {divmod(int(train.get(i)["label"]), 10) for i in range(3000)}
    assert len(seen) == 90 and not seen & held  # held-out pairs never appear in training
    assert held <= {divmod(int(test.get(i)["label"]), 10) for i in range(3000)}
    ex = train.get(7)
    a, b = divmod(int(ex["label"]), 10)
    assert ex["captions"] == pair_captions(a, b) and ex["image"].shape == (32, 64, 1)
    np.testing.assert_array_equal(ex["image"], train.get(7)["image"])
    assert pair_captions(8, 7) == ("a bag on the left and a sneaker on the right",
                                   "a sneaker on the right and a bag on the left",
                                   "a bag to the left of a sneaker", "a sneaker to the right of a bag")
    assert pair_captions(9, 0)[0] == "an ankle boot on the left and a t-shirt on the right"
    batch = make_dataset(cfg, "train", 4, 0).batch_at(0)
    assert batch["image"].shape == (4, 32, 64, 1)


def test_pair_metrics():
    from ldm_jax.evaluation.pairs import eval_plan, pair_metrics

    plan = eval_plan(2)
    a, b = plan["a"].copy(), plan["b"].copy()
    m = pair_metrics(a, b, plan)  # a perfect judge
    assert m["pair_accuracy_seen"] == m["pair_accuracy_heldout"] == m["half_accuracy"] == m["swap_consistency"] == 1
    m = pair_metrics(b, a, plan)  # always the mirror image: only symmetric pairs right, but the halves do swap
    assert m["pair_accuracy_seen"] == pytest.approx(10 / 90) and m["pair_accuracy_heldout"] == 0
    assert m["swap_consistency"] == 1 and m["half_accuracy"] == pytest.approx(0.1)
    m = pair_metrics(np.minimum(a, b), np.maximum(a, b), plan)  # ignores the order: the same image for both prompts
    assert m["swap_consistency"] == 0 and m["half_accuracy"] == pytest.approx(0.55)
    same = plan["noise_id"][(plan["a"] == 2) & (plan["b"] == 5)]
    np.testing.assert_array_equal(same, plan["noise_id"][(plan["a"] == 5) & (plan["b"] == 2)])



def test_judge_plan_pads_to_one_batch_and_keeps_the_plan_order():
    """The run's pair evaluation and studies/pairs.py judge through judge_plan: every draw gets exactly `batch` rows
    (the last chunk padded with empty prompts), the padding is dropped, predictions come back in plan order."""
    from ldm_jax.evaluation.pairs import eval_plan, judge_plan

    plan = eval_plan(1)  # 100 rows: batch 30 leaves a last chunk of 10
    classes = {p: (a, b) for p, a, b in zip(plan["prompt"], plan["a"], plan["b"], strict=True)} | {"": (0, 0)}
    sizes = []

    def draw(prompts, ids):  # each half painted with its class number
        sizes.append((len(prompts), len(ids)))
        img = np.zeros((len(prompts), 32, 64, 1), np.float32)
        for i, p in enumerate(prompts):
            img[i, :, :32], img[i, :, 32:] = classes[p]
        return img

    logits = lambda half: np.eye(10)[np.round(half.mean(axis=(1, 2, 3))).astype(int)]  # noqa: E731
    left, right = judge_plan(plan, draw, 30, logits)
    assert sizes == [(30, 30)] * 4
    np.testing.assert_array_equal(left, plan["a"])
    np.testing.assert_array_equal(right, plan["b"])

_BUILD_CAPTIONED = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow_datasets as tfds

    class TinyCaptioned(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "captions": tfds.features.Sequence({"text": tfds.features.Text()})}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(6)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"image": np.full((8, 8, 3), 10 * i, np.uint8),
                          "captions": {"text": [f"image {i} caption {j}" for j in range(1 + i % 3)]}}

    TinyCaptioned(data_dir=sys.argv[1], file_format="array_record").download_and_prepare()
""")


def test_tfds_caption_key(tmp_path, tokenizer):
    pytest.importorskip("tensorflow_datasets")
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("preparing a tfds dataset needs TensorFlow")
    script = tmp_path / "build.py"
    script.write_text(_BUILD_CAPTIONED)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, str(script), str(tmp_path / "tfds")], check=True, env=env,
                   capture_output=True, timeout=120)
    cfg = _cfg(name="tfds:tiny_captioned", data_dir=str(tmp_path / "tfds"), caption_key="captions/text")
    src = make_source(cfg, "train")
    for i in range(6):
        value = int(src.get(i)["image"][0, 0, 0]) // 10
        assert src.get(i)["captions"] == tuple(f"image {value} caption {j}" for j in range(1 + value % 3))
    ds = make_dataset(cfg, "train", 6, 0, text_fn=TextEncoder(tokenizer, 12), source=src)
    np.testing.assert_array_equal(ds.batch_at(0)["tokens"], tokenize(tokenizer, ds.captions_at(0), 12))
    # Packed from tfds (python -m ldm_jax.data.pack tfds:NAME): the same images (lossless PNG) and captions.
    from ldm_jax.data.pack import main as pack_main
    from ldm_jax.data.packed import PackedSource

    assert pack_main(["tfds:tiny_captioned", "--data_dir", str(tmp_path / "tfds"), "--caption_key", "captions/text",
                      "--out", str(tmp_path / "packed")]) == 0
    packed = PackedSource(str(tmp_path / "packed"), "train")
    for i in range(6):
        a, b = src.get(i), packed.get(i)
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["captions"] == b["captions"]
    bad = _cfg(name="tfds:tiny_captioned", data_dir=str(tmp_path / "tfds"), caption_key="captions/nope")
    with pytest.raises(ValueError, match="data.caption_key"):
        make_source(bad, "train").get(0)
