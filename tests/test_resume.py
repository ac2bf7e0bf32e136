"""Issue #4 reliability: kill -9 + restart resumes bit-exactly, SIGTERM checkpoints and exits 0, half-written
checkpoints are never picked up, and a streak of non-finite updates stops the run naming the last good checkpoint.

Every run is a `train.py` subprocess of the tiny stage-1 config (tests/tiny_config.py:ae, PatchGAN on) on 8 forced
host devices with mesh data=2 × fsdp=4, so checkpoints hold fsdp-sharded arrays. The runs share a persistent XLA
compilation cache: the straight reference run compiles the step, the interrupted chain reuses it.
"""

import os
import random
import re
import signal
import time

import jax
import numpy as np
import psutil
import pytest
import scaleout_utils as su

from ldm_jax.checkpoint import Checkpointer

LONG = dict(su.REF_OVERRIDES, **{"train.num_steps": 1000})  # same training, never reaches its end by itself
# The first and last legs assemble batches in grain worker processes, the reference and the SIGTERM leg in one
# thread: the final state must still equal the reference's bit for bit.
WORKERS = {"data.num_workers": 2}
# What a save cut short by kill -9 leaves behind (this Orbax names it STEP.orbax-checkpoint-tmp; older ones add a
# timestamp): never a valid checkpoint, even at a higher step.
FAKE_TMPS = ("900.orbax-checkpoint-tmp", "950.orbax-checkpoint-tmp-1700000000000000")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "ae_runs"
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.fixture(scope="module")
def reference(root):
    return su.reference_run(root)  # started in the background; awaited where needed


def _max_logged(proc) -> int:
    return max(su.logged_train_steps(proc), default=0)


@pytest.fixture(scope="module")
def nonfinite(reference, root):
    """base_lr=1e30: step 0 is finite and throws the weights to ~1e31, every later step overflows (started now,
    awaited by its test, so it overlaps the chain below)."""
    wd = os.path.join(root, "nonfinite")
    overrides = dict(su.REF_OVERRIDES, **{"train.num_steps": 50, "train.base_lr": 1e30, "train.ckpt_every": 1,
                                         "train.max_nonfinite_steps": 3})
    proc = su.start_train(su.TINY_AE, wd, overrides, 8, reference.cache_dir)
    yield proc, wd
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def chain(reference, nonfinite, root):  # `nonfinite` only to start it early
    """kill -9 at a random moment → restart (a half-written checkpoint planted) → SIGTERM → restart to the end."""
    wd = os.path.join(root, "chain")
    info = {"workdir": wd}
    reference.wait_compiled()  # then every run below loads the compiled step from the cache

    # 1. kill -9 at a random moment after the first checkpoint is committed.
    p1 = su.start_train(su.TINY_AE, wd, LONG | WORKERS, 8, reference.cache_dir, log_path=wd + ".1.log")
    su.wait_for(lambda: su.committed_steps(wd), 600, p1)
    workers = psutil.Process(p1.pid).children(recursive=True)
    delay = random.uniform(0.0, 1.5)
    deadline = time.time() + delay
    # Capped so the SIGTERM leg below still ends before REF_STEPS.
    su.wait_for(lambda: time.time() > deadline or _max_logged(p1) >= 9, 120, p1)
    p1.send_signal(signal.SIGKILL)
    p1.wait()
    _, alive = psutil.wait_procs(workers, timeout=20)  # they die with the run (PR_SET_PDEATHSIG), not linger
    info.update(kill_delay=delay, killed_after_step=_max_logged(p1), after_kill=su.committed_steps(wd),
                workers=len(workers), orphans=[p.pid for p in alive])
    for p in alive:
        p.kill()
    print("chain:", info)
    assert p1.returncode == -signal.SIGKILL

    # 2. A half-written checkpoint at a higher step, as a save cut short leaves it.
    for name in FAKE_TMPS:
        fake = os.path.join(wd, "checkpoints", name)
        os.makedirs(os.path.join(fake, "state"))
        with open(os.path.join(fake, "state", "garbage"), "w") as f:
            f.write("truncated")
    ckpt = Checkpointer(wd, async_save=False)
    info["latest_with_fake"] = ckpt.latest_step()
    ckpt.close()

    # 3. Restart, then SIGTERM once it has made progress.
    p2 = su.start_train(su.TINY_AE, wd, LONG, 8, reference.cache_dir, log_path=wd + ".2.log")
    su.wait_for(lambda: "restored checkpoint" in su.log_text(p2), 600, p2)
    restored = int(re.search(r"restored checkpoint at step (\d+)", su.log_text(p2)).group(1))
    su.wait_for(lambda: _max_logged(p2) > restored, 120, p2)
    p2.send_signal(signal.SIGTERM)
    info["sigterm_rc"] = su.wait(p2, 300)
    m = re.search(r"preempted: checkpoint saved at step (\d+)", su.log_text(p2))
    info.update(restored_2=restored, stopped_at=int(m.group(1)) if m else None,
                after_sigterm=su.committed_steps(wd), log_2=su.log_tail(p2))

    # 4. Restart with the reference's step count: runs to the end.
    p3 = su.start_train(su.TINY_AE, wd, su.REF_OVERRIDES | WORKERS, 8, reference.cache_dir, log_path=wd + ".3.log")
    info["final_rc"] = su.wait(p3, 600)
    info["log_3"] = su.log_text(p3)
    return info


def test_half_written_checkpoint_is_never_valid(chain):
    after_kill = chain["after_kill"]
    assert after_kill, "kill -9 came before the first committed checkpoint"
    assert chain["latest_with_fake"] == after_kill[-1]
    assert chain["restored_2"] == after_kill[-1]
    assert not {900, 950} & set(chain["after_sigterm"])


def test_sigterm_checkpoints_and_exits_zero(chain):
    assert chain["sigterm_rc"] == 0, chain["log_2"]
    stopped = chain["stopped_at"]
    assert stopped is not None, chain["log_2"]
    assert stopped > chain["restored_2"]
    assert chain["after_sigterm"][-1] == stopped  # a checkpoint exactly where it stopped
    assert stopped < su.REF_STEPS, "SIGTERM came too late for the resume leg; slow machine?"


def test_restart_resumes_from_sigterm_step(chain):
    assert chain["final_rc"] == 0, chain["log_3"][-3000:]
    m = re.search(r"restored checkpoint at step (\d+)", chain["log_3"])
    assert m and int(m.group(1)) == chain["stopped_at"]
    first_logged = min(int(s) for s in re.findall(r"\[(\d+)\] train/", chain["log_3"]))
    assert first_logged == chain["stopped_at"] + 1  # no step repeated or skipped


def test_kill9_and_sigterm_resume_is_bit_identical(chain, reference):
    ref_wd = reference.wait()
    assert chain["final_rc"] == 0, chain["log_3"][-3000:]
    ref_state, ref_meta = su.restore_host(ref_wd, su.REF_STEPS)
    state, meta = su.restore_host(chain["workdir"], su.REF_STEPS)
    assert int(state["step"]) == su.REF_STEPS
    assert chain["workers"] >= 2 and chain["orphans"] == []  # the killed run's grain workers exited with it
    su.assert_trees_equal(state, ref_state)  # params, both optimizers, discriminator BatchNorm statistics
    assert meta["data"] == ref_meta["data"]
    timing = ("train_steps_per_s",)  # wall-clock figures differ between any two runs
    drop = lambda m: {k: v for k, v in m.items() if k not in timing}  # noqa: E731
    assert drop(su.read_metrics(chain["workdir"])) == drop(su.read_metrics(ref_wd))


def test_nonfinite_streak_stops_with_last_good_checkpoint(nonfinite):
    proc, wd = nonfinite
    rc = su.wait(proc, 600)
    log = su.log_text(proc)
    assert rc != 0
    assert "cannot schedule new futures" not in log  # pending async saves were finished before raising
    m = re.search(r"FloatingPointError: (\d+) consecutive non-finite updates up to step (\d+); "
                  r"last good checkpoint: (\w+) \(train.max_nonfinite_steps\)", log)
    assert m, log[-3000:]
    finite = {int(k): float(v) for k, v in re.findall(r"\[(\d+)\] train/.*?train/finite=([\d.]+)", log)}
    first_bad = min(k for k, v in finite.items() if v == 0) - 1  # metrics logged at step+1
    assert finite[first_bad] == 1.0  # the step before was fine
    assert int(m.group(1)) == 3 and int(m.group(2)) == first_bad + 2
    # The last checkpoint saved before the streak, not the ones saved during it.
    assert m.group(3) == str(first_bad)
    assert first_bad + 1 in su.committed_steps(wd)  # saved during the streak, so not "good"
    state, _ = su.restore_host(wd, first_bad)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))
    assert int(state["skipped"]) == 0
    state, _ = su.restore_host(wd, first_bad + 1)
    assert int(state["skipped"]) == 1  # skips are counted in the state
