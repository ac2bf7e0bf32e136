"""Stage-1 train loop: build → restore or init → compile → steps (log, grids, checkpoints) → held-out metrics."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from ldm_jax.data.images import make_grid, save_png, to_uint8
from ldm_jax.data.pipeline import image_size, make_dataset
from ldm_jax.training import autoencoder as ae
from ldm_jax.training import common
from ldm_jax.training import mesh as mesh_lib
from ldm_jax.training.loop import Run, host_batches
from ldm_jax.training.validate import check_train_config


def load_lpips_if_needed(config: ml_collections.ConfigDict, need_for_eval: bool = True) -> Any:
    """LPIPS params when the perceptual loss (or eval) uses them; a one-line error says how to get them."""
    from ldm_jax.models.lpips_weights import load_lpips_params

    path = config.loss.lpips_path or None
    if config.loss.perceptual_weight > 0:
        return load_lpips_params(path)  # raises FileNotFoundError with the install command
    if need_for_eval:
        try:
            return load_lpips_params(path)
        except FileNotFoundError as e:
            logging.warning("LPIPS metric unavailable: %s", e)
    return None


def reconstruction_grid(originals: np.ndarray, recs: np.ndarray, n: int = 8) -> np.ndarray:
    """Originals on odd rows, reconstructions below them."""
    n = min(n, len(originals))
    rows = []
    for i in range(0, n, 8):
        rows += [originals[i:i + 8], recs[i:i + 8]]
    return make_grid(to_uint8(np.concatenate(rows)), nrow=min(8, n))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    check_train_config(config)
    with Run(config, workdir) as run:
        tc, mesh = config.train, run.mesh
        mesh_lib.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
        model, disc, tx_g, tx_d = ae.build_models(config)
        lpips_params = load_lpips_if_needed(config)
        train_ds = make_dataset(config.data, "train", tc.batch_size, config.seed, jax.process_index(),
                                jax.process_count(), uint8_images=True)
        image_shape = (*image_size(config.data), config.data.channels)
        if config.model.in_channels != config.data.channels:
            raise ValueError(f"model.in_channels={config.model.in_channels} but data.channels={config.data.channels}")

        # State: initialised directly into its shardings, or restored from the newest intact checkpoint.
        init_fn = lambda key: ae.init_state(config, model, disc, tx_g, tx_d, key, image_shape)  # noqa: E731
        state = run.restore_or_init(
            jax.eval_shape(init_fn, jax.random.key(config.seed)),
            lambda sh: jax.jit(init_fn, out_shardings=sh)(jax.random.key(config.seed)), train_ds)
        rep = mesh_lib.replicated(mesh)
        lpips_rep = common.replicate_to(lpips_params, mesh) if lpips_params is not None else None
        lpips_arg = lpips_rep if config.loss.perceptual_weight > 0 else None
        lp_sh = None if lpips_arg is None else jax.tree.map(lambda _: rep, lpips_arg)

        # Two programs: before and after loss.disc_start (compiled when first needed).
        disc_on = config.loss.disc_weight > 0 and config.loss.disc_factor > 0
        example = mesh_lib.global_batch(train_ds.batch_at(0), mesh)
        compiled: dict[bool, Any] = {}

        def step_for(step: int, live_state):
            use_disc = disc_on and step >= config.loss.disc_start
            if use_disc not in compiled:
                fn = ae.make_train_step(config, model, disc, tx_g, tx_d, use_disc)
                compiled[use_disc] = run.compile(fn, live_state, example, (lpips_arg,), (lp_sh,),
                                                 f"autoencoder_step(use_disc={use_disc})")
            return compiled[use_disc]

        grid_fn = make_grid_writer(config, model, workdir)

        def grids(done: int, state) -> None:
            if tc.grid_every and done % tc.grid_every == 0:
                grid_fn(state, f"reconstructions_{done:07d}.png")

        out = run.train(state, host_batches(train_ds, int(state.step)), step_for, (lpips_arg,),
                        data_state=lambda done: train_ds.state() | {"step": done}, hooks=(grids,))
        if out.preempted:
            return {}
        results = evaluate(config, model, out.state, lpips_rep, mesh)
        results.update(final_loss=out.last_metrics.get("loss", float("nan")), train_steps_per_s=out.steps_per_s,
                       skipped_updates=float(out.skipped_total),
                       skipped_files=float(train_ds.num_skipped))
        grid_fn(out.state, "reconstructions.png")
        return run.finish(out.state, results)


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
