"""The latent cache (python -m ldm_jax.cache_latents, data.latents): stored moments give the same latents, the same
batches and the same stage-2 step as encoding in the step; the run refuses a cache from another stage 1 or data."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from scaleout_utils import FAST_COMPILE, REPO, tiny_ae_config, tiny_ldm_config, write_stage1_workdir  # noqa: E402

from ldm_jax import workdir as W
from ldm_jax.cache_latents import cache_latents  # noqa: E402
from ldm_jax.data.pipeline import make_dataset  # noqa: E402
from ldm_jax.training import ldm as L  # noqa: E402
from ldm_jax.training.train_ldm import host_batch  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    ae = str(root / "ae")
    write_stage1_workdir(ae, tiny_ae_config())
    cfg = tiny_ldm_config(ae, **{"data.random_flip": True, "data.num_examples": 40, "condition.type": "class",
                                 "model.n_classes": 11, "model.conditioning_key": "crossattn",
                                 "model.cond_stage": "class", "train.batch_size": 8})
    out = str(root / "latents")
    info = cache_latents(cfg, out, batch_size=16)
    return cfg, out, info


def test_cache_contents(cache):
    cfg, out, info = cache
    assert info["views"] == 2 and info["first_stage_step"] == 1
    moments = np.load(os.path.join(out, "train", "moments.npy"), mmap_mode="r")
    assert moments.shape == (40, 2, 8, 8, 8)  # KL: mean and log-variance of the 4 latent channels
    fs = W.load_first_stage(cfg.first_stage.workdir)
    data = cfg.data.copy_and_resolve_references()
    data.shuffle = False
    images = make_dataset(data, "train", 40, 0, augment=False).batch_at(0)["image"]
    for view, x in ((0, images), (1, images[:, :, ::-1])):  # the flipped view is the flipped image's encoding
        want = np.asarray(fs.moments(fs.variables, jnp.asarray(x)))
        np.testing.assert_allclose(moments[:, view], want, rtol=1e-5, atol=1e-5)


def test_step_from_cache_equals_step_encoding_images(cache):
    cfg, out, _ = cache
    fs = W.load_first_stage(cfg.first_stage.workdir)
    lat_cfg = cfg.copy_and_resolve_references()
    lat_cfg.data.latents = out
    from_images = make_dataset(cfg.data, "train", 8, cfg.seed)
    from_cache = make_dataset(lat_cfg.data, "train", 8, cfg.seed)
    model, tx, sched = W.build_model(cfg, fs), L.make_optimizer(cfg), W.make_schedule(cfg)
    step_fn, compiled = jax.jit(L.make_train_step(cfg, model, fs, tx, sched)), {}

    def step(state, batch, *args):  # one fast-compiled program per batch layout (images, moments)
        key = tuple(sorted(batch))
        if key not in compiled:
            compiled[key] = step_fn.lower(state, batch, *args).compile(FAST_COMPILE)
        return compiled[key](state, batch, *args)

    first = host_batch(cfg, from_images.batch_at(0))
    state = jax.jit(lambda k: L.init_state(cfg, model, tx, k, (8, 8, 4), {"label": jnp.asarray(first["label"][:1])},
                                           1.0))(jax.random.key(0))
    flips = 0
    for s in range(3):  # the same example order and flips, hence the same latents, loss and update
        a, b = host_batch(cfg, from_images.batch_at(s)), host_batch(lat_cfg, from_cache.batch_at(s))
        assert set(b) == {"moments", "label"}
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_allclose(np.asarray(fs.from_moments(jnp.asarray(b["moments"]))),
                                   np.asarray(fs.encode(fs.variables, jnp.asarray(a["image"]))), rtol=1e-5,
                                   atol=1e-5)
        sa, ma = step(state, a, fs.variables, None)
        sb, mb = step(state, b, fs.variables, None)
        np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-5)
        # Adam normalises each gradient, so where one is ~0 its float noise moves the weight by up to ~lr: the
        # tolerance is 1% of the learning rate (1e-3).
        for x, y in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sb.params), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
        state = sa
        flips += sum(from_cache.preprocessor.flips(np.random.default_rng([cfg.seed, 1, s, r])) for r in range(8))
    assert 0 < flips < 24  # both views were used


def test_cache_mismatch_refused(cache, tmp_path):
    cfg, out, info = cache
    fs = W.load_first_stage(cfg.first_stage.workdir)
    bad = cfg.copy_and_resolve_references()
    bad.data.resolution = 8
    with pytest.raises(ValueError, match="data.resolution=8 but the latent cache was made with 16"):
        L.check_latent_cache(info, bad, fs)
    other = str(tmp_path / "ae2")
    write_stage1_workdir(other, tiny_ae_config(), step=3)
    with pytest.raises(ValueError, match="re-run python -m ldm_jax.cache_latents"):
        L.check_latent_cache(info, cfg, W.load_first_stage(other))
    spatial = cfg.copy_and_resolve_references()
    spatial.condition.type = "lowres"
    with pytest.raises(ValueError, match="needs the images"):
        L.check_latent_cache(info, spatial, fs)
    crop = cfg.copy_and_resolve_references()
    crop.data.update(latents=out, preprocess="random_crop")
    with pytest.raises(ValueError, match="random_crop"):
        make_dataset(crop.data, "train", 6, 0)


def test_cli_one_line_errors(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "ldm_jax.cache_latents", "--config", "tests/tiny_config.py:ae",
                        "--out", str(tmp_path / "x")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "a stage-2 (ldm) config is needed" in r.stderr


def test_train_from_cache_end_to_end(cache, tmp_path):
    """train_and_evaluate with data.latents: runs, and scale_by_std from the cached moments equals the factor
    computed from the images (same posterior sample)."""
    from ldm_jax.training.train_ldm import scale_key, train_and_evaluate

    cfg, out, _ = cache
    run = cfg.copy_and_resolve_references()
    run.data.latents = out
    run.first_stage.scale_by_std = True
    run.train.num_steps = 2
    results = train_and_evaluate(run, str(tmp_path / "ldm"))
    assert np.isfinite(results["final_loss"]) and results["grid_samples"] == 20
    assert results["train_steps_per_s"] > 0  # the loop's own timing (benchmarks' loop case)
    fs = W.load_first_stage(cfg.first_stage.workdir)
    images = make_dataset(cfg.data, "train", 8, cfg.seed).batch_at(0)["image"]
    want = L.first_batch_scale(fs, images, scale_key(run))
    from ldm_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(str(tmp_path / "ldm"), async_save=False)
    state, _ = ckpt.restore_raw()
    ckpt.close()
    assert float(state["scale_factor"]) == pytest.approx(want, rel=1e-5)
