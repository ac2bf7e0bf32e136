"""Data pipeline: Fashion-MNIST padding, determinism/resume, epochs, multi-host, folders, photos, tfds."""

import importlib.util
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from ldm_jax.data import (
    BatchIterator,
    ImageFolderSource,
    InMemorySource,
    PhotoSource,
    Preprocessor,
    TFDSSource,
    default_data_config,
    load_fashion_mnist,
    make_dataset,
    to_channels,
)
from ldm_jax.data.fashion_mnist import DEFAULT_ROOT

HAVE_FMNIST = os.path.exists(os.path.join(os.environ.get("LDM_JAX_FASHION_MNIST", DEFAULT_ROOT),
                                          "train-images-idx3-ubyte.gz"))
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST files not installed")


def _cfg(**overrides):
    cfg = default_data_config()
    cfg.prefetch = 0
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg.strip(), msg
    return msg


@pytest.fixture(scope="module")
def fmnist():
    if not HAVE_FMNIST:
        pytest.skip("Fashion-MNIST files not installed")
    return load_fashion_mnist("train")


@pytest.fixture(scope="module")
def random_source():
    """48 random RGB 12x10 images with distinct labels, for fast pipeline tests."""
    rng = np.random.default_rng(0)
    return InMemorySource(rng.integers(0, 256, (48, 12, 10, 3), dtype=np.uint8), np.arange(48))


@needs_fmnist
def test_fashion_mnist_batch_padding_and_labels(fmnist):
    images, labels = fmnist
    it = make_dataset(_cfg(), "train", batch_size=8, seed=3)
    step = 7
    batch = it.batch_at(step)
    x = batch["image"]
    assert x.shape == (8, 32, 32, 1) and x.dtype == np.float32 and batch["label"].dtype == np.int32
    assert x.min() >= -1.0 and x.max() <= 1.0
    border = np.concatenate([x[:, :2].ravel(), x[:, -2:].ravel(), x[:, :, :2].ravel(), x[:, :, -2:].ravel()])
    assert np.all(border == -1.0)
    # Epoch 0 order is the (seed, epoch) permutation; the batch is positions step*B .. step*B+B-1 of it.
    idx = np.random.default_rng([3, 0, 0]).permutation(len(images))[step * 8:(step + 1) * 8]
    np.testing.assert_array_equal(it.indices_at(step), idx)
    np.testing.assert_array_equal(batch["label"], labels[idx])
    np.testing.assert_allclose(x[:, 2:30, 2:30], images[idx].astype(np.float32) / 127.5 - 1.0, atol=1e-6)


def test_determinism_and_resume(random_source):
    pre = Preprocessor(resolution=8, channels=3, mode="random_crop", random_flip=True)
    make = lambda seed, **kw: BatchIterator(random_source, 8, seed, pre, **kw)
    a, b, c = make(5), make(5), make(6)
    batches = [next(a) for _ in range(9)]  # 72 positions: crosses the 48-example epoch boundary
    for k, bt in enumerate(batches):
        other = next(b)
        np.testing.assert_array_equal(bt["image"], other["image"])
        np.testing.assert_array_equal(bt["label"], other["label"])
        np.testing.assert_array_equal(bt["image"], a.batch_at(k)["image"])
    assert not np.array_equal(batches[0]["image"], next(c)["image"])
    # restore(state()) after k steps continues identically, also into a fresh iterator with prefetching.
    d = make(5)
    for _ in range(4):
        next(d)
    state = d.state()
    assert state["step"] == 4
    with make(5, prefetch=2) as e:
        e.restore(state)
        for k in range(4, 9):
            np.testing.assert_array_equal(next(e)["image"], batches[k]["image"])
        e.restore({**state, "step": 1})  # jump back while the prefetch thread runs ahead
        np.testing.assert_array_equal(next(e)["image"], batches[1]["image"])
        assert e.step == 2
    with pytest.raises(ValueError, match="seed"):
        make(6).restore(state)
    # Augmentation is really random across rows/steps (flips and crops differ), yet reproducible.
    assert not np.array_equal(batches[0]["image"], batches[6]["image"])


def test_every_example_once_per_epoch(random_source):
    pre = Preprocessor(resolution=12, channels=3, mode="pad")
    it = BatchIterator(random_source, 10, seed=1, preprocessor=pre, num_examples=30)
    assert it.steps_per_epoch == 3
    seq = np.concatenate([it.indices_at(s) for s in range(9)])  # 3 epochs
    epochs = seq.reshape(3, 30)
    for e in range(3):
        np.testing.assert_array_equal(np.sort(epochs[e]), np.arange(30))
        np.testing.assert_array_equal(epochs[e], it.permutation(e))
    assert not np.array_equal(epochs[0], epochs[1])
    # Content check: the epoch's images are exactly the first 30 source images, each once.
    got = np.concatenate([it.batch_at(s)["image"] for s in range(3)])
    want = random_source.images[:30].astype(np.float32) / 127.5 - 1.0
    order = np.argsort(np.concatenate([it.batch_at(s)["label"] for s in range(3)]))
    np.testing.assert_allclose(got[order][:, :, 1:11], want, atol=1e-6)  # 10 wide, padded to 12
    assert np.all(got[:, :, [0, 11]] == -1.0)
    # A batch size that does not divide the epoch: positions wrap into the next epoch's order.
    it7 = BatchIterator(random_source, 7, seed=1, preprocessor=pre, num_examples=30)
    seq7 = np.concatenate([it7.indices_at(s) for s in range(9)])[:60]
    np.testing.assert_array_equal(seq7, np.concatenate([it.permutation(0), it.permutation(1)]))


def test_multi_host_slices_union_equals_global(random_source):
    pre = Preprocessor(resolution=8, channels=1, mode="random_crop", random_flip=True)
    single = BatchIterator(random_source, 8, 11, pre)
    hosts = [BatchIterator(random_source, 8, 11, pre, process_index=i, process_count=2) for i in range(2)]
    for step in (0, 5, 6):
        g = single.batch_at(step)
        parts = [h.batch_at(step) for h in hosts]
        assert parts[0]["image"].shape == (4, 8, 8, 1)
        np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), g["image"])
        np.testing.assert_array_equal(np.concatenate([p["label"] for p in parts]), g["label"])
    # The state is process independent: a 2-host run may resume on one host.
    next(hosts[0]), next(hosts[0])
    single.restore(hosts[0].state())
    np.testing.assert_array_equal(next(single)["image"][:4], hosts[0].batch_at(2)["image"])


def test_preprocessing_against_numpy():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    # resize: shorter side 64 -> 32 is a 2x2 box average, then the centre 32 of 48 columns.
    out = Preprocessor(resolution=32, channels=3, mode="resize")(img).astype(int)
    box = img.reshape(32, 2, 48, 2, 3).mean(axis=(1, 3))[:, 8:40]
    assert out.shape == (32, 32, 3) and np.abs(out - box).max() <= 1
    # RGB -> gray matches PIL's luma; gray -> RGB repeats.
    gray = to_channels(img, 1)
    np.testing.assert_array_equal(gray[..., 0], np.asarray(Image.fromarray(img).convert("L")))
    np.testing.assert_array_equal(to_channels(gray, 3), np.repeat(gray, 3, axis=-1))
    # random_crop: a window of the resized image; flip only when augmenting.
    pre = Preprocessor(resolution=16, channels=3, mode="random_crop", random_flip=True)
    small = img[:16, :40]
    crops = [pre(small, np.random.default_rng(s)) for s in range(8)]
    windows = [small[:, x:x + 16] for x in range(25)]
    for c in crops:
        assert any(np.array_equal(c, w) or np.array_equal(c[:, ::-1], w) for w in windows)
    assert len({c.tobytes() for c in crops}) > 1
    eval_pre = Preprocessor(resolution=16, channels=3, mode="random_crop", random_flip=True, augment=False)
    np.testing.assert_array_equal(eval_pre(small, np.random.default_rng(0)), small[:, 12:28])


def _write_folder(root):
    rng = np.random.default_rng(0)
    os.makedirs(root / "a")
    os.makedirs(root / "b" / "sub")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "a" / "0.png")
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L").save(root / "a" / "1.png")
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(root / "b" / "2.jpg", quality=95)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "b" / "sub" / "3.png")
    # Corrupt: a PNG cut in half (valid header, truncated data); and a zero-byte JPEG.
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "a" / "bad.png")
    data = (root / "a" / "bad.png").read_bytes()
    (root / "a" / "bad.png").write_bytes(data[:len(data) // 2])
    (root / "b" / "empty.jpg").write_bytes(b"")
    (root / "b" / "notes.txt").write_text("not an image")


def test_image_folder(tmp_path):
    _write_folder(tmp_path)
    src = ImageFolderSource(str(tmp_path))
    rel = [os.path.relpath(f, tmp_path) for f in src.files]
    assert rel == ["a/0.png", "a/1.png", "a/bad.png", "b/2.jpg", "b/empty.jpg", "b/sub/3.png"]
    assert src.classes == ["a", "b"] and src.labels.tolist() == [0, 0, 0, 1, 1, 1]
    valid = {f: np.asarray(Image.open(tmp_path / f).convert("RGB")) for f in ("a/0.png", "a/1.png", "b/2.jpg",
                                                                                 "b/sub/3.png")}
    cfg = _cfg(name="folder", path=str(tmp_path), resolution=16, channels=3, preprocess="pad")
    it = make_dataset(cfg, "train", batch_size=6, seed=0)
    batch = next(it)  # one full epoch
    want = {f: v.astype(np.float32) / 127.5 - 1.0 for f, v in valid.items()}
    label_of = {f: 0 if f.startswith("a/") else 1 for f in valid}
    for img, lbl in zip(batch["image"], batch["label"], strict=True):
        match = [f for f, v in want.items() if np.array_equal(img, v)]
        assert len(match) == 1 and label_of[match[0]] == lbl
    assert it.num_skipped == 2 and src.num_skipped == 0
    skipped = sorted(os.path.relpath(f, tmp_path) for f in it.source.skipped_files)
    assert skipped == ["a/bad.png", "b/empty.jpg"]
    # An unreadable file is replaced by the next readable one, deterministically.
    np.testing.assert_array_equal(it.source.get(2)["image"], valid["b/2.jpg"])
    np.testing.assert_array_equal(it.source.get(4)["image"], valid["b/sub/3.png"])
    with pytest.raises(FileNotFoundError) as e:
        make_dataset(_cfg(name="folder", path=str(tmp_path / "nope")), "train", 4, 0)
    assert "data.path" in _one_line(e)


def test_photos_rgb_and_deterministic():
    pytest.importorskip("skimage")
    import skimage.data

    a = PhotoSource(["camera", "chelsea"], crop=16, num_crops=6, seed=4, scale_range=(1.0, 1.0))
    b = PhotoSource(["camera", "chelsea"], crop=16, num_crops=6, seed=4, scale_range=(1.0, 1.0))
    c = PhotoSource(["camera", "chelsea"], crop=16, num_crops=6, seed=5, scale_range=(1.0, 1.0))
    ex = [a.get(i) for i in range(6)]
    assert all(e["image"].shape == (16, 16, 3) and e["image"].dtype == np.uint8 for e in ex)
    assert [int(e["label"]) for e in ex] == [0, 1, 0, 1, 0, 1]
    assert all(np.array_equal(e["image"], b.get(i)["image"]) for i, e in enumerate(ex))
    assert not all(np.array_equal(e["image"], c.get(i)["image"]) for i, e in enumerate(ex))
    # At scale 1 a crop is a window of the photo: gray 'camera' repeated to 3 equal channels.
    cam = skimage.data.camera()
    crop = ex[0]["image"]
    assert np.array_equal(crop[..., 0], crop[..., 2])
    windows = np.lib.stride_tricks.sliding_window_view(cam, (16, 16))
    assert np.any(np.all(windows == crop[..., 0], axis=(2, 3)))
    # Through the pipeline: RGB, in range, reproducible.
    cfg = _cfg(name="photos", photo_names="astronaut,coffee", num_crops=8, resolution=16, channels=3,
               preprocess="resize", random_flip=True)
    x1, x2 = (make_dataset(cfg, "train", 4, 0).batch_at(1)["image"] for _ in range(2))
    assert x1.shape == (4, 16, 16, 3) and -1 <= x1.min() and x1.max() <= 1
    np.testing.assert_array_equal(x1, x2)
    with pytest.raises(ValueError) as e:
        PhotoSource(["no_such_photo"])
    assert "data.photo_names" in _one_line(e)


def test_tfds_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now raises ImportError
    with pytest.raises(ImportError) as e:
        make_dataset(_cfg(name="tfds:mnist"), "train", 4, 0)
    assert "pip install tensorflow-datasets" in _one_line(e)


def test_tfds_missing_dataset_never_downloads(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    t0 = time.time()
    with pytest.raises(FileNotFoundError) as e:
        TFDSSource("mnist", "train", data_dir=str(tmp_path))
    assert "data.name" in _one_line(e) and "mnist" in str(e.value)
    with pytest.raises(ValueError) as e:
        TFDSSource("no_such_dataset_xyz", "train", data_dir=str(tmp_path))
    assert "data.name" in _one_line(e)
    assert time.time() - t0 < 30  # a download attempt offline would take minutes
    assert not any(tmp_path.rglob("*.gz")) and not (tmp_path / "downloads").exists()


_BUILD_TINY = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow_datasets as tfds

    class TinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(num_classes=3)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(10)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"image": np.full((6 + i % 4, 5, 3), 10 * i, np.uint8), "label": i % 3}

    TinyImages(data_dir=sys.argv[1], file_format="array_record").download_and_prepare()
""")


def test_tfds_array_record_roundtrip(tmp_path):
    """A tiny array_record dataset prepared in a subprocess (TF there), read here without TensorFlow."""
    pytest.importorskip("tensorflow_datasets")
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("preparing a tfds dataset needs TensorFlow")
    script = tmp_path / "build.py"
    script.write_text(_BUILD_TINY)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, str(script), str(tmp_path / "tfds")], check=True, env=env,
                   capture_output=True, timeout=120)
    tf_before = "tensorflow" in sys.modules
    cfg = _cfg(name="tfds:tiny_images", data_dir=str(tmp_path / "tfds"), resolution=12, channels=3)
    batch = make_dataset(cfg, "train", batch_size=10, seed=0).batch_at(0)
    values = np.rint((batch["image"][:, 6, 6, 0] + 1.0) * 127.5).astype(int)  # centre pixel = 10 * i
    assert sorted(values.tolist()) == [10 * i for i in range(10)]
    np.testing.assert_array_equal(batch["label"], (values // 10) % 3)
    assert np.all(batch["image"][:, 0] == -1.0)  # padded rows (images are at most 9 tall)
    assert tf_before or "tensorflow" not in sys.modules  # reading did not import TensorFlow


def test_config_errors(random_source):
    pre = Preprocessor(resolution=8, channels=3)
    with pytest.raises(ValueError) as e:
        BatchIterator(random_source, 6, 0, pre, process_count=4)
    assert "train.batch_size" in _one_line(e)
    with pytest.raises(ValueError) as e:
        make_dataset(_cfg(name="mnist_typo"), "train", 4, 0)
    assert "data.name" in _one_line(e)
    with pytest.raises(ValueError) as e:
        make_dataset(_cfg(), "train", 6, 0, process_index=1, process_count=4)
    assert "train.batch_size" in _one_line(e)
    for field, kw in (("data.preprocess", {"mode": "crop"}), ("data.channels", {"channels": 2}),
                      ("data.resolution", {"resolution": 0})):
        with pytest.raises(ValueError, match=field):
            Preprocessor(**{"resolution": 8, **kw})


def test_uint8_batches_convert_on_device_to_the_float_batches(random_source):
    """train.py's pipeline ships uint8 (a quarter of the bytes); the steps' `as_float` under jit gives exactly the
    float32 batch the host conversion gives."""
    import jax

    from ldm_jax.data.transforms import as_float

    pre = Preprocessor(resolution=8, channels=3, mode="random_crop", random_flip=True)
    floats = BatchIterator(random_source, 8, 3, pre).batch_at(2)
    raw = BatchIterator(random_source, 8, 3, pre, uint8_images=True).batch_at(2)
    assert raw["image"].dtype == np.uint8 and floats["image"].dtype == np.float32
    assert raw["image"].nbytes * 4 == floats["image"].nbytes
    np.testing.assert_array_equal(np.asarray(jax.jit(as_float)(raw["image"])), floats["image"])
    np.testing.assert_array_equal(as_float(floats["image"]), floats["image"])  # float input passes through
    np.testing.assert_array_equal(raw["label"], floats["label"])
