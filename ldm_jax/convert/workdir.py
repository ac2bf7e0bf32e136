"""Write a converted model as ordinary workdirs: OUT/autoencoder (stage 1) and OUT/ldm (stage 2 pointing to it),
each with config.json and an Orbax checkpoint holding an `AEState` / `LDMState`, as the train loops write them.

Only weights are stored (stage 1: params; stage 2: EMA params, scale_factor and step), with empty optimizer and
discriminator entries. `trainable=True` adds stage 2's non-EMA weights where the source has them, which
fine-tuning (`init_from`) starts its raw weights from.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import ml_collections
import numpy as np

from ldm_jax.checkpoint import Checkpointer
from ldm_jax.config_defaults import ldm_config
from ldm_jax.convert.autoencoder import model_config
from ldm_jax.convert.sources import Converted, LDMParts
from ldm_jax.workdir import save_config

AE_DIR, LDM_DIR = "autoencoder", "ldm"


def autoencoder_config(conv: Converted) -> ml_collections.ConfigDict:
    """The stage-1 run config: config_defaults.autoencoder_config with the converted model fields."""
    from ldm_jax.config_defaults import autoencoder_config as base

    c = base(conv.autoencoder["type"])
    c.model = model_config(conv.autoencoder)
    c.data.update(channels=int(conv.autoencoder["in_channels"]), path="")
    return c


def ldm_run_config(parts: LDMParts, fields: dict[str, Any], first_stage_dir: str) -> ml_collections.ConfigDict:
    """The stage-2 run config for converted weights (what sample.py and train.py read)."""
    c = ldm_config()
    c.first_stage.update(workdir=first_stage_dir, scale_factor=float(parts.scale_factor), scale_by_std=False)
    ctype = {"clip": "text", "class": "class"}.get(parts.cond_stage, "class" if parts.conditioning_key == "adm"
                                                   else "none")
    # Stable Diffusion was trained with 10% of its captions dropped (classifier-free guidance); CompVis' own LDMs
    # were not (their training code has no condition dropout), so sample.py warns only for those.
    c.condition.update(type=ctype, p_uncond=0.1 if parts.cond_stage == "clip" else 0.0, vocab_path="")
    if parts.cond_stage == "clip":
        c.condition.tokenizer = "clip"  # LoadedLDM reads WORKDIR/tokenizer with transformers' CLIPTokenizer
    u = {k: v for k, v in parts.unet.items() if not k.startswith("_")}
    c.model.unet.update(**u, dropout=0.0, remat_policy="", attention_impl="")
    context = parts.unet.get("_context_dim")
    c.model.update(conditioning_key=parts.conditioning_key, cond_stage=parts.cond_stage,
                   n_classes=int(parts.n_classes), context_dim=int(context or c.model.context_dim),
                   latent_channels=int(fields["embed_dim"]))
    if parts.cond_stage == "clip":
        c.model.clip = ml_collections.ConfigDict(parts.clip)
        c.model.text_max_len = int(parts.clip["max_len"])
    c.diffusion.update(**parts.diffusion)
    c.data.update(resolution=int(parts.resolution), channels=int(fields["in_channels"]), path="")
    c.sampling.update(sampler="ddim", steps=50, eta=0.0, guidance=7.5 if parts.cond_stage == "clip" else 1.0)
    return c


def _save(workdir: str, config: ml_collections.ConfigDict, state: Any, step: int, extra: dict[str, Any]) -> None:
    ckpt = Checkpointer(workdir, max_to_keep=1, async_save=False)
    ckpt.save(step, state, {"config": config.to_dict(), "data": {"step": step}, **extra}, force=True)
    ckpt.close()
    save_config(config, workdir)


def _check_empty(workdir: str) -> None:
    ckpts = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpts) and os.listdir(ckpts):
        raise FileExistsError(f"--out: {workdir} already holds checkpoints; choose an empty directory")


def write_workdirs(conv: Converted, out: str, trainable: bool = False, source: str = "") -> dict[str, str]:
    """Writes OUT/autoencoder and (with a UNet) OUT/ldm; returns {'autoencoder': path, 'ldm': path}."""
    ae_dir, ldm_dir = os.path.join(out, AE_DIR), os.path.join(out, LDM_DIR)
    for d in (ae_dir, ldm_dir):
        _check_empty(d)
    extra = {"converted_from": {"source": source, "notes": conv.notes, **conv.report.summary()}}
    cfg = autoencoder_config(conv)
    params = {"model": conv.ae_params, "logvar": np.asarray(cfg.loss.logvar_init, np.float32)}
    # The fields of training/autoencoder.AEState; the training-only ones stay empty (nothing resumes a conversion:
    # fine-tuning starts a new run from it, training/init_from.py).
    state = {"step": _step(conv), "params": params, "model_state": {}, "opt_state": {}, "disc_params": {},
             "disc_state": {}, "disc_opt_state": {}, "skipped": np.int32(0)}
    _save(ae_dir, cfg, state, conv.step, extra)
    written = {"autoencoder": ae_dir}
    if conv.ldm is not None:
        written["ldm"] = _write_ldm(conv, ldm_dir, ae_dir, trainable, extra)
    with open(os.path.join(out, "conversion.json"), "w") as f:
        json.dump({**extra["converted_from"], "workdirs": written, "trainable": trainable}, f, indent=2)
    return written


def _step(conv: Converted) -> np.ndarray:
    return np.asarray(conv.step, np.int32)


def _write_ldm(conv: Converted, ldm_dir: str, ae_dir: str, trainable: bool, extra: dict[str, Any]) -> str:
    parts = conv.ldm
    cfg2 = ldm_run_config(parts, conv.autoencoder, ae_dir)
    # The fields of training/ldm.LDMState: the non-EMA weights only with `trainable` (init_from's raw start).
    raw = parts.raw_params if trainable and parts.raw_params is not None else {}
    state2 = {"step": _step(conv), "params": raw, "ema_params": parts.params, "opt_state": {},
              "scale_factor": np.float32(parts.scale_factor), "skipped": np.int32(0)}
    _save(ldm_dir, cfg2, state2, conv.step, extra)
    if parts.tokenizer is not None:
        tok_dir = os.path.join(ldm_dir, "tokenizer")
        shutil.rmtree(tok_dir, ignore_errors=True)
        parts.tokenizer.save_pretrained(tok_dir)
    return ldm_dir
