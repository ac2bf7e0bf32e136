"""A workdir and what it holds: config.json (written here), Orbax checkpoints (`ldm_jax.checkpoint`), and the
models they define. The one place that reads a workdir back, for training (resume, the frozen first stage,
fine-tuning sources), sampling, evaluation and the converter, so none of those imports `training`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import jax
import ml_collections
import numpy as np

from ldm_jax.checkpoint import Checkpointer
from ldm_jax.conditions import CONDITION_TYPES, LOWRES_MODES
from ldm_jax.config_defaults import load_saved_config
from ldm_jax.diffusion import DiffusionSchedule
from ldm_jax.models.autoencoder import build_autoencoder
from ldm_jax.models.latent_diffusion import LatentDiffusionModel, build_latent_diffusion

STAGES = {"autoencoder": "an autoencoder (stage-1) run", "ldm": "a latent diffusion (stage-2) run"}


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes WORKDIR/config.json atomically (process 0 only): the record of the run's config."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, ".config.json.tmp")
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    os.replace(tmp, os.path.join(workdir, "config.json"))


def read_config(workdir: str, stage: str | None = None, field: str = "--workdir",
                hint: str | None = None) -> ml_collections.ConfigDict:
    """WORKDIR/config.json on top of its stage's defaults; `stage` ('autoencoder' | 'ldm', None: either) is
    checked. One-line errors start with `field`, the option that named the workdir, and end with `hint`."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"{field}: no such directory: {workdir}" + (f" ({hint})" if hint else ""))
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{field}: {workdir} has no config.json ({hint or 'not a training workdir'})")
    config = load_saved_config(path)
    found, wanted = config.get("stage"), (stage,) if stage else tuple(STAGES)
    if found not in wanted:
        raise ValueError(f"{field}: {workdir} holds a {found!r} run, not "
                         f"{' or '.join(STAGES.get(w, repr(w)) for w in wanted)}")
    return config


def restore_state(workdir: str, field: str = "--workdir") -> tuple[dict, int]:
    """(the newest checkpoint's state as a tree of arrays, its step), read without a target."""
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        step = _newest_step(ckpt, field)
        state, _ = ckpt.restore_raw(step)
        return state, step
    finally:
        ckpt.close()


def restore_ema(workdir: str, step: int | None = None) -> tuple[dict, float, int]:
    """(EMA params, scale_factor, step) of a stage-2 workdir's checkpoint `step` (default: the newest), without
    reading the optimizer state (2x the params for Adam)."""
    import orbax.checkpoint as ocp

    ckpt = Checkpointer(workdir, async_save=False)
    try:
        if step is None:
            step = _newest_step(ckpt, "--workdir")
        elif step not in (have := sorted(ckpt.manager.all_steps())):
            raise FileNotFoundError(f"--step: no checkpoint {step} under {ckpt.directory} (have {have})")
        path = os.path.join(ckpt.directory, str(step), "state")
        try:
            with ocp.PyTreeCheckpointer() as reader:
                tree = reader.metadata(path)
                tree = getattr(tree, "item_metadata", tree)
                tree = getattr(tree, "tree", tree)
                item = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype),
                                    {k: tree[k] for k in ("ema_params", "scale_factor", "step")})
                restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
                state = reader.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                         partial_restore=True))
        except Exception:  # another orbax layout: read everything
            state, _ = ckpt.restore_raw(step)
    finally:
        ckpt.close()
    return jax.tree.map(np.asarray, state["ema_params"]), float(np.asarray(state["scale_factor"])), step


def _newest_step(ckpt: Checkpointer, field: str) -> int:
    step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"{field}: no checkpoint under {ckpt.directory}")
    return int(step)


@dataclass
class FirstStage:
    """A frozen stage-1 autoencoder restored from its workdir."""

    model: Any
    variables: dict
    config: ml_collections.ConfigDict
    workdir: str
    step: int = -1  # the checkpoint step restored (a latent cache records it)

    @property
    def latent_channels(self) -> int:
        return int(self.config.model.embed_dim)

    @property
    def factor(self) -> int:
        return 2 ** (len(self.config.model.ch_mult) - 1)

    def encode(self, variables: dict, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        return self.model.apply(variables, x, key, method="encode_latent")

    def decode(self, variables: dict, z: jax.Array) -> jax.Array:
        return self.model.apply(variables, z, method="decode_latent")

    def moments(self, variables: dict, x: jax.Array) -> jax.Array:
        """What a latent cache stores per image (KL: mean and log-variance; VQ: pre-quantisation latents)."""
        return self.model.apply(variables, x, method="encode_moments")

    def from_moments(self, moments: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """`encode`'s result from stored moments (the same posterior sample for the same key)."""
        return self.model.latent_from_moments(moments, key)


def load_first_stage(workdir: str) -> FirstStage:
    """Reads a stage-1 workdir (config.json + newest Orbax checkpoint); one-line errors name what is missing."""
    config = read_config(workdir, "autoencoder", "first_stage.workdir", hint="train stage 1 first")
    state, step = restore_state(workdir, "first_stage.workdir")
    variables = {"params": state["params"]["model"], **state.get("model_state", {})}
    return FirstStage(build_autoencoder(config.model), variables, config, workdir, step)


def resolve_first_stage(workdir: str, config: ml_collections.ConfigDict, override: str | None = None) -> str:
    """The stage-1 workdir: `override`, else first_stage.workdir as saved (relative to the current directory,
    or failing that to the stage-2 workdir's parent, so a moved runs/ directory still loads)."""
    if override:
        return override
    path = config.first_stage.workdir
    candidates = [path]
    if not os.path.isabs(path):
        parent = os.path.dirname(os.path.abspath(workdir))
        candidates += [os.path.join(parent, path), os.path.join(parent, os.path.basename(path))]
    for c in candidates:
        if os.path.isfile(os.path.join(c, "config.json")):
            return c
    return path  # load_first_stage names what is missing


def make_schedule(cfg: ml_collections.ConfigDict) -> DiffusionSchedule:
    """The diffusion schedule of a stage-2 config."""
    d = cfg.diffusion
    if d.zero_terminal_snr and d.parameterization == "eps":
        raise ValueError("diffusion.zero_terminal_snr needs diffusion.parameterization 'v' or 'x0' (at SNR 0 an eps "
                         "prediction says nothing about x0)")
    return DiffusionSchedule.create(d.schedule, d.num_timesteps, d.linear_start, d.linear_end, d.cosine_s,
                                    d.zero_terminal_snr)


def build_model(cfg: ml_collections.ConfigDict, first_stage: FirstStage) -> LatentDiffusionModel:
    """The stage-2 network of a config, checked against its first stage and condition type."""
    if cfg.model.latent_channels and cfg.model.latent_channels != first_stage.latent_channels:
        raise ValueError(f"model.latent_channels={cfg.model.latent_channels} but the stage-1 model at "
                         f"{first_stage.workdir} has embed_dim={first_stage.latent_channels}")
    ctype = cfg.condition.type
    if ctype not in CONDITION_TYPES:
        raise ValueError(f"condition.type must be one of {CONDITION_TYPES}, got {ctype!r}")
    if ctype == "lowres" and cfg.condition.lowres_mode not in LOWRES_MODES:
        raise ValueError(f"condition.lowres_mode must be one of {LOWRES_MODES}, got {cfg.condition.lowres_mode!r}")
    if ctype == "semantic" and not cfg.model.concat_in_channels:
        raise ValueError("condition.type='semantic' needs model.concat_in_channels (the number of segment classes)")
    return build_latent_diffusion(cfg.model, first_stage.latent_channels)
