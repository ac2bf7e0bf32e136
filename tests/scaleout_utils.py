"""Shared helpers of the scale-out / resume / error tests: tiny configs, stage-1 workdirs, train.py subprocesses.

Not a test module (no `test_` prefix); imported by tests/test_scaleout.py, test_resume.py and test_errors.py.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from ldm_jax.config_defaults import autoencoder_config, ldm_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Unoptimised XLA CPU code compiles several times faster; these tests are compile-bound and the programs tiny.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
FAST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
RES = 16  # image side in these tests


def tiny_ae_config(**overrides: Any) -> ml_collections.ConfigDict:
    """A KL-f2 autoencoder on 16×16 Fashion-MNIST crops, PatchGAN on from step 0, no LPIPS anywhere."""
    c = autoencoder_config("kl")
    c.model.update(embed_dim=4, z_channels=4, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                   resolution=RES, in_channels=1, norm_groups=8, mid_attn=False)
    c.data.update(name="fashion_mnist", resolution=RES, channels=1, preprocess="pad", random_flip=False,
                  num_examples=256, prefetch=0)
    # lpips_path to a missing file: no perceptual loss and no LPIPS eval metric (VGG would dominate the cost).
    c.loss.update(perceptual_weight=0.0, lpips_path="/nonexistent/lpips.npz", disc_start=0, disc_weight=0.5,
                  disc_n_layers=1, disc_ndf=8)
    c.train.update(batch_size=8, num_steps=4, base_lr=1e-4, log_every=1, ckpt_every=2, grid_every=0,
                   max_to_keep=100)
    c.eval.update(split="test", num_examples=8, batch_size=8)
    c.mesh.min_shard_size = 64  # tiny tensors too: make fsdp really shard something
    _apply(c, overrides)
    return c


def tiny_ldm_config(first_stage_workdir: str, **overrides: Any) -> ml_collections.ConfigDict:
    """An unconditional 32-channel UNet on the 8×8×4 latents of `tiny_ae_config`."""
    c = ldm_config()
    c.first_stage.update(workdir=first_stage_workdir, scale_factor=1.0, scale_by_std=False)
    c.condition.update(type="none")
    c.model.update(conditioning_key=None, cond_stage="none")
    c.model.unet.update(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1,), num_res_blocks=1,
                        attention_resolutions=(), num_heads=-1, num_head_channels=32)
    c.data.update(name="fashion_mnist", resolution=RES, channels=1, preprocess="pad", random_flip=False,
                  num_examples=256, prefetch=0)
    c.diffusion.update(num_timesteps=100)
    c.train.update(batch_size=8, num_steps=2, base_lr=1e-3, scale_lr=False, warmup_steps=0, ema_decay=0.9,
                   log_every=1, ckpt_every=1)
    c.sampling.update(sampler="ddim", steps=2, guidance=1.0, grid_per_class=2)
    c.mesh.min_shard_size = 64
    _apply(c, overrides)
    return c


def _apply(c: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
    """Dotted overrides: {"model.ch": 16} as `--config.model.ch=16` would."""
    for dotted, value in overrides.items():
        node = c
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value


def flags_for(overrides: dict[str, Any]) -> list[str]:
    """`--config.a.b=value` flags for train.py."""
    out = []
    for k, v in overrides.items():
        out.append(f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}")
    return out


def init_params_numpy(abstract: Any, seed: int = 0) -> Any:
    """Deterministic random values for an abstract pytree without compiling an init (scales ≈ 1, others ≈ 0)."""
    rng = np.random.default_rng(seed)
    paths = jax.tree_util.tree_flatten_with_path(abstract)[0]
    leaves = []
    for path, leaf in paths:
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            leaves.append(np.ones(leaf.shape, leaf.dtype))
        else:
            leaves.append((0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype))
    return jax.tree.unflatten(jax.tree.structure(abstract), leaves)


def write_stage1_workdir(workdir: str, config: ml_collections.ConfigDict, state: Any = None, step: int = 1) -> None:
    """A stage-1 workdir as train_autoencoder leaves it (config.json + Orbax checkpoint), without training.

    `state`: an AEState-like pytree with params/model_state; default: random numpy params, no compile needed."""
    from ldm_jax.checkpoint import Checkpointer
    from ldm_jax.models.autoencoder import build_autoencoder
    from ldm_jax.workdir import save_config

    if state is None:
        model = build_autoencoder(config.model)
        x = jax.ShapeDtypeStruct((1, RES, RES, config.model.in_channels), np.float32)
        abstract = jax.eval_shape(lambda k, x: model.init({"params": k}, x), jax.random.key(0), x)
        params = init_params_numpy(abstract["params"])
        state = {"params": {"model": params, "logvar": np.zeros((), np.float32)}, "model_state": {}}
    save_config(config, workdir)
    ckpt = Checkpointer(workdir, async_save=False)
    ckpt.save(step, state, {"config": config.to_dict()}, force=True)
    ckpt.close()


# --- subprocesses ---

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(num_devices: int, cache_dir: str | None = None) -> dict[str, str]:
    """Environment of a train.py child: forced host device count, cheap compiles, shared compilation cache."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices} {FAST_XLA_FLAGS}"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["JAX_PLATFORMS"] = "cpu"
    if cache_dir:
        # Runs of the same program (straight / killed / resumed) compile it once.
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def train_cmd(config_file: str, workdir: str, overrides: dict[str, Any]) -> list[str]:
    return [sys.executable, os.path.join(REPO, "train.py"), f"--config={config_file}", f"--workdir={workdir}",
            *flags_for(overrides)]


def start_train(config_file: str, workdir: str, overrides: dict[str, Any], num_devices: int = 8,
                cache_dir: str | None = None, log_path: str | None = None,
                extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """Starts train.py in a child process; its stdout+stderr go to `log_path` (default WORKDIR.log)."""
    log_path = log_path or workdir.rstrip("/") + ".log"
    log = open(log_path, "w")  # the child holds its own descriptor; the parent keeps only the path
    env = subprocess_env(num_devices, cache_dir) | (extra_env or {})
    proc = subprocess.Popen(train_cmd(config_file, workdir, overrides), stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=REPO)
    proc.log_path = log_path  # type: ignore[attr-defined]
    log.close()
    return proc


def wait(proc: subprocess.Popen, timeout: float) -> int:
    """Waits for a child; on timeout kills it and fails with the tail of its log."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"train.py timed out after {timeout}s:\n{log_tail(proc)}") from None


def log_tail(proc: subprocess.Popen, n: int = 40) -> str:
    with open(proc.log_path) as f:  # type: ignore[attr-defined]
        return "".join(f.readlines()[-n:])


def log_text(proc: subprocess.Popen) -> str:
    with open(proc.log_path) as f:  # type: ignore[attr-defined]
        return f.read()


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, poll: float = 0.05) -> None:
    """Polls `predicate()` until true; fails on timeout or when `proc` exits first."""
    t0 = time.time()
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"train.py exited ({proc.returncode}) before the awaited event:\n{log_tail(proc)}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"awaited event did not happen in {timeout}s" +
                                 (f":\n{log_tail(proc)}" if proc is not None else ""))
        time.sleep(poll)


def committed_steps(workdir: str) -> list[int]:
    """Finished checkpoint steps (plain integer directory names; Orbax's temporaries have suffixes)."""
    d = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d) if re.fullmatch(r"\d+", n))


def logged_train_steps(proc: subprocess.Popen) -> list[int]:
    """Steps whose train metrics the child has logged so far (log_every=1)."""
    return [int(s) for s in re.findall(r"\[(\d+)\] train/", log_text(proc))]


def logged_metric(proc: subprocess.Popen, name: str) -> dict[int, float]:
    """{step: value} of `train/<name>` from the child's metric log lines."""
    pattern = r"\[(\d+)\] [^\n]*?train/" + re.escape(name) + r"=([-+\d.eE]+|nan|inf)"
    return {int(k): float(v) for k, v in re.findall(pattern, log_text(proc))}


def restore_host(workdir: str, step: int | None = None) -> tuple[Any, dict]:
    """The state (numpy) + meta of a workdir's checkpoint, whatever topology wrote it."""
    from ldm_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(workdir, async_save=False)
    try:
        state, meta = ckpt.restore_raw(step)
        return jax.tree.map(np.asarray, state), meta
    finally:
        ckpt.close()


def read_metrics(workdir: str) -> dict:
    with open(os.path.join(workdir, "metrics.json")) as f:
        return json.load(f)


def assert_trees_equal(a: Any, b: Any) -> None:
    """Bit-identical pytrees (same structure, same bytes)."""
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert np.array_equal(x, y), f"{jax.tree_util.keystr(path)}: max |diff| {np.max(np.abs(x - y))}"


def max_abs_diff(a: Any, b: Any) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# --- the shared straight reference run of the tiny stage-1 config (used by test_resume and test_scaleout) ---

TINY_AE = os.path.join(REPO, "tests", "tiny_config.py") + ":ae"
REF_STEPS = 16
# fsdp-sharded on 8 devices: checkpoints hold sharded arrays; the multi-host run uses the same mesh.
REF_OVERRIDES = {"train.num_steps": REF_STEPS, "train.ckpt_every": 4, "mesh.data": 2, "mesh.fsdp": 4}
_jobs: dict[str, Any] = {}


class ReferenceRun:
    """train.py for REF_STEPS steps without interruption, started in the background (one per session)."""

    def __init__(self, root: str):
        self.root = root
        self.cache_dir = os.path.join(root, "xla_cache")
        self.workdir = os.path.join(root, "reference")
        self.proc = start_train(TINY_AE, self.workdir, REF_OVERRIDES, 8, self.cache_dir)
        self.rc: int | None = None
        atexit.register(self.kill)  # never outlive the test session

    def wait_compiled(self, timeout: float = 600) -> None:
        """Until the step is compiled (then it is in the persistent cache for runs of the same program)."""
        wait_for(lambda: "autoencoder_step(use_disc=True) compiled" in log_text(self.proc), timeout, self.proc)

    def wait(self, timeout: float = 600) -> str:
        """Waits for success; returns the workdir."""
        if self.rc is None:
            self.rc = wait(self.proc, timeout)
        assert self.rc == 0, f"reference run failed ({self.rc}):\n{log_tail(self.proc)}"
        return self.workdir

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def reference_run(root: str) -> ReferenceRun:
    """The session's reference run (started on first use under `root`)."""
    if "reference" not in _jobs:
        _jobs["reference"] = ReferenceRun(root)
    return _jobs["reference"]


def adam_mu(opt_state: Any) -> Any:
    """The first-moment tree of the (only) Adam state in an optimizer state (a NamedTuple, or Orbax's dict)."""
    is_adam = lambda x: hasattr(x, "mu") or (isinstance(x, dict) and {"count", "mu", "nu"} <= set(x))  # noqa: E731
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
    assert len(found) == 1, f"expected one Adam state, found {len(found)}"
    return found[0].mu if hasattr(found[0], "mu") else found[0]["mu"]


def assert_adam_trained_alike(params_a: Any, params_b: Any, opt_a: Any, opt_b: Any, lr: float, steps: int,
                              tol: float = 1e-5) -> None:
    """Two runs that should differ only by float rounding (another mesh, another process count), after Adam steps:
    gradients (Adam's first moments) agree to `tol` × their largest magnitude, parameters as `assert_params_close`."""
    mu_a, mu_b = jax.tree.leaves(adam_mu(opt_a)), jax.tree.leaves(adam_mu(opt_b))
    scale = max(float(np.max(np.abs(m))) for m in mu_b)
    for ma, mb in zip(mu_a, mu_b, strict=True):
        np.testing.assert_allclose(np.asarray(ma, np.float64), np.asarray(mb, np.float64), rtol=0, atol=tol * scale,
                                   err_msg="gradients (Adam mu) differ")
    assert_params_close(params_a, params_b, adam_mu(opt_b), lr, steps, tol)


def assert_params_close(params_a: Any, params_b: Any, grads: Any, lr: float, steps: int, tol: float = 1e-5) -> None:
    """Parameters after `steps` Adam updates agree to `tol`, except where the gradient is zero up to rounding.

    Those elements (e.g. a conv bias followed by a GroupNorm with one channel per group, which cancels it exactly)
    get Adam-normalised rounding noise, ±lr per step, so may differ by up to 2·lr·steps; having no true gradient,
    they cannot affect anything else."""
    g = jax.tree.leaves(grads)
    scale = max(float(np.max(np.abs(x))) for x in g)
    pa, pb = jax.tree.leaves(params_a), jax.tree.leaves(params_b)
    assert len(pa) == len(pb) == len(g)
    for x, y, gr in zip(pa, pb, g, strict=True):
        noise = np.abs(np.asarray(gr, np.float64)) <= 1e-4 * scale
        d = np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))
        assert not np.any(d[~noise] > tol), f"params differ by {d[~noise].max()} where the gradient is real"
        assert not np.any(d[noise] > 2 * lr * steps + tol), f"params differ by {d[noise].max()} > 2·lr·steps"


def logged_scale(proc: subprocess.Popen) -> str:
    """The scale_by_std factor a train.py child logged."""
    found = re.findall(r"scale_by_std: scale_factor = ([0-9.eE+-]+)", log_text(proc))
    assert found, f"no scale_by_std line in the log:\n{log_tail(proc)}"
    return found[-1]
