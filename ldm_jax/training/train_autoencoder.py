"""Stage-1 train loop: build → restore or init → compile → steps (log, grids, checkpoints) → held-out metrics."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from ldm_jax.data.images import make_grid, save_png, to_uint8
from ldm_jax.data.pipeline import make_dataset
from ldm_jax.training import autoencoder as ae
from ldm_jax.training import common
from ldm_jax.training import mesh as mesh_lib
from ldm_jax.training.checkpoint import Checkpointer


def load_lpips_if_needed(config: ml_collections.ConfigDict, need_for_eval: bool = True) -> Any:
    """LPIPS params when the perceptual loss (or eval) uses them; a one-line error says how to get them."""
    from ldm_jax.models.lpips_weights import load_lpips_params

    path = config.loss.get("lpips_path") or None
    if config.loss.perceptual_weight > 0:
        return load_lpips_params(path)  # raises FileNotFoundError with the install command
    if need_for_eval:
        try:
            return load_lpips_params(path)
        except FileNotFoundError as e:
            logging.warning("LPIPS metric unavailable: %s", e)
    return None


def check_compatible(meta: dict, config: ml_collections.ConfigDict, ckpt_dir: str) -> None:
    """A checkpoint written for a different model is a one-line error, not a shape crash deep in Orbax."""
    saved = meta.get("config", {}).get("model")
    current = json.loads(json.dumps(config.model.to_dict()))  # tuples → lists, as stored
    if saved is not None and saved != current:
        diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        raise ValueError(f"checkpoint {ckpt_dir} was written for a different model config (model.{diff} differ)")


def reconstruction_grid(originals: np.ndarray, recs: np.ndarray, n: int = 8) -> np.ndarray:
    """Originals on odd rows, reconstructions below them."""
    n = min(n, len(originals))
    rows = []
    for i in range(0, n, 8):
        rows += [originals[i:i + 8], recs[i:i + 8]]
    return make_grid(to_uint8(np.concatenate(rows)), nrow=min(8, n))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    common.maybe_initialize_distributed(config)
    tc = config.train
    mesh = mesh_lib.make_mesh(config.mesh)
    mesh_lib.check_batch_size(tc.batch_size, mesh)
    mesh_lib.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    model, disc, tx_g, tx_d = ae.build_models(config)
    lpips_params = load_lpips_if_needed(config)
    pid, pcount = jax.process_index(), jax.process_count()
    train_ds = make_dataset(config.data, "train", tc.batch_size, config.seed, pid, pcount)
    image_shape = (config.data.resolution, config.data.resolution, config.data.channels)
    if config.model.in_channels != config.data.channels:
        raise ValueError(f"model.in_channels={config.model.in_channels} but data.channels={config.data.channels}")

    # State: initialised directly into its shardings, or restored from the latest checkpoint.
    init_fn = lambda key: ae.init_state(config, model, disc, tx_g, tx_d, key, image_shape)  # noqa: E731
    abstract = jax.eval_shape(init_fn, jax.random.key(config.seed))
    state_sh = mesh_lib.state_shardings(abstract, mesh, config.mesh.get("min_shard_size", 2**16))
    ckpt = Checkpointer(workdir, tc.get("max_to_keep", 3), tc.get("keep_every", 0), tc.get("async_checkpoint", True))
    if ckpt.latest_step() is not None:
        check_compatible(ckpt.restore_meta() or {}, config, ckpt.directory)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
        state, meta = ckpt.restore(target)
        logging.info("restored checkpoint at step %d", int(state.step))
    else:
        state = jax.jit(init_fn, out_shardings=state_sh)(jax.random.key(config.seed))
    common.save_config(config, workdir)
    lpips_rep = common.replicate_to(lpips_params, mesh) if lpips_params is not None else None
    lpips_arg = lpips_rep if config.loss.perceptual_weight > 0 else None

    writer = common.make_writer(workdir)
    from clu import periodic_actions

    progress = periodic_actions.ReportProgress(num_train_steps=tc.num_steps, writer=writer, every_secs=30)
    batch_sh, rep = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
    compiled: dict[bool, Any] = {}

    def get_step(use_disc: bool, batch):
        if use_disc not in compiled:
            fn = ae.make_train_step(config, model, disc, tx_g, tx_d, use_disc)
            lp_sh = None if lpips_arg is None else jax.tree.map(lambda _: rep, lpips_arg)
            compiled[use_disc], report = common.compile_step(
                fn, (state, batch, lpips_arg), (state_sh, batch_sh, lp_sh), (state_sh, rep),
                name=f"autoencoder_step(use_disc={use_disc})")
            writer.write_scalars(int(state.step), {f"compile/{k}": v for k, v in report.items()})
        return compiled[use_disc]

    guard = common.PreemptionGuard()
    nonfinite = common.NonFiniteTracker(tc.get("max_nonfinite_steps", 20), on_abort=ckpt.wait)
    start = int(state.step)
    disc_on = config.loss.disc_weight > 0 and config.loss.disc_factor > 0
    pending: list[dict] = []
    last_ckpt = ckpt.latest_step()
    grid_fn = make_grid_writer(config, model, workdir)
    for step in range(start, tc.num_steps):
        batch = mesh_lib.global_batch(train_ds.batch_at(step), mesh)
        state, metrics = get_step(disc_on and step >= config.loss.disc_start, batch)(state, batch, lpips_arg)
        pending.append(metrics)
        nonfinite.update(not bool(metrics["finite"]), step, last_ckpt)
        done = step + 1
        progress(done)
        if done % tc.log_every == 0 or done == tc.num_steps:
            means = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
            means["skipped_total"] = float(nonfinite.total)
            writer.write_scalars(done, {f"train/{k}": v for k, v in means.items()})
            pending = []
        if tc.grid_every and done % tc.grid_every == 0:
            grid_fn(state, f"reconstructions_{done:07d}.png")
        stop = guard.should_stop()
        if done % tc.ckpt_every == 0 or done == tc.num_steps or stop:
            ckpt.save(done, state, {"config": config.to_dict(), "data": train_ds.state() | {"step": done}},
                      force=True)
            last_ckpt = done if not nonfinite.consecutive else last_ckpt  # saved mid-streak: not 'good'
        if stop:
            ckpt.close()
            logging.info("preempted: checkpoint saved at step %d", done)
            return {}
    ckpt.wait()
    results = evaluate(config, model, state, lpips_rep, mesh)
    results["skipped_updates"] = float(nonfinite.total)
    writer.write_scalars(int(state.step), {f"eval/{k}": v for k, v in results.items()})
    common.write_json(os.path.join(workdir, "metrics.json"), results)
    grid_fn(state, "reconstructions.png")
    writer.flush()
    ckpt.close()
    guard.restore()
    return results


def evaluate(config, model, state, lpips_params, mesh) -> dict[str, float]:
    """PSNR, SSIM, LPIPS (and VQ codebook usage/perplexity) on held-out images."""
    ec = config.eval
    ds = make_dataset(config.data, ec.split, ec.batch_size, 0, jax.process_index(), jax.process_count(),
                      augment=False)
    eval_fn = jax.jit(ae.make_eval_step(config, model))
    n_batches = max(1, ec.num_examples // ec.batch_size)
    outs = []
    for i in range(n_batches):
        batch = mesh_lib.global_batch(ds.batch_at(i), mesh)
        res = eval_fn(state.params, state.model_state, batch["image"], lpips_params)
        res.pop("rec")
        outs.append(jax.tree.map(common.to_host, res))
    return ae.summarize_eval(outs)


def make_grid_writer(config, model, workdir: str):
    """Returns write(state, name): 16 held-out originals above their reconstructions, as a PNG (process 0)."""
    x = make_dataset(config.data, config.eval.split, 16, 0, augment=False).batch_at(0)["image"]
    rec_fn = jax.jit(lambda p, s, x: model.apply({"params": p, **s}, x)["rec"])

    def write(state, name: str) -> None:
        # Every process takes part in gathering sharded params; only process 0 writes.
        params, model_state = common.to_host((state.params["model"], state.model_state))
        if jax.process_index() == 0:
            rec = np.clip(np.asarray(rec_fn(params, model_state, x)), -1, 1)
            save_png(reconstruction_grid(x, rec, 16), os.path.join(workdir, name))

    return write
