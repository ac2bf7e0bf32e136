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

from ldm_jax import conditions
from ldm_jax import workdir as W
from ldm_jax.data.images import make_grid, save_png, to_uint8
from ldm_jax.data.pipeline import image_size, make_dataset, make_source
from ldm_jax.data.text import TextEncoder, tokenize
from ldm_jax.data.transforms import to_float
from ldm_jax.diffusion.generate import make_sample_fn, sample_each
from ldm_jax.training import common
from ldm_jax.training import ldm as L
from ldm_jax.training import mesh as mesh_lib
from ldm_jax.training.init_from import apply_init_from, load_init_weights
from ldm_jax.training.loop import Run, host_batches
from ldm_jax.training.validate import check_train_config


def setup_text(config: ml_collections.ConfigDict, workdir: str, source) -> tuple[Any, TextEncoder, np.ndarray]:
    """Tokenizer for text conditioning (condition.tokenizer 'bert' or 'clip'): a given vocabulary, else WordPiece
    trained on the data set's captions (bert) or open_clip's BPE (clip), saved in WORKDIR/tokenizer where sample.py
    looks. Returns (tokenizer, the pipeline's caption → token ids function, the null (empty caption) tokens)."""
    from ldm_jax.data.text import NULL_TEXT, load_tokenizer, tokenize, train_wordpiece_vocab

    cc = config.condition
    if not getattr(source, "has_captions", False):
        raise ValueError(f"data: condition.type='text' needs captions and data.name={config.data.name!r} has none "
                         "at data.path (image folders: NAME.txt beside NAME.png, or metadata.jsonl/.csv with "
                         "file_name and text; tfds: data.caption_key)")
    path = cc.vocab_path or os.path.join(workdir, "tokenizer")
    if not cc.vocab_path and jax.process_index() == 0:
        if cc.tokenizer == "clip" and not os.path.isdir(path):
            from ldm_jax.data.clip_tokenizer import load_clip_tokenizer

            # The run's own copy of open_clip's BPE, so sampling never depends on open_clip's wheel.
            load_clip_tokenizer(None).save_pretrained(path)
        elif cc.tokenizer == "bert" and not os.path.exists(os.path.join(path, "vocab.txt")):
            train_wordpiece_vocab(source.caption_corpus(), path, vocab_size=cc.vocab_size)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("tokenizer")
    tok = load_tokenizer(cc.tokenizer, path)  # what sample.py loads (inference.load_text_tokenizer)
    if config.model.vocab_size in (0, None):
        config.model.vocab_size = len(tok)
    max_len = config.model.text_max_len
    return tok, TextEncoder(tok, max_len), tokenize(tok, [NULL_TEXT], max_len)[0]


def global_batch_images(local: np.ndarray) -> np.ndarray:
    """The global batch's images from every process's rows (in process order), so that all processes compute the
    same scale_by_std factor from the same batch."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def scale_key(config: ml_collections.ConfigDict) -> jax.Array | None:
    """scale_by_std uses a posterior *sample* of batch 0's latents, as the reference (get_first_stage_encoding), when
    training encodes samples too (first_stage.sample_posterior); its std is what the diffusion model sees."""
    return jax.random.key(config.seed + 2) if config.first_stage.sample_posterior else None


def init_from_weights(path: str, abstract: L.LDMState, tx, state_sh) -> L.LDMState:
    """Step 0 of a fine-tuning run: the source's raw and EMA weights and scale factor, a fresh optimizer."""
    raw, ema, scale = load_init_weights(path)
    for name, tree in (("weights", raw), ("EMA weights", ema)):
        want = jax.tree.map(lambda a: (a.shape, str(a.dtype)), abstract.params)
        got = jax.tree.map(lambda a: (a.shape, str(a.dtype)), tree)
        if want != got:
            raise ValueError(f"init_from: the {name} of {path} do not fit its own model config (converted with "
                             "another ldm_jax version?)")
    params = jax.device_put(raw, state_sh.params)
    return L.LDMState(step=jax.device_put(np.zeros((), np.int32), state_sh.step), params=params,
                      ema_params=jax.device_put(ema, state_sh.ema_params),
                      opt_state=jax.jit(tx.init, out_shardings=state_sh.opt_state)(params),
                      scale_factor=jax.device_put(np.float32(scale), state_sh.scale_factor),
                      skipped=jax.device_put(np.zeros((), np.int32), state_sh.skipped))


def grid_prompts(config: ml_collections.ConfigDict, source) -> list[str]:
    """The text grid's rows: sampling.prompts, else the data set's own (pairs: seen and held-out; else the first
    distinct captions)."""
    if config.sampling.prompts:
        return list(config.sampling.prompts)
    if config.data.name == "fashion_mnist_pairs":
        from ldm_jax.evaluation.pairs import grid_prompts as pair_prompts

        return pair_prompts()
    return list(dict.fromkeys(c for c in source.caption_corpus(limit=1000) if c))[:10]


def host_batch(config, b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's slice of a data batch with the condition inputs the network takes."""
    out = {"moments": b["moments"]} if "moments" in b else {"image": b["image"]}  # moments: a latent cache
    if config.condition.type == "class":
        out["label"] = b["label"]
    elif config.condition.type == "text":
        out["tokens"] = b["tokens"]
    elif config.condition.type == "semantic":
        if "segmentation" not in b:
            raise ValueError(f"condition.type='semantic' needs a dataset with a 'segmentation' map per example; "
                             f"data.name={config.data.name!r} has none")
        out["segmentation"] = b["segmentation"]
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    if config.init_from:
        apply_init_from(config)  # the source's model, schedule, first stage and tokenizer
    elif not config.first_stage.workdir:
        raise ValueError("first_stage.workdir is empty: name a stage-1 workdir (or set init_from to fine-tune a "
                         "stage-2 workdir such as OUT/ldm of python -m ldm_jax.convert)")
    check_train_config(config)
    with Run(config, workdir) as run:
        tc, mesh = config.train, run.mesh
        fs = W.load_first_stage(config.first_stage.workdir)
        h, w = image_size(config.data)
        if h % fs.factor or w % fs.factor:
            raise ValueError(f"data.resolution/width {h}x{w} is not divisible by the stage-1 factor f={fs.factor}")
        if int(fs.config.model.in_channels) != config.data.channels:
            raise ValueError(f"data.channels={config.data.channels} but the stage-1 model at {fs.workdir} takes "
                             f"{fs.config.model.in_channels}-channel images")
        source = make_source(config.data, "train")
        if config.data.latents:
            L.check_latent_cache(source.info, config, fs)
        num_labels = len(getattr(source, "classes", ())) or (10 if config.data.name == "fashion_mnist" else 0)
        if config.condition.type == "class" and num_labels and config.model.n_classes < num_labels + 1:
            raise ValueError(f"model.n_classes={config.model.n_classes} but the data has {num_labels} classes: set "
                             f"model.n_classes={num_labels + 1} (the last index is the null class)")
        text_fn = null_tokens = None
        if config.condition.type == "text":
            _, text_fn, null_tokens = setup_text(config, workdir, source)
            config.sampling.prompts = tuple(grid_prompts(config, source))  # saved: sample.py's default prompts
        model = W.build_model(config, fs)
        L.check_sampling(config)  # used after training: fail now, not hours later
        sched = W.make_schedule(config)
        tx = L.make_optimizer(config)
        ds = make_dataset(config.data, "train", tc.batch_size, config.seed, jax.process_index(),
                          jax.process_count(), text_fn=text_fn, source=source, uint8_images=True)
        latent_shape = (h // fs.factor, w // fs.factor, fs.latent_channels)
        first = host_batch(config, ds.batch_at(0))
        fs_vars = common.replicate_to(fs.variables, mesh)
        null_arg = None if null_tokens is None else common.replicate_to(jnp.asarray(null_tokens), mesh)

        def init_fn(key, scale):
            cond = {k: jnp.asarray(v[:1]) for k, v in first.items() if k not in ("image", "segmentation", "moments")}
            seg = jnp.asarray(first["segmentation"][:1]) if "segmentation" in first else None
            if "image" in first:
                cond.update(conditions.spatial_condition(config, fs, fs.variables, to_float(first["image"][:1]),
                                                         scale, key, segmentation=seg))
            cond.pop("mask", None)
            return L.init_state(config, model, tx, key, latent_shape, cond, scale)

        def init(state_sh):
            if config.init_from:
                return init_from_weights(config.init_from, jax.eval_shape(init_fn, jax.random.key(0), 1.0), tx,
                                         state_sh)
            scale = float(config.first_stage.scale_factor)
            if config.first_stage.scale_by_std:
                cached = "moments" in first
                local = first["moments"] if cached else to_float(first["image"])  # the host's uint8 batch
                scale = L.first_batch_scale(fs, global_batch_images(local),
                                            scale_key(config), moments=cached)
                logging.info("scale_by_std: scale_factor = %.5f", scale)
            return jax.jit(init_fn, out_shardings=state_sh)(jax.random.key(config.seed), scale)

        state = run.restore_or_init(jax.eval_shape(init_fn, jax.random.key(config.seed), 1.0), init, ds)
        rep = mesh_lib.replicated(mesh)
        args = (fs_vars, null_arg)
        train_step = run.compile(L.make_train_step(config, model, fs, tx, sched), state,
                                 mesh_lib.global_batch(first, mesh), args,
                                 (jax.tree.map(lambda _: rep, fs_vars), None if null_arg is None else rep), "ldm_step")
        out = run.train(state, host_batches(ds, int(state.step), lambda b: host_batch(config, b)),
                        lambda step, live_state: train_step, args, data_state=lambda done: ds.state() | {"step": done})
        if out.preempted:
            return {}
        results = {"final_loss": out.last_metrics.get("loss", float("nan")), "train_steps_per_s": out.steps_per_s}
        results.update(sample_grid(config, model, sched, fs, out.state, null_tokens, text_fn, workdir))
        results.update(skipped_updates=float(out.skipped_total), skipped_files=float(ds.num_skipped),
                       **{k: float(v) for k, v in ds.caption_counts().items()})
        return run.finish(out.state, results)


def make_generator(config, model, sched, fs: W.FirstStage, latent_shape: tuple[int, int, int]):
    """generate(params, fs_vars, cond, uncond, keys, scale) -> decoded images in [-1, 1], with the config's sampler;
    sample i depends only on keys[i] (and its condition)."""
    sc = config.sampling
    sample = make_sample_fn(lambda p, x, t, c: model.apply({"params": p}, x, t, c), sched, sc.sampler, sc.steps,
                            sc.eta, sc.guidance, config.diffusion.parameterization, sc.spacing, shared_x=True,
                            karras=sc.karras, order=sc.order, guidance_rescale=sc.guidance_rescale)

    @jax.jit
    def generate(params, fs_vars, cond, uncond, keys, scale):
        z = sample_each(sample, params, cond, uncond, keys, latent_shape)
        return jnp.clip(fs.decode(fs_vars, z / scale), -1.0, 1.0)

    return generate


def sample_grid(config, model, sched, fs: W.FirstStage, state: L.LDMState, null_tokens, text_fn,
                workdir: str) -> dict[str, Any]:
    """Guided samples with the EMA weights, written to samples.png: one row per class (at most 10) or per prompt,
    else 4 rows; for Fashion-MNIST models, the classifier's verdict on them (pairs: the full pair evaluation)."""
    sc = config.sampling
    n_per_row = sc.grid_per_class
    ctype = config.condition.type
    cond: dict[str, jax.Array] = {}
    if ctype == "class":
        n_rows = min(config.model.n_classes - 1, 10)
        labels = np.repeat(np.arange(n_rows), n_per_row).astype(np.int32)
        cond["label"] = jnp.asarray(labels)
    elif ctype == "text":
        prompts = list(sc.prompts)
        n_rows = len(prompts)
        cond["tokens"] = jnp.asarray(np.repeat(tokenize(text_fn.tokenizer, prompts, text_fn.max_length), n_per_row,
                                               axis=0))
    else:
        n_rows = 4
    n = n_rows * n_per_row
    params, scale = common.to_host((state.ema_params, state.scale_factor))
    shown = None
    if ctype in ("lowres", "inpaint", "semantic"):
        test_batch = make_dataset(config.data, "test", n, 0, augment=False).batch_at(0)
        images = jnp.asarray(test_batch["image"])
        seg = jnp.asarray(test_batch["segmentation"]) if "segmentation" in test_batch else None
        cond.update(conditions.spatial_condition(config, fs, fs.variables, images, scale, jax.random.key(1),
                                                 segmentation=seg))
        shown = conditions.condition_preview(config, images, cond, seg)
        cond.pop("mask", None)
    tokens = None if null_tokens is None else jnp.asarray(null_tokens)
    guided = ctype in ("class", "text") and sc.guidance != 1.0
    h, w = image_size(config.data)
    generate = make_generator(config, model, sched, fs, (h // fs.factor, w // fs.factor, fs.latent_channels))
    base = jax.random.key(config.seed + 7)

    def draw(cond, ids):
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(ids))
        uncond = conditions.null_condition(config, cond, tokens) if guided else None
        return np.asarray(generate(params, fs.variables, cond, uncond, keys, scale))

    t0 = time.time()
    images = draw(cond, np.arange(n))
    elapsed = time.time() - t0
    if jax.process_index() == 0:
        rows = images
        if shown is not None:  # conditions first, samples under them
            shown = np.asarray(jax.image.resize(shown, (shown.shape[0], h, w, shown.shape[-1]), "nearest"))
            rows = np.concatenate([shown[..., : images.shape[-1]], images])
        save_png(make_grid(to_uint8(rows), n_per_row), os.path.join(workdir, "samples.png"))
    out: dict[str, Any] = {"grid_sample_s": elapsed, "grid_samples": n}
    if ctype == "class" and config.data.name == "fashion_mnist" and (h, w, config.data.channels) == (32, 32, 1):
        out.update(conditional_accuracy(images, labels))  # the classifier's input size
    if ctype == "text" and config.data.name == "fashion_mnist_pairs":
        out.update(pair_evaluation(config, text_fn, lambda c, ids: draw(c, ids), batch=n))
    return out


def pair_evaluation(config, text_fn, draw, batch: int) -> dict[str, float]:
    """evaluation/pairs.py's figures on sampling.pair_eval_samples samples per ordered pair (the config's sampler)."""
    from ldm_jax.evaluation.classifier import get_or_train_classifier
    from ldm_jax.evaluation.pairs import eval_plan, judge_plan, pair_metrics

    plan = eval_plan(config.sampling.pair_eval_samples)
    _, logits_fn = get_or_train_classifier()
    t0 = time.time()

    def draw_prompts(prompts: list[str], ids: np.ndarray) -> np.ndarray:
        return draw({"tokens": jnp.asarray(tokenize(text_fn.tokenizer, prompts, text_fn.max_length))}, ids)

    pred_left, pred_right = judge_plan(plan, draw_prompts, batch, lambda x: logits_fn(jnp.asarray(x)))
    out = pair_metrics(pred_left, pred_right, plan)
    out["pair_eval_s"] = time.time() - t0
    logging.info("pairs: %s", {k: round(v, 4) for k, v in out.items()})
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
