"""Fine-tuning: start a new stage-2 run from the weights of another stage-2 workdir (`config.init_from`).

The source is any stage-2 workdir: a converted Stable Diffusion (`python -m ldm_jax.convert SRC --out OUT`, then
OUT/ldm) or one of our own runs. What defines the network and its inputs comes from the source: the `model` section
(architecture, text tower), the schedule and parameterisation, the first stage and its scale factor, the condition
type and tokenizer. What defines the run comes from the config: data, batch size, learning rate, steps, EMA decay,
condition dropout (`condition.p_uncond`), loss options (min-SNR, offset noise), compute dtype, remat, and
`model.train_text_encoder`. The run starts at step 0 with a fresh optimizer; its raw weights are the source's raw
weights where it has them (a `--trainable` conversion, a training run), else its EMA weights; its EMA starts from
the source's EMA weights.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from ldm_jax.workdir import read_config, resolve_first_stage, restore_state

# model fields that are choices of the run, not of the weights: kept from the fine-tuning config.
_RUN_MODEL_FIELDS = ("dtype", "train_text_encoder")
_RUN_UNET_FIELDS = ("remat_policy", "attention_impl", "dropout")
# diffusion fields that define what the weights predict: taken from the source.
_SOURCE_DIFFUSION_FIELDS = ("schedule", "num_timesteps", "linear_start", "linear_end", "cosine_s", "parameterization",
                            "zero_terminal_snr")


def apply_init_from(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Merges the source workdir's model, schedule, first stage and tokenizer into `config` (in place)."""
    path = config.init_from
    src = read_config(path, "ldm", "init_from", hint="a stage-2 workdir, e.g. OUT/ldm of python -m ldm_jax.convert")
    mine = config.model
    model = ml_collections.ConfigDict(src.model.to_dict())
    for k in _RUN_MODEL_FIELDS:
        model[k] = mine[k]
    for k in _RUN_UNET_FIELDS:
        model.unet[k] = mine.unet[k]
    with config.unlocked():
        config.model = model
    for k in _SOURCE_DIFFUSION_FIELDS:
        if k in src.diffusion:
            config.diffusion[k] = src.diffusion[k]
    config.first_stage.workdir = resolve_first_stage(path, src)
    config.first_stage.scale_by_std = False  # the source's scale factor comes with its weights
    config.first_stage.scale_factor = float(src.first_stage.scale_factor)
    config.condition.type = src.condition.type
    if src.condition.type == "text":
        config.condition.tokenizer = src.condition.tokenizer
        config.condition.vocab_path = src.condition.vocab_path or os.path.join(path, "tokenizer")
    return config


def load_init_weights(path: str) -> tuple[dict, dict, float]:
    """(raw params, EMA params, scale_factor) of the source's newest checkpoint, as numpy."""
    state, _ = restore_state(path, "init_from")
    ema = state["ema_params"]
    raw = state.get("params") or ema  # a sampling-only conversion stores only the EMA weights
    to_np = lambda tree: jax.tree.map(np.asarray, tree)  # noqa: E731
    return to_np(raw), to_np(ema), float(np.asarray(state["scale_factor"]))
