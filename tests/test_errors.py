"""Issue #4: bad input gives a one-line error naming the config field or file, raised by the real train loops
before anything is compiled (checked by logging what XLA compiles)."""

import logging
import re

import jax
import numpy as np
import pytest
import scaleout_utils as su

from ldm_jax.checkpoint import Checkpointer
from ldm_jax.training import train_autoencoder, train_ldm

# Data-movement helpers JAX compiles on first use of a shape (a device_put is staged through jit(stage)).
TRIVIAL = {"stage", "convert_element_type", "broadcast_in_dim", "_threefry_seed", "random_wrap", "random_bits"}


class _CompileLog(logging.Handler):
    """Collects the names of functions XLA compiles while `jax_log_compiles` is on."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = re.match(r"Finished XLA compilation of jit\((.*)\) in", record.getMessage())
        if m:
            self.names.append(m.group(1))


def raises_before_compile(exc_type, pattern: str, fn, *args):
    """Runs fn(*args); asserts it raises `exc_type` with a one-line message matching `pattern`, and that
    nothing but JAX's trivial data-movement helpers was compiled before (no model, loss or step program)."""
    handler, logger = _CompileLog(), logging.getLogger("jax._src.dispatch")
    logger.addHandler(handler)
    old = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    try:
        with pytest.raises(exc_type) as info:
            fn(*args)
    finally:
        jax.config.update("jax_log_compiles", old)
        logger.removeHandler(handler)
    msg = str(info.value)
    assert "\n" not in msg, f"not one line: {msg!r}"
    assert re.search(pattern, msg), msg
    compiled = set(handler.names) - TRIVIAL
    assert not compiled, f"compiled {sorted(compiled)} before the error: {msg}"
    return msg


@pytest.fixture(scope="module")
def stage1_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("stage1"))
    su.write_stage1_workdir(path, su.tiny_ae_config())
    return path


# --- stage 1 ---

@pytest.mark.parametrize("overrides, exc, pattern", [
    ({"train.batch_size": 12}, ValueError,
     r"^train\.batch_size=12 is not divisible by the data-parallel size 8 \(mesh\.data×mesh\.fsdp\)$"),
    ({"mesh.data": 3, "mesh.fsdp": 2}, ValueError,
     r"^mesh: mesh\.data×mesh\.fsdp = 3×2 = 6 does not match the 8 available devices$"),
    ({"mesh.data": -1, "mesh.fsdp": 3}, ValueError, r"^mesh: mesh\.data×mesh\.fsdp=\[-1, 3\] cannot fill 8 devices$"),
    ({"data.name": "folder", "data.path": "/nonexistent/images"}, FileNotFoundError,
     r"^data\.path: image folder '/nonexistent/images' does not exist$"),
    ({"data.name": "imagenet"}, ValueError, r"^data\.name must be .*got 'imagenet'$"),
    ({"train.grad_accum": 2}, ValueError, r"^train\.grad_accum=2: stage 1 has no gradient accumulation"),
])
def test_autoencoder_bad_config(tmp_path, overrides, exc, pattern):
    cfg = su.tiny_ae_config(**overrides)
    raises_before_compile(exc, pattern, train_autoencoder.train_and_evaluate, cfg, str(tmp_path))


def test_autoencoder_resume_with_other_model_config(tmp_path):
    su.write_stage1_workdir(str(tmp_path), su.tiny_ae_config())
    cfg = su.tiny_ae_config(**{"model.ch": 16, "model.embed_dim": 3, "model.z_channels": 3})
    raises_before_compile(
        ValueError, r"^checkpoint .*/checkpoints was written for a different model config \(model\.\['ch', "
                    r"'embed_dim', 'z_channels'\] differ\)$",
        train_autoencoder.train_and_evaluate, cfg, str(tmp_path))


# --- stage 2 ---

@pytest.mark.parametrize("overrides, exc, pattern", [
    ({"model.unet.attention_resolutions": (4,)}, ValueError,
     r"^model\.unet: attention_resolutions \[4\] never reached: channel_mult \(1,\) gives downsample factors \[1\]"),
    ({"model.unet.num_head_channels": 24}, ValueError,
     r"^model\.unet: num_head_channels 24 does not divide attention channels 32$"),
    ({"model.unet.num_head_channels": -1, "model.unet.num_heads": 3}, ValueError,
     r"^model\.unet: num_heads 3 does not divide attention channels 32$"),
    ({"model.unet.in_channels": 3}, ValueError,
     r"^model\.unet\.in_channels=3 but the stage-1 latents have 4 channels$"),
    ({"model.latent_channels": 3}, ValueError,
     r"^model\.latent_channels=3 but the stage-1 model at .* has embed_dim=4$"),
    ({"first_stage.workdir": "/nonexistent/stage1"}, FileNotFoundError,
     r"^first_stage\.workdir: no such directory: /nonexistent/stage1 \(train stage 1 first\)$"),
    ({"diffusion.schedule": "sigmoid"}, ValueError, r"^diffusion\.schedule must be one of .*; got 'sigmoid'$"),
    ({"sampling.sampler": "heun"}, ValueError, r"^sampling\.sampler must be one of .*; got 'heun'$"),
    ({"sampling.sampler": "euler", "sampling.eta": 0.5}, ValueError, r"^sampling\.eta must be 0 for the euler sampler"),
    ({"sampling.sampler": "ddim", "sampling.karras": True}, ValueError,
     r"^sampling\.karras: the ddim sampler has no Karras sigmas"),
    ({"sampling.guidance": -1.0}, ValueError, r"^sampling\.guidance must be a finite number >= 0, got -1\.0$"),
    ({"sampling.guidance": float("nan")}, ValueError, r"^sampling\.guidance must be a finite number >= 0, got nan$"),
    ({"sampling.steps": 0}, ValueError, r"^sampling\.steps must be in \[1, 100\], got 0$"),
    ({"sampling.steps": 101}, ValueError, r"^sampling\.steps must be in \[1, 100\], got 101$"),
    ({"sampling.eta": -0.5}, ValueError, r"^sampling\.eta must be a finite number >= 0, got -0\.5$"),
    ({"train.batch_size": 4}, ValueError, r"^train\.batch_size=4 is not divisible by the data-parallel size 8"),
])
def test_ldm_bad_config(stage1_dir, tmp_path, overrides, exc, pattern):
    cfg = su.tiny_ldm_config(stage1_dir, **overrides)
    raises_before_compile(exc, pattern, train_ldm.train_and_evaluate, cfg, str(tmp_path))


def test_ldm_resume_with_other_model_config(stage1_dir, tmp_path):
    """A stage-2 workdir whose checkpoint was written by a model with other channel multipliers."""
    other = su.tiny_ldm_config(stage1_dir, **{"model.unet.model_channels": 64})
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(5, {"step": np.int32(5)}, {"config": other.to_dict()}, force=True)
    ckpt.close()
    cfg = su.tiny_ldm_config(stage1_dir)
    raises_before_compile(ValueError, r"^checkpoint .* was written for a different model config \(model\.\['unet'\]",
                          train_ldm.train_and_evaluate, cfg, str(tmp_path))


def test_ldm_first_stage_workdir_without_checkpoint(tmp_path):
    su.write_stage1_workdir(str(tmp_path / "s1"), su.tiny_ae_config())
    import shutil

    shutil.rmtree(tmp_path / "s1" / "checkpoints")
    cfg = su.tiny_ldm_config(str(tmp_path / "s1"))
    raises_before_compile(FileNotFoundError, r"^first_stage\.workdir: no checkpoint under .*/s1/checkpoints$",
                          train_ldm.train_and_evaluate, cfg, str(tmp_path / "run"))
