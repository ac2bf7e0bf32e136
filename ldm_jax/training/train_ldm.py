"""Stage-2 train loop: frozen first stage → restore or init (scale_by_std once) → compile → steps → samples."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax.data.fashion_mnist import CLASS_NAMES
from ldm_jax.data.images import make_grid, save_png, to_uint8
from ldm_jax.data.pipeline import make_dataset
from ldm_jax.diffusion.generate import make_sample_fn
from ldm_jax.training import common
from ldm_jax.training import ldm as L
from ldm_jax.training import mesh as mesh_lib
from ldm_jax.training.loop import Run, host_batches
from ldm_jax.training.validate import check_train_config


def setup_text(config: ml_collections.ConfigDict, workdir: str):
    """Tokenizer for text conditioning (condition.tokenizer 'bert' or 'clip'): a given vocabulary, else WordPiece
    trained on the class captions (bert) or open_clip's BPE (clip), saved in WORKDIR/tokenizer where sample.py
    looks. Returns (tokenizer, token table per class, null tokens)."""
    from ldm_jax.data.text import class_captions, load_tokenizer, tokenize, train_wordpiece_vocab

    cc = config.condition
    kind = cc.get("tokenizer", "bert")
    captions = class_captions(CLASS_NAMES)
    path = cc.get("vocab_path") or os.path.join(workdir, "tokenizer")
    if not cc.get("vocab_path") and jax.process_index() == 0:
        if kind == "clip" and not os.path.isdir(path):
            from ldm_jax.data.clip_tokenizer import load_clip_tokenizer

            # The run's own copy of open_clip's BPE, so sampling never depends on open_clip's wheel.
            load_clip_tokenizer(None).save_pretrained(path)
        elif kind == "bert" and not os.path.exists(os.path.join(path, "vocab.txt")):
            train_wordpiece_vocab(captions, path, vocab_size=cc.get("vocab_size", 200))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("tokenizer")
    tok = load_tokenizer(kind, path)  # what sample.py loads (inference.load_text_tokenizer)
    if config.model.get("vocab_size", 0) in (0, None):
        config.model.vocab_size = len(tok)
    max_len = config.model.text_max_len
    return tok, tokenize(tok, captions, max_len), tokenize(tok, [""], max_len)[0]


def host_batch(config, b: dict[str, np.ndarray], token_table: np.ndarray | None) -> dict[str, np.ndarray]:
    """This process's slice of a data batch with the condition inputs the network takes."""
    out = {"image": b["image"]}
    if config.condition.type == "class":
        out["label"] = b["label"]
    elif config.condition.type == "text":
        out["tokens"] = token_table[b["label"]]
    elif config.condition.type == "semantic":
        if "segmentation" not in b:
            raise ValueError(f"condition.type='semantic' needs a dataset with a 'segmentation' map per example; "
                             f"data.name={config.data.name!r} has none")
        out["segmentation"] = b["segmentation"]
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    check_train_config(config)
    with Run(config, workdir) as run:
        tc, mesh = config.train, run.mesh
        fs = L.load_first_stage(config.first_stage.workdir)
        res = config.data.resolution
        if res % fs.factor:
            raise ValueError(f"data.resolution={res} is not divisible by the stage-1 factor f={fs.factor}")
        token_table = null_tokens = None
        if config.condition.type == "text":
            _, token_table, null_tokens = setup_text(config, workdir)
        model = L.build_model(config, fs)
        L.check_sampling(config)  # used after training: fail now, not hours later
        sched = L.make_schedule(config)
        tx = L.make_optimizer(config)
        ds = make_dataset(config.data, "train", tc.batch_size, config.seed, jax.process_index(),
                          jax.process_count())
        latent_shape = (res // fs.factor, res // fs.factor, fs.latent_channels)
        first = host_batch(config, ds.batch_at(0), token_table)
        fs_vars = common.replicate_to(fs.variables, mesh)
        null_arg = None if null_tokens is None else common.replicate_to(jnp.asarray(null_tokens), mesh)

        def init_fn(key, scale):
            cond = {k: jnp.asarray(v[:1]) for k, v in first.items() if k not in ("image", "segmentation")}
            seg = jnp.asarray(first["segmentation"][:1]) if "segmentation" in first else None
            cond.update(L.spatial_condition(config, fs, fs.variables, jnp.asarray(first["image"][:1]), scale, key,
                                            segmentation=seg))
            cond.pop("mask", None)
            return L.init_state(config, model, tx, key, latent_shape, cond, scale)

        def init(state_sh):
            scale = float(config.first_stage.scale_factor)
            if config.first_stage.scale_by_std:
                scale = L.first_batch_scale(fs, first["image"], None)
                logging.info("scale_by_std: scale_factor = %.5f", scale)
            return jax.jit(init_fn, out_shardings=state_sh)(jax.random.key(config.seed), scale)

        state = run.restore_or_init(jax.eval_shape(init_fn, jax.random.key(config.seed), 1.0), init, ds)
        rep = mesh_lib.replicated(mesh)
        args = (fs_vars, null_arg)
        train_step = run.compile(L.make_train_step(config, model, fs, tx, sched), state,
                                 mesh_lib.global_batch(first, mesh), args,
                                 (jax.tree.map(lambda _: rep, fs_vars), None if null_arg is None else rep), "ldm_step")
        out = run.train(state, host_batches(ds, int(state.step), lambda b: host_batch(config, b, token_table)),
                        lambda step, live_state: train_step, args, data_state=lambda done: ds.state() | {"step": done})
        if out.preempted:
            return {}
        results = {"final_loss": out.last_metrics.get("loss", float("nan"))}
        results.update(sample_grid(config, model, sched, fs, out.state, null_tokens, token_table, workdir))
        results.update(skipped_updates=float(out.skipped_total), skipped_files=float(ds.num_skipped))
        return run.finish(out.state, results)


def sample_grid(config, model, sched, fs: L.FirstStage, state: L.LDMState, null_tokens, token_table,
                workdir: str) -> dict[str, Any]:
    """Guided samples with the EMA weights: one row per class (or a plain grid), written to samples.png."""
    sc = config.sampling
    n_per_row = sc.get("grid_per_class", 8)
    ctype = config.condition.type
    n_rows = 10 if ctype in ("class", "text") else 4
    labels = np.repeat(np.arange(n_rows), n_per_row).astype(np.int32)
    cond: dict[str, jax.Array] = {}
    if ctype == "class":
        cond["label"] = jnp.asarray(labels)
    elif ctype == "text":
        cond["tokens"] = jnp.asarray(token_table[labels])
    params, scale = common.to_host((state.ema_params, state.scale_factor))
    shown = None
    if ctype in ("lowres", "inpaint", "semantic"):
        test_batch = make_dataset(config.data, "test", len(labels), 0, augment=False).batch_at(0)
        images = jnp.asarray(test_batch["image"])
        seg = jnp.asarray(test_batch["segmentation"]) if "segmentation" in test_batch else None
        cond.update(L.spatial_condition(config, fs, fs.variables, images, scale, jax.random.key(1),
                                        segmentation=seg))
        shown = L.condition_preview(config, images, cond, seg)
        cond.pop("mask", None)
    uncond = L.null_condition(config, cond, None if null_tokens is None else jnp.asarray(null_tokens))
    sample = make_sample_fn(lambda p, x, t, c: model.apply({"params": p}, x, t, c), sched, sc.sampler, sc.steps,
                            sc.eta, sc.guidance, config.diffusion.parameterization, sc.spacing, shared_x=True,
                            karras=sc.karras, order=sc.order, guidance_rescale=sc.guidance_rescale)
    res = config.data.resolution
    shape = (len(labels), res // fs.factor, res // fs.factor, fs.latent_channels)

    @jax.jit
    def generate(params, fs_vars, cond, uncond, key):
        z = sample(params, cond, uncond, key, shape)
        return jnp.clip(fs.decode(fs_vars, z / scale), -1.0, 1.0)

    t0 = time.time()
    images = np.asarray(generate(params, fs.variables, cond, uncond, jax.random.key(config.seed + 7)))
    elapsed = time.time() - t0
    if jax.process_index() == 0:
        rows = images
        if shown is not None:  # conditions first, samples under them
            shown = np.asarray(jax.image.resize(shown, (shown.shape[0], res, res, shown.shape[-1]), "nearest"))
            rows = np.concatenate([shown[..., : images.shape[-1]], images])
        save_png(make_grid(to_uint8(rows), n_per_row), os.path.join(workdir, "samples.png"))
    out: dict[str, Any] = {"grid_sample_s": elapsed, "grid_samples": len(labels)}
    if ctype == "class" and config.data.name == "fashion_mnist":
        out.update(conditional_accuracy(images, labels))
    return out


def conditional_accuracy(images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Share of samples the offline Fashion-MNIST classifier assigns to the class asked for (if trained)."""
    from ldm_jax.evaluation.classifier import default_classifier_path, load_classifier

    path = default_classifier_path()
    if not os.path.exists(path):
        logging.warning("conditional accuracy unavailable: no classifier at %s (python -m "
                        "ldm_jax.evaluation.classifier --train)", path)
        return {}
    _, logits_fn = load_classifier(path)
    pred = np.argmax(np.asarray(logits_fn(jnp.asarray(images))), axis=-1)
    return {"grid_conditional_accuracy": float(np.mean(pred == labels))}
