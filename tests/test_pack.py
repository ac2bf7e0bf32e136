"""Packed array_record shards (python -m ldm_jax.data.pack): round trips from an image folder and from
WebDataset-style tar shards, reading through data.name='packed:DIR', errors."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from ldm_jax.data.pack import main as pack_main
from ldm_jax.data.packed import PackedSource
from ldm_jax.data.pipeline import default_data_config, make_dataset
from ldm_jax.data.sources import ImageFolderSource


def _image_bytes(value: int, fmt: str = "PNG", size=(9, 11)) -> bytes:
    rng = np.random.default_rng(value)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _cfg(**kw):
    c = default_data_config()
    c.update(**{"resolution": 8, "channels": 3, "preprocess": "resize", "prefetch": 0, "random_flip": True, **kw})
    return c


def test_folder_round_trip_and_same_batches(tmp_path, capsys):
    root = tmp_path / "folder"
    for i in range(7):
        cls = ["cats", "dogs"][i % 2]
        os.makedirs(root / cls, exist_ok=True)
        (root / cls / f"{i}.png").write_bytes(_image_bytes(i))
        if i != 3:
            (root / cls / f"{i}.txt").write_text(f"caption {i}\nsecond {i}")
    out = tmp_path / "packed"
    assert pack_main([str(root), "--out", str(out), "--examples_per_shard", "3"]) == 0
    assert "packed 7 examples into 3 shard(s)" in capsys.readouterr().out
    folder, packed = ImageFolderSource(str(root)), PackedSource(str(out), "train")
    assert len(packed) == 7 and packed.classes == ["cats", "dogs"] and packed.has_captions
    for i, file in enumerate(folder.files):
        rec = packed.record(i)
        assert rec["image"] == open(file, "rb").read()  # the file's bytes, not re-encoded
        a, b = folder.get(i), packed.get(i)
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["label"] == b["label"] and a["captions"] == b["captions"]
    # The pipeline reads packed:DIR exactly as the folder (labels, captions, augmentation), also in workers.
    want = make_dataset(_cfg(name="folder", path=str(root)), "train", 4, seed=1)
    got = make_dataset(_cfg(name="packed:" + str(out), num_workers=2), "train", 4, seed=1)
    with got:
        for s in range(4):
            a, b = want.batch_at(s), next(got)
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])
            assert want.captions_at(s) == got.captions_at(s)
    assert got.caption_counts()["caption_missing"] == 1  # 3.png has no caption


def _tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_tars(tmp_path, capsys):
    shards = tmp_path / "shards"
    os.makedirs(shards)
    _tar(shards / "000.tar", [("a/0001.jpg", _image_bytes(1, "JPEG")), ("a/0001.txt", b"a red cat"),
                              ("a/0001.cls", b"3"),
                              ("a/0002.png", _image_bytes(2)),
                              ("a/0002.json", json.dumps({"caption": "a dog"}).encode()),
                              ("a/0003.webp", b"not an image"), ("a/0003.txt", b"broken")])
    _tar(shards / "001.tar", [("0004.png", _image_bytes(4)), ("0005.json", b"{}")])  # 0005: no image, ignored
    out = tmp_path / "packed"
    assert pack_main([str(shards), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "packed 3 examples" in printed and "skipped 1 unreadable" in printed
    src = PackedSource(str(out), "train")
    recs = [src.record(i) for i in range(len(src))]
    assert [r["key"] for r in recs] == ["000.tar/a/0001", "000.tar/a/0002", "001.tar/0004"]
    assert [r["captions"] for r in recs] == [["a red cat"], ["a dog"], []]
    assert [r["label"] for r in recs] == [3, 0, 0]
    assert recs[0]["image"] == _image_bytes(1, "JPEG") and src.has_captions
    assert src.get(2)["captions"] == ("",)  # no caption: the null condition, counted
    assert src.caption_stats.counts()["missing"] == 1


def test_pack_errors(tmp_path, capsys):
    assert pack_main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither an image folder" in err
    (tmp_path / "bad.tar").write_bytes(b"garbage" * 100)
    assert pack_main([str(tmp_path / "bad.tar"), "--out", str(tmp_path / "o")]) == 2
    assert "not a readable tar file" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no packed split 'test'"):
        make_dataset(_cfg(name="packed:" + str(tmp_path)), "test", 2, 0)
