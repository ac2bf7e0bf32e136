"""Issue #20: the workdir lock, recovery from a damaged newest checkpoint, counts validated before anything
compiles, and resumes that would silently change the run refused."""

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scaleout_utils as su
from test_errors import raises_before_compile

from ldm_jax.checkpoint import Checkpointer
from ldm_jax.training import train_autoencoder
from ldm_jax.training.workdir_lock import WorkdirLock, WorkdirLockedError

HOLD = textwrap.dedent("""
    import sys, time
    from ldm_jax.training.workdir_lock import WorkdirLock
    lock = WorkdirLock(sys.argv[1]); lock.acquire(); print("held", flush=True); time.sleep(60)
""")


def test_second_run_on_a_locked_workdir_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        msg = raises_before_compile(WorkdirLockedError, rf"^workdir .* is in use by another run \(pid {holder.pid} on "
                                    r"host .*\); stop it or use another --workdir$",
                                    train_autoencoder.train_and_evaluate, su.tiny_ae_config(), str(tmp_path))
        assert str(holder.pid) in msg
        assert not os.path.exists(tmp_path / "checkpoints")  # nothing of the holder's workdir was touched
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_from_killed_run_is_taken_over(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()  # kill -9: the file stays, its flock goes with the process
    holder.wait()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == holder.pid
    lock = WorkdirLock(str(tmp_path))
    with caplog.at_level("WARNING"):
        lock.acquire()
    assert f"stale lock left by pid {holder.pid}" in caplog.text
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    with pytest.raises(WorkdirLockedError):  # held now, also against this process's second open
        WorkdirLock(str(tmp_path)).acquire()
    lock.release()
    WorkdirLock(str(tmp_path)).acquire()  # released cleanly: taken without a warning


def _two_checkpoints(path):
    state = {"w": np.arange(1000, dtype=np.float32), "step": np.array(1, np.int32)}
    ckpt = Checkpointer(str(path), async_save=False)
    ckpt.save(1, state, {"config": {}}, force=True)
    ckpt.save(2, {"w": state["w"] * 2, "step": np.array(2, np.int32)}, {"config": {}}, force=True)
    ckpt.close()
    return state


@pytest.mark.parametrize("damage", ["truncate_arrays", "delete_meta"])
def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, damage, caplog):
    state = _two_checkpoints(tmp_path)
    step2 = tmp_path / "checkpoints" / "2" / "state"
    if damage == "truncate_arrays":
        files = [os.path.join(d, f) for d, _, fs in os.walk(step2) for f in fs if os.path.getsize(os.path.join(d, f))]
        for f in files:
            if "ocdbt" in f or f.endswith(("/d", ".data")) or "/d/" in f:
                with open(f, "r+b") as fh:
                    fh.truncate(max(1, os.path.getsize(f) // 3))
    else:
        os.remove(step2.parent / "meta" / "metadata")
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    with caplog.at_level("WARNING"):
        restored, _ = ckpt.restore_intact(state)
    ckpt.close()
    np.testing.assert_array_equal(restored["w"], state["w"])  # step 1's, exactly
    assert "checkpoint at step 2 is damaged" in caplog.text
    moved = os.listdir(tmp_path / "checkpoints.damaged")
    assert len(moved) == 1 and moved[0].startswith("2-")  # moved aside, not deleted
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]


def test_no_restorable_checkpoint_is_one_line_and_moves_nothing(tmp_path):
    state = _two_checkpoints(tmp_path)
    for step in ("1", "2"):
        os.remove(tmp_path / "checkpoints" / step / "meta" / "metadata")
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    with pytest.raises(ValueError, match=r"^no checkpoint in .*checkpoints can be restored; the newest \(step 2\) "
                                         r"fails with \w+: [^\n]*$"):
        ckpt.restore_intact(state)
    ckpt.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]  # maybe our fault: nothing moved


@pytest.mark.parametrize("overrides, pattern", [
    ({"train.num_steps": -5}, r"^train\.num_steps must be an integer >= 1, got -5$"),
    ({"train.ckpt_every": 0}, r"^train\.ckpt_every must be an integer >= 1, got 0$"),
    ({"train.log_every": 0}, r"^train\.log_every must be an integer >= 1, got 0$"),
    ({"eval.batch_size": 0}, r"^eval\.batch_size must be an integer >= 1, got 0$"),
    ({"train.base_lr": 0.0}, r"^train\.base_lr must be a finite number > 0, got 0\.0$"),
    ({"train.max_to_keep": 0}, r"^train\.max_to_keep must be an integer >= 1, got 0$"),
])
def test_counts_and_rates_checked_before_compile(tmp_path, overrides, pattern):
    raises_before_compile(ValueError, pattern, train_autoencoder.train_and_evaluate, su.tiny_ae_config(**overrides),
                          str(tmp_path))


@pytest.mark.parametrize("overrides, pattern", [
    ({"train.batch_size": 16}, r"^train\.batch_size=16 but the checkpoint in .* was trained with 8; resume with the "
                               r"same value, or set train\.allow_resume_changes=True to continue anyway$"),
    ({"train.scale_lr": False}, r"^train\.scale_lr=False but the checkpoint .* was trained with True;"),
    ({"seed": 3}, r"^seed=3 but the checkpoint .* was trained with 0;"),
])
def test_resume_that_changes_the_run_is_refused(tmp_path, overrides, pattern):
    su.write_stage1_workdir(str(tmp_path), su.tiny_ae_config())
    raises_before_compile(ValueError, pattern, train_autoencoder.train_and_evaluate, su.tiny_ae_config(**overrides),
                          str(tmp_path))


# --- through the real entry point: one line on stderr, exit status 2, no traceback ---

def _train_py(args, tmp_path, env_extra=None):
    env = dict(su.subprocess_env(1), **(env_extra or {}))
    proc = subprocess.run([sys.executable, os.path.join(su.REPO, "train.py"), *args], capture_output=True, text=True,
                          env=env, cwd=str(tmp_path), timeout=300)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("case", ["missing_config", "unknown_override", "workdir_is_file", "negative_steps",
                                  "locked"])
def test_train_py_user_errors_are_one_line(tmp_path, case):
    wd = str(tmp_path / "wd")
    args = ["--config", su.TINY_AE, "--workdir", wd]
    expect = {
        "missing_config": r"--config /nonexistent/config\.py(:ae)?: no such file",
        "unknown_override": r"'num_stepz' Did you mean \"num_steps\"",
        "workdir_is_file": r"--workdir .* exists and is not a directory",
        "negative_steps": r"train\.num_steps must be an integer >= 1, got -5",
        "locked": r"workdir .* is in use by another run \(pid \d+ on host",
    }[case]
    holder = None
    if case == "missing_config":
        args[1] = "/nonexistent/config.py"
    elif case == "unknown_override":
        args.append("--config.train.num_stepz=5")
    elif case == "workdir_is_file":
        open(wd, "w").close()
    elif case == "negative_steps":
        args.append("--config.train.num_steps=-5")
    else:
        holder = subprocess.Popen([sys.executable, "-c", HOLD, wd], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "held"
    try:
        rc, err = _train_py(args, tmp_path)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    lines = [ln for ln in err.splitlines() if ln.startswith("train.py: error:")]
    assert rc == 2, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert re.search(expect, lines[0]), lines[0]


def test_16bit_and_palette_pngs_convert_without_clipping(tmp_path, caplog):
    from PIL import Image

    from ldm_jax.data.sources import ImageFolderSource

    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "a16.png")  # mode I;16
    pal = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).convert("P")
    pal.save(tmp_path / "b_palette.png")
    (tmp_path / "c_bad.png").write_bytes(b"not a png")
    src = ImageFolderSource(str(tmp_path))
    img16 = src.get(0)["image"]
    np.testing.assert_array_equal(img16[..., 0], np.round(ramp / 257.0).astype(np.uint8))  # scaled, not clipped
    assert img16.shape == (8, 8, 3) and img16.max() == 255 and len(np.unique(img16)) > 60
    np.testing.assert_array_equal(src.get(1)["image"][..., 0], np.asarray(pal.convert("L")))
    with caplog.at_level("WARNING"):
        src.get(2)  # unreadable: the next readable one, with its name logged
    assert src.num_skipped == 1 and "c_bad.png" in caplog.text


def test_convert_damaged_files_are_one_line(tmp_path, capsys):
    import argparse

    import torch

    from ldm_jax.convert.__main__ import main as convert_main
    from ldm_jax.convert.core import load_state_dict

    rng = np.random.default_rng(0)
    cases = {"rand.ckpt": r"not a readable PyTorch checkpoint \(damaged, truncated or another format\)$",
             "bad.safetensors": r"not a readable \.safetensors file \(.*\); the file is damaged or truncated$"}
    for name, pattern in cases.items():
        path = tmp_path / name
        path.write_bytes(rng.bytes(4096 if name.endswith("ckpt") else 100))
        assert convert_main([str(path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(pattern, err), err
        assert "weights_only=False" not in err  # torch's unsafe hint is not passed on
    path = tmp_path / "objects.ckpt"  # a refused object keeps its own message
    torch.save({"state_dict": {"w": torch.zeros(1)}, "callback": argparse.Namespace(a=1)}, path)
    with pytest.raises(ValueError, match="not loaded for safety"):
        load_state_dict(str(path))


def test_sample_py_out_is_a_file(tmp_path, capsys):
    import sample

    out = tmp_path / "taken"
    out.write_text("x")
    assert sample.main(["--workdir", str(tmp_path), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"sample.py: error: --out {out} exists and is not a directory"
    assert out.read_text() == "x"


def test_stage1_compiles_its_gan_program_mid_run(tmp_path):
    """The PatchGAN program is compiled when disc_start is reached, from the live state (the initial state's
    buffers were donated to the first step by then), and the run ends normally."""
    cfg = su.tiny_ae_config(**{"loss.disc_start": 2, "train.num_steps": 4, "train.ckpt_every": 4})
    train_autoencoder.train_and_evaluate(cfg, str(tmp_path))
    assert su.committed_steps(str(tmp_path)) == [4]
    assert json.loads((tmp_path / "metrics.json").read_text())["skipped_updates"] == 0.0
