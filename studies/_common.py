"""Shared pieces of the study scripts: paths, JSON/plot output, small in-process training loops.

The loops call the library's own train steps (ldm_jax.training.autoencoder / ldm) on one device without
TensorBoard writers (clu's writers import TensorFlow), so the studies run wherever jax + flax run; stage-1
models are saved as ordinary workdirs (config.json + Orbax checkpoint) that eval.py and stage 2 can load.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # studies/*.py run as scripts: make the checkout importable without installing
    sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

RESULTS = os.path.join(REPO, "studies", "results")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> str:
    """'cpu: 2 cores' / 'gpu: NVIDIA H100 …' for the README tables."""
    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"cpu: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), jax {jax.__version__}"
    return f"{d.platform}: {getattr(d, 'device_kind', '')}, jax {jax.__version__}"


def write_result(name: str, result: dict[str, Any], out_dir: str = RESULTS) -> str:
    """studies/results/NAME.json (nan/inf as null, arrays dropped)."""
    from ldm_jax.evaluation.evaluate import finite_or_none

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    strip = lambda d: {k: v for k, v in d.items() if not isinstance(v, np.ndarray)}  # noqa: E731
    clean = {k: ([strip(r) for r in v] if k == "runs" else v) for k, v in result.items()}
    with open(path + ".tmp", "w") as f:
        json.dump(finite_or_none(clean), f, indent=2)
    os.replace(path + ".tmp", path)
    log(f"wrote {path}")
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sample_rows_png(rows: list[np.ndarray], labels: list[str], path: str) -> None:
    """One row of [-1, 1] images per setting, labelled on the left (a quick visual next to the numbers)."""
    plt = pyplot()
    n = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9, len(rows) * 0.95 + 0.2), squeeze=False)
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        for j in range(n):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(row):
                img = np.clip((row[j] + 1) / 2, 0, 1)
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            if j == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    log(f"wrote {path}")


# --------------------------------------------------------------------------- stage 1


def train_autoencoder(config: ml_collections.ConfigDict, workdir: str, num_steps: int) -> dict[str, float]:
    """num_steps of the library's stage-1 step (batch config.train.batch_size) from scratch; saves WORKDIR as the
    train loop does (config.json + checkpoint). Reuses a finished workdir (same config) instead of retraining."""
    from ldm_jax.checkpoint import Checkpointer
    from ldm_jax.data.pipeline import make_dataset
    from ldm_jax.training import autoencoder as ae
    from ldm_jax.workdir import save_config

    config.train.num_steps = num_steps
    info_path = os.path.join(workdir, "train_info.json")
    if os.path.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
        if info.get("config") == json.loads(config.to_json_best_effort()) and info["steps"] == num_steps:
            log(f"reusing {workdir}")
            return info
    model, disc, tx_g, tx_d = ae.build_models(config)
    res, ch = config.data.resolution, config.data.channels
    state = ae.init_state(config, model, disc, tx_g, tx_d, jax.random.key(config.seed), (res, res, ch))
    ds = make_dataset(config.data, "train", config.train.batch_size, config.seed)
    steps = {}

    def step_fn(use_disc):
        if use_disc not in steps:
            steps[use_disc] = jax.jit(ae.make_train_step(config, model, disc, tx_g, tx_d, use_disc), donate_argnums=0)
        return steps[use_disc]

    disc_on = config.loss.disc_weight > 0 and config.loss.disc_factor > 0
    t0 = time.time()
    t_compiled = None
    for s in range(num_steps):
        b = ds.batch_at(s)
        state, m = step_fn(disc_on and s >= config.loss.disc_start)(state, {"image": jnp.asarray(b["image"])}, None)
        if s == 0:
            jax.block_until_ready(m)
            t_compiled = time.time()
    jax.block_until_ready(state)
    seconds = time.time() - t_compiled
    os.makedirs(workdir, exist_ok=True)
    ckpt = Checkpointer(workdir, async_save=False)
    saved = {"params": state.params}
    if state.model_state:  # e.g. a VQ model's EMA codebook (an empty dict is left out: load_first_stage defaults it)
        saved["model_state"] = state.model_state
    ckpt.save(num_steps, saved,
              {"config": config.to_dict(), "data": {"step": num_steps}}, force=True)
    ckpt.close()
    save_config(config, workdir)
    info = {"steps": num_steps, "train_seconds": seconds, "compile_seconds": t_compiled - t0,
            "steps_per_s": (num_steps - 1) / max(seconds, 1e-9), "final_rec_l1": float(m["rec_l1"]),
            "config": json.loads(config.to_json_best_effort())}
    with open(info_path, "w") as f:
        json.dump(info, f, indent=2)
    return info


def autoencoder_config(kind: str, f: int, channels: int = 16, embed_dim: int = 4, n_embed: int = 256,
                       batch_size: int = 32) -> ml_collections.ConfigDict:
    """The demo stage-1 model (configs/demo_autoencoder.py) at downsampling factor f, KL or VQ."""
    sys.path.insert(0, os.path.join(REPO, "configs"))
    import demo_autoencoder

    c = demo_autoencoder.get_config()
    mult = {1: (1,), 2: (1, 2), 4: (1, 2, 4), 8: (1, 2, 4, 4), 16: (1, 2, 4, 4, 4)}[f]
    c.model.update(ch=channels, ch_mult=mult, embed_dim=embed_dim, z_channels=embed_dim)
    if kind == "vq":
        c.model.type = "vq"
        c.model.n_embed = n_embed
        c.model.beta = 0.25
        c.model.legacy_beta = False
        c.model.ema_decay = None
        c.model.dead_code_threshold = 0.0
    c.train.batch_size = batch_size
    c.data.prefetch = 0
    return c


# --------------------------------------------------------------------------- stage 2


def identity_first_stage(resolution: int, channels: int):
    """A parameter-free first stage (f = 1): LDM-1 diffuses pixels, as a pixel-space DDPM."""
    import flax.linen as nn

    from ldm_jax.workdir import FirstStage

    class Identity(nn.Module):
        def encode_latent(self, x, key=None):
            return x

        def decode_latent(self, z):
            return z

        def __call__(self, x, key=None, train=False):
            return {"rec": x}

    cfg = ml_collections.ConfigDict({"model": {"type": "identity", "embed_dim": channels, "ch_mult": (1,)},
                                     "data": {"resolution": resolution, "channels": channels}})
    return FirstStage(Identity(), {}, cfg, "identity")


def ldm_config(first_stage, batch_size: int = 64) -> ml_collections.ConfigDict:
    """The demo class-conditional LDM (configs/demo_ldm.py) on the given first stage (same UNet for every f)."""
    sys.path.insert(0, os.path.join(REPO, "configs"))
    import demo_ldm

    c = demo_ldm.get_config()
    ch = first_stage.latent_channels
    c.model.unet.update(in_channels=ch, out_channels=ch)
    c.first_stage.workdir = first_stage.workdir
    if first_stage.config.model.type == "identity":  # pixels in [-1, 1]: the usual pixel-space DDPM scaling
        c.first_stage.update(scale_by_std=False, scale_factor=1.0)
    c.train.batch_size = batch_size
    c.data.prefetch = 0
    return c


def train_ldm_for(config: ml_collections.ConfigDict, first_stage, seconds: float, max_steps: int = 10**9):
    """Trains the library's stage-2 step for `seconds` of wall-clock (compilation excluded); returns a
    ready-to-sample inference.LoadedLDM on the EMA weights and a dict of training numbers."""
    from ldm_jax import workdir as W
    from ldm_jax.data.pipeline import make_dataset
    from ldm_jax.inference import LoadedLDM
    from ldm_jax.training import ldm as L

    model, sched, tx = W.build_model(config, first_stage), W.make_schedule(config), L.make_optimizer(config)
    ds = make_dataset(config.data, "train", config.train.batch_size, config.seed)
    first = ds.batch_at(0)
    scale = float(config.first_stage.scale_factor)
    if config.first_stage.scale_by_std:
        scale = L.first_batch_scale(first_stage, first["image"], None)
    res, f = config.data.resolution, first_stage.factor
    latent_shape = (res // f, res // f, first_stage.latent_channels)
    state = L.init_state(config, model, tx, jax.random.key(config.seed), latent_shape,
                         {"label": jnp.asarray(first["label"][:1])}, scale)
    state = state.replace(ema_params=jax.tree.map(jnp.copy, state.params))  # own buffers: the state is donated
    step = jax.jit(L.make_train_step(config, model, first_stage, tx, sched), donate_argnums=0)
    t0 = time.time()
    n, losses = 0, []
    t_start = None
    while n < max_steps:
        b = ds.batch_at(n)
        state, m = step(state, {"image": jnp.asarray(b["image"]), "label": jnp.asarray(b["label"])},
                        first_stage.variables, None)
        n += 1
        if n == 1:
            jax.block_until_ready(m)
            t_start = time.time()  # the budget starts after compilation
        if n % 10 == 0:
            losses.append(float(m["loss"]))  # also keeps async dispatch from running far ahead of the clock
            if time.time() - t_start >= seconds:
                break
    jax.block_until_ready(state)
    elapsed = time.time() - t_start
    info = {"train_steps": n, "train_seconds": elapsed, "compile_seconds": t_start - t0,
            "train_steps_per_s": (n - 1) / max(elapsed, 1e-9),
            "train_images_per_s": (n - 1) * config.train.batch_size / max(elapsed, 1e-9),
            "final_loss": float(np.mean(losses[-5:])) if losses else float(m["loss"]), "scale_factor": scale,
            "latent_shape": list(latent_shape),
            "unet_params": int(sum(x.size for x in jax.tree.leaves(state.params)))}
    ldm = LoadedLDM(config, model, first_stage, jax.device_get(state.ema_params), scale, sched, n,
                    f"(in memory: {first_stage.workdir})")
    return ldm, info
