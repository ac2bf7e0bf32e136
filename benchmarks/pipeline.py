"""Cases around the compiled step, each comparing two ways ldm_jax itself can run (no peer):

- data: images/s of the input pipeline on a folder of 512x512 JPEGs (256x256 crops + flips): grain worker
  processes (data.num_workers = cores) vs the previous pipeline (one prefetch thread). Each repetition starts a
  fresh iterator at a new step, drops 2 batches (worker start-up, reported apart) and times the next ones.
- latent_cache: the stage-2 step of configs/demo_ldm.py from a latent cache (data.latents) vs encoding the images
  with the frozen stage 1 inside the step; both compiled as train.py compiles them, on device-resident batches.
- loop: steps/s of train.py's whole stage-2 loop (training/loop.Run.train: input pipeline, logging, guard, host
  transfers; the final checkpoint excluded) over steps/s of the same compiled step called back to back on one
  device-resident batch.

Run by `python -m benchmarks` in its own process: `python -m benchmarks.pipeline CASE [--quick]` prints one JSON
line. Stage 1 is random weights (timing does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

from ldm_jax.xla_flags import set_default_xla_flags

set_default_xla_flags()  # as train.py, before jax is imported


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _jpeg_folder(root: str, n: int, size: int = 512) -> str:
    """n photo-like JPEGs (smooth colour fields + texture), quality 90."""
    from PIL import Image

    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        a, b, c = rng.uniform(0.5, 6.0, 3)
        base = np.stack([np.sin(a * xx + i), np.cos(b * yy), np.sin(c * (xx + yy))], -1)
        img = (127 + 100 * base + rng.normal(0, 12, (size, size, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(root, f"{i:05d}.jpg"), quality=90)
    return root


def bench_data(quick: bool, reps: int) -> dict[str, Any]:
    from ldm_jax.data.pipeline import default_data_config, make_dataset

    tmp = tempfile.mkdtemp(prefix="ldm_bench_data_")
    n_images, batch, timed = (32, 8, 4) if quick else (256, 32, 6)
    folder = _jpeg_folder(os.path.join(tmp, "jpegs"), n_images)
    cfg = default_data_config()
    cfg.update(name="folder", path=folder, resolution=256, channels=3, preprocess="random_crop", random_flip=True,
               prefetch=2)
    workers = os.cpu_count() or 1
    # (num_workers, uint8 images): the previous pipeline (one prefetch thread, float32 batches), grain's workers
    # with float32 batches, and what train.py runs (grain's workers, uint8 batches converted on the device).
    fast = f"grain_{workers}_workers_uint8"
    variants = {"single_thread": (0, False), f"grain_{workers}_workers_float32": (workers, False),
                fast: (workers, True)}
    res: dict[str, dict[str, Any]] = {k: {"images_per_s": [], "startup_s": []} for k in variants}
    for r in range(reps):
        order = list(variants.items())
        for name, (nw, uint8) in (order if r % 2 == 0 else order[::-1]):
            cfg.num_workers = nw
            t0 = time.perf_counter()
            ds = make_dataset(cfg, "train", batch, seed=0, uint8_images=uint8)
            ds.restore(ds.state() | {"step": 100 * (r + 1)})  # fresh steps: no warm file cache advantage
            with ds:
                for _ in range(2):
                    next(ds)
                t1 = time.perf_counter()
                for _ in range(timed):
                    next(ds)
                t2 = time.perf_counter()
            res[name]["images_per_s"].append(timed * batch / (t2 - t1))
            res[name]["startup_s"].append(t1 - t0)
    out = {k: {"median_images_per_s": _median(v["images_per_s"]), "median_startup_and_2_batches_s":
               _median(v["startup_s"]), **v} for k, v in res.items()}
    return {"about": f"{n_images} 512x512 JPEGs -> 256x256 random crop + flip, batch {batch}, {timed} batches "
                     "timed per repetition; ratio: train.py's pipeline (grain workers, uint8 batches) over the "
                     "previous one (one prefetch thread, float32 batches)", "variants": out, "cores": workers,
            "ratio": out[fast]["median_images_per_s"] / out["single_thread"]["median_images_per_s"],
            "target": 1.6}


def _stage1(workdir: str) -> None:
    """A stage-1 workdir of configs/demo_autoencoder.py with random weights."""
    import jax

    from benchmarks.ours import random_params
    from configs.demo_autoencoder import get_config
    from ldm_jax.checkpoint import Checkpointer
    from ldm_jax.models.autoencoder import build_autoencoder
    from ldm_jax.workdir import save_config

    config = get_config()
    model = build_autoencoder(config.model)
    x = jax.ShapeDtypeStruct((1, config.data.resolution, config.data.resolution, config.model.in_channels),
                             np.float32)
    abstract = jax.eval_shape(lambda k, x: model.init({"params": k}, x), jax.random.key(0), x)
    state = {"params": {"model": random_params(abstract["params"]), "logvar": np.zeros((), np.float32)},
             "model_state": {}}
    save_config(config, workdir)
    ckpt = Checkpointer(workdir, async_save=False)
    ckpt.save(1, state, {"config": config.to_dict()}, force=True)
    ckpt.close()


def _demo_ldm(first_stage: str):
    from configs.demo_ldm import get_config

    c = get_config()
    c.first_stage.workdir = first_stage
    return c


def bench_latent_cache(quick: bool, reps: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from ldm_jax import workdir as W
    from ldm_jax.cache_latents import cache_latents
    from ldm_jax.data.pipeline import make_dataset
    from ldm_jax.training import common
    from ldm_jax.training import ldm as L
    from ldm_jax.training import mesh as mesh_lib
    from ldm_jax.training.train_ldm import host_batch

    tmp = tempfile.mkdtemp(prefix="ldm_bench_cache_")
    _stage1(os.path.join(tmp, "ae"))
    cfg = _demo_ldm(os.path.join(tmp, "ae"))
    cfg.data.num_examples = 512
    t0 = time.perf_counter()
    cache_latents(cfg, os.path.join(tmp, "latents"), batch_size=256)
    encode_s = time.perf_counter() - t0
    lat = cfg.copy_and_resolve_references()
    lat.data.latents = os.path.join(tmp, "latents")
    fs = W.load_first_stage(cfg.first_stage.workdir)
    model, tx, sched = W.build_model(cfg, fs), L.make_optimizer(cfg), W.make_schedule(cfg)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    rep = mesh_lib.replicated(mesh)
    b = cfg.train.batch_size
    # As train.py feeds them: uint8 images (converted in the step), stored float32 moments.
    batches = {"in_step_encode": host_batch(cfg, make_dataset(cfg.data, "train", b, 0, uint8_images=True).batch_at(0)),
               "latent_cache": host_batch(lat, make_dataset(lat.data, "train", b, 0).batch_at(0))}
    init = jax.jit(lambda k: L.init_state(cfg, model, tx, k, (8, 8, 4), {"label": jnp.zeros((1,), jnp.int32)}, 1.0))
    abstract = jax.eval_shape(init, jax.random.key(0))
    state_sh = mesh_lib.state_shardings(abstract, mesh, cfg.mesh.min_shard_size)
    fs_vars = common.replicate_to(fs.variables, mesh)
    step_fn = L.make_train_step(cfg, model, fs, tx, sched)
    runs, out = {}, {}
    for name, hb in batches.items():
        batch = mesh_lib.global_batch(hb, mesh)
        state = jax.device_put(init(jax.random.key(0)), state_sh)
        compiled, report = common.compile_step(step_fn, (state, batch, fs_vars, None),
                                               (state_sh, mesh_lib.batch_sharding(mesh),
                                                jax.tree.map(lambda _: rep, fs_vars), None), (state_sh, rep))
        runs[name] = {"fn": compiled, "state": state, "batch": batch}
        out[name] = {"compile_s": report["compile_s"], "gflops_per_step": report.get("gflops_per_step"),
                     "step_s": []}
    steps = 5 if quick else 20
    for r in range(reps + 1):  # the first round warms up
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for name in order:
            st = runs[name]
            t0 = time.perf_counter()
            for _ in range(steps):
                st["state"], m = st["fn"](st["state"], st["batch"], fs_vars, None)
            jax.block_until_ready(m)
            if r:
                out[name]["step_s"].append((time.perf_counter() - t0) / steps)
    for v in out.values():
        v["median_step_s"] = _median(v["step_s"])
    return {"about": f"configs/demo_ldm.py stage-2 step, batch {b}, {steps} steps per repetition",
            "variants": out, "cache_encode_s_512_images": encode_s,
            "ratio": out["in_step_encode"]["median_step_s"] / out["latent_cache"]["median_step_s"], "target": 1.3}


def bench_loop(quick: bool, reps: int) -> dict[str, Any]:
    """Instruments Run.compile / Run.train (stashes the compiled step, its batch and the final state) around an
    unchanged train_and_evaluate, then calls the same compiled step back to back."""
    import jax

    from ldm_jax.training import loop
    from ldm_jax.training.train_ldm import train_and_evaluate

    tmp = tempfile.mkdtemp(prefix="ldm_bench_loop_")
    _stage1(os.path.join(tmp, "ae"))
    cfg = _demo_ldm(os.path.join(tmp, "ae"))
    n = 30 if quick else 300
    cfg.train.update(num_steps=n, ckpt_every=10 * n, log_every=min(100, n))
    cfg.sampling.update(steps=2, grid_per_class=1)
    seen: dict[str, Any] = {}
    compile_orig, train_orig = loop.Run.compile, loop.Run.train

    def compile_spy(self, step_fn, state, example_batch, args, arg_shardings, name):
        seen["fn"] = compile_orig(self, step_fn, state, example_batch, args, arg_shardings, name)
        seen["batch"], seen["args"] = example_batch, args
        return seen["fn"]

    def train_spy(self, *a, **kw):
        seen["result"] = train_orig(self, *a, **kw)
        return seen["result"]

    loop.Run.compile, loop.Run.train = compile_spy, train_spy
    try:
        train_and_evaluate(cfg, os.path.join(tmp, "ldm"))
    finally:
        loop.Run.compile, loop.Run.train = compile_orig, train_orig
    result = seen["result"]
    state, fn, batch, args = result.state, seen["fn"], seen["batch"], seen["args"]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            state, m = fn(state, batch, *args)
        jax.block_until_ready(m)
        times.append(n / (time.perf_counter() - t0))
    back_to_back = _median(times)
    return {"about": f"configs/demo_ldm.py stage-2 train loop, {n} steps, batch {cfg.train.batch_size}",
            "variants": {"train_loop": {"steps_per_s": result.steps_per_s, "loop_s": result.loop_s},
                         "compiled_step_back_to_back": {"steps_per_s": back_to_back, "per_rep": times}},
            "ratio": result.steps_per_s / back_to_back, "target": 0.95}


CASES = {"data": bench_data, "latent_cache": bench_latent_cache, "loop": bench_loop}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pipeline")
    p.add_argument("case", choices=sorted(CASES))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=None)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    res = CASES[a.case](a.quick, a.reps or (2 if a.quick else 5))
    res["case_wall_s"] = time.perf_counter() - t0
    print("BENCH_RESULT " + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
