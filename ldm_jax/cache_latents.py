"""Encode a data set once with a frozen stage 1 into a latent cache (data/latents.py) for stage-2 training.

python -m ldm_jax.cache_latents --config configs/ldm_kl4_fmnist.py --out runs/latents [--split train]
    [--first_stage runs/autoencoder] [--batch_size 256] [--config.data.path=...]

The config is the stage-2 config you will train with: its `data` section says what to encode (with the flipped view
too when data.random_flip is on) and `first_stage.workdir` which stage 1 (--first_stage overrides). Then train with
--config.data.latents=runs/latents; the run checks that the cache was made from the same stage-1 checkpoint and
data settings. Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import os
import sys
import time

from ldm_jax.xla_flags import set_default_xla_flags

set_default_xla_flags()  # before anything imports jax

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from ldm_jax import workdir as W  # noqa: E402
from ldm_jax.data.latents import DATA_FIELDS, LatentCacheWriter  # noqa: E402
from ldm_jax.data.pipeline import make_dataset, make_source  # noqa: E402


def _all_captions(source, index: int) -> tuple[str, ...]:
    if hasattr(source, "captions"):  # image folders, packed shards: without decoding the image again
        caps = source.captions(index)
    else:
        caps = source.get(index).get("captions", ())
    return tuple(caps)


def cache_latents(config: ml_collections.ConfigDict, out: str, split: str = "train", batch_size: int = 256,
                  first_stage: str | None = None) -> dict:
    """Writes OUT/split; returns its info.json content."""
    if config.get("stage") != "ldm":
        raise ValueError(f"--config: a stage-2 (ldm) config is needed, this one has stage={config.get('stage')!r}")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    data = config.data.copy_and_resolve_references()
    data.latents, data.shuffle = "", False  # images, in example order
    if data.preprocess == "random_crop":
        raise ValueError("data.preprocess='random_crop' cannot be cached (each step draws a new crop); use 'resize'")
    fs = W.load_first_stage(first_stage or config.first_stage.workdir)
    if int(fs.config.model.in_channels) != data.channels:
        raise ValueError(f"data.channels={data.channels} but the stage-1 model at {fs.workdir} takes "
                         f"{fs.config.model.in_channels}-channel images")
    source = make_source(data, split)
    ds = make_dataset(data, split, batch_size, 0, augment=False, num_epochs=1, source=source)
    n, views = ds.num_examples, 2 if data.random_flip else 1
    encode = jax.jit(fs.moments)
    shape = jax.eval_shape(encode, fs.variables, jax.ShapeDtypeStruct((1, *ds.batch_at(0)["image"].shape[1:]),
                                                                       jnp.float32)).shape[1:]
    with_captions = bool(getattr(source, "has_captions", False))
    writer = LatentCacheWriter(out, split, n, shape, views, with_captions)
    t0 = time.time()
    for step in range(ds.steps_per_epoch):
        batch = ds.batch_at(step)
        x = batch["image"]
        if views == 2:  # the flipped copy the image pipeline's random_flip would give (flip commutes with to_float)
            x = np.concatenate([x, x[:, :, ::-1]])
        m = np.asarray(encode(fs.variables, jnp.asarray(x)))
        m = np.stack([m[: len(batch["image"])], m[len(batch["image"]):]], 1) if views == 2 else m[:, None]
        first = step * batch_size
        caps = [_all_captions(source, i) for i in range(first, min(first + batch_size, n))] if with_captions \
            else None
        writer.add(m, batch["label"], caps)
    info = {"first_stage": os.path.abspath(fs.workdir), "first_stage_step": fs.step,
            "first_stage_type": str(fs.config.model.type), "factor": fs.factor, "views": views,
            "data": {k: data.get(k) for k in DATA_FIELDS}, "data_num_examples": data.get("num_examples"),
            "classes": list(getattr(source, "classes", [])), "split": split, "encode_s": round(time.time() - t0, 2)}
    writer.close(info)
    return info


def main(argv: list[str]) -> None:
    from absl import flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "The stage-2 config (its data and first_stage).")
    out = flags.DEFINE_string("out", None, "Output directory of the cache.")
    split = flags.DEFINE_string("split", "train", "Data split to encode.")
    fs = flags.DEFINE_string("first_stage", None, "Stage-1 workdir (default: the config's first_stage.workdir).")
    bs = flags.DEFINE_integer("batch_size", 256, "Images encoded per call.")
    flags.mark_flags_as_required(["config", "out"])
    try:
        flags.FLAGS(argv)
        cfg = config.value
        info = cache_latents(cfg, out.value, split.value, bs.value, fs.value)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, flags.Error) as e:
        if os.environ.get("LDM_JAX_DEBUG", "") not in ("", "0"):
            raise
        print(f"cache_latents: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    print(f"cached {info['data']['name']} {split.value}: views={info['views']} in {info['encode_s']} s under "
          f"{out.value}; train with --config.data.latents={out.value}")


if __name__ == "__main__":
    main(sys.argv)
