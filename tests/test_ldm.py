"""Stage 2 end to end on tiny shapes: training lowers the loss, condition dropout, guidance, scale_by_std,
inpainting / low-res / semantic conditions, and sample.py (one-line errors, resume, convolutional sampling)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ldm_jax import conditions
from ldm_jax import workdir as W
from ldm_jax.checkpoint import Checkpointer
from ldm_jax.config_defaults import autoencoder_config, ldm_config
from ldm_jax.data.pipeline import make_dataset
from ldm_jax.diffusion import ddim_sample, diffusion_loss
from ldm_jax.diffusion.generate import make_sample_fn
from ldm_jax.models.autoencoder import build_autoencoder
from ldm_jax.training import ldm as L
from ldm_jax.workdir import save_config

RES, BATCH, STEPS = 16, 16, 40


@pytest.fixture(scope="module", autouse=True)
def rbg_keys():
    """rbg PRNG keys for this module: XLA compiles the per-parameter threefry samplers of an init (and the
    train step's draws) several times slower on CPU (tiny autoencoder init: 77 s -> 16 s here)."""
    old = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "rbg")
    yield
    jax.config.update("jax_default_prng_impl", old)


@pytest.fixture(scope="module")
def ae_dir(tmp_path_factory):
    """A tiny (untrained) KL-f2 stage-1 workdir written as the stage-1 loop writes it: 16×16×1 → 8×8×3."""
    d = str(tmp_path_factory.mktemp("ae"))
    c = autoencoder_config("kl")
    c.model.update(embed_dim=3, z_channels=3, ch=8, ch_mult=(1, 2), num_res_blocks=1, resolution=RES, in_channels=1,
                   norm_groups=4, mid_attn=False)
    c.data.update(name="fashion_mnist", resolution=RES, channels=1, preprocess="pad", random_flip=False)
    variables = jax.jit(build_autoencoder(c.model).init)(jax.random.key(0), jnp.zeros((1, RES, RES, 1)))
    ckpt = Checkpointer(d, async_save=False)
    ckpt.save(1, {"params": {"model": variables["params"]}}, {"config": c.to_dict()}, force=True)
    ckpt.close()
    save_config(c, d)
    return d


def tiny_config(ae_dir: str, ctype: str = "class"):
    c = ldm_config()
    c.first_stage.update(workdir=ae_dir, scale_by_std=True, sample_posterior=False)
    c.data.update(name="fashion_mnist", resolution=RES, channels=1, preprocess="pad", random_flip=False, prefetch=0)
    c.model.unet.update(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1,), num_res_blocks=1,
                        attention_resolutions=(), num_head_channels=32)
    if ctype == "class":
        c.condition.update(type="class", p_uncond=0.2)
        c.model.update(conditioning_key="crossattn", cond_stage="class", n_classes=11, context_dim=32)
    elif ctype == "inpaint":
        c.condition.update(type="inpaint")
        c.model.update(conditioning_key="concat", concat_channels=4)
        c.model.unet.in_channels = 7
    c.train.update(batch_size=BATCH, base_lr=1e-3, scale_lr=False, ema_decay=0.9, warmup_steps=0)
    c.diffusion.update(linear_start=0.0015, linear_end=0.0195)
    return c


@pytest.fixture(scope="module")
def trained(ae_dir):
    """STEPS jitted train steps of a tiny class-conditional model; the first batch sets scale_by_std."""
    cfg = tiny_config(ae_dir)
    fs = W.load_first_stage(ae_dir)
    model, sched, tx = W.build_model(cfg, fs), W.make_schedule(cfg), L.make_optimizer(cfg)
    ds = make_dataset(cfg.data, "train", BATCH, cfg.seed)
    first = ds.batch_at(0)
    scale = L.first_batch_scale(fs, first["image"], None)
    cond0 = {"label": jnp.asarray(first["label"][:1])}
    state0 = jax.jit(lambda k: L.init_state(cfg, model, tx, k, (8, 8, 3), cond0, scale))(jax.random.key(0))
    step = jax.jit(L.make_train_step(cfg, model, fs, tx, sched))
    state, losses, stds = state0, [], []
    for s in range(STEPS):
        b = ds.batch_at(s)
        state, m = step(state, {"image": jnp.asarray(b["image"]), "label": jnp.asarray(b["label"])},
                        fs.variables, None)
        losses.append(float(m["loss"]))
        stds.append(float(m["latent_std"]))
    return dict(cfg=cfg, fs=fs, model=model, sched=sched, state0=state0, state=state, losses=losses, stds=stds,
                first=first, scale=scale, ds=ds)


def test_training_lowers_loss(trained):
    losses = np.asarray(trained["losses"])
    assert np.all(np.isfinite(losses))
    assert losses[-10:].mean() < 0.85 * losses[:10].mean(), losses
    # Same batch, same t and noise: the trained network beats its initialisation.
    model, fs, sched = trained["model"], trained["fs"], trained["sched"]
    b = trained["ds"].batch_at(STEPS + 1)
    z = fs.encode(fs.variables, jnp.asarray(b["image"])) * trained["scale"]
    cond = {"label": jnp.asarray(b["label"])}

    @jax.jit
    def eval_loss(params):
        fn = lambda x, t: model.apply({"params": params}, x, t, cond)  # noqa: E731
        return diffusion_loss(sched, fn, z, jax.random.key(123))[0]

    before, after = float(eval_loss(trained["state0"].params)), float(eval_loss(trained["state"].params))
    assert after < 0.9 * before, (before, after)


def test_scale_by_std_unit_std_on_first_batch(trained):
    fs, first = trained["fs"], trained["first"]
    z = np.asarray(fs.encode(fs.variables, jnp.asarray(first["image"])), np.float64)
    assert trained["scale"] == pytest.approx(1.0 / z.std(), rel=1e-5)
    assert float(trained["state0"].scale_factor) == pytest.approx(trained["scale"], rel=1e-6)
    # The train step's own scaled latents of batch 0 have unit std.
    assert trained["stds"][0] == pytest.approx(1.0, abs=1e-4)
    assert abs(trained["scale"] - 1.0) > 0.05  # the check above is not vacuous


def test_condition_dropout_rate():
    cfg = ldm_config()
    cfg.model.n_classes = 11
    n, draws, p = 1000, 30, 0.15
    labels = jnp.arange(n, dtype=jnp.int32) % 10
    tokens = jnp.tile(jnp.arange(1, 7, dtype=jnp.int32), (n, 1))
    null_tokens = jnp.asarray([101, 102, 0, 0, 0, 0], jnp.int32)
    concat = jnp.ones((n, 2, 2, 1))
    nulls = 0
    for i in range(draws):
        out = L.drop_condition(cfg, {"label": labels, "tokens": tokens, "concat": concat}, null_tokens,
                               jax.random.key(i), p)
        dropped = np.asarray(out["label"]) == 10
        nulls += dropped.sum()
        tok = np.asarray(out["tokens"])
        # A row's text is dropped together with its label (one draw per example), all tokens at once.
        np.testing.assert_array_equal(tok[dropped], np.broadcast_to(null_tokens, tok[dropped].shape))
        np.testing.assert_array_equal(tok[~dropped], np.asarray(tokens)[~dropped])
        np.testing.assert_array_equal(np.asarray(out["label"])[~dropped], np.asarray(labels)[~dropped])
        np.testing.assert_array_equal(np.asarray(out["concat"]), np.asarray(concat))  # spatial: never dropped
    rate, sigma = nulls / (n * draws), np.sqrt(p * (1 - p) / (n * draws))
    assert abs(rate - p) < 4 * sigma, rate
    same = L.drop_condition(cfg, {"label": labels}, None, jax.random.key(0), 0.0)
    np.testing.assert_array_equal(np.asarray(same["label"]), np.asarray(labels))


def test_guidance_scale_one_is_the_conditional_prediction(trained):
    from ldm_jax.diffusion import classifier_free_guidance

    # Through make_sample_fn with a cheap network whose output depends on the condition.
    sched = trained["sched"]
    apply = lambda p, x, t, c: p * x + 0.3 * c["label"][:, None, None, None] - 0.1  # noqa: E731
    cond, uncond = {"label": jnp.asarray([1.0, 2.0])}, {"label": jnp.asarray([5.0, 5.0])}
    shape, key = (2, 4, 4, 1), jax.random.key(3)

    def run(guidance, c=cond, u=uncond):
        fn = make_sample_fn(apply, sched, "ddim", 5, 0.0, guidance)  # validates eagerly: build outside jit
        return np.asarray(jax.jit(lambda p: fn(p, c, u, key, shape))(0.5))

    direct = np.asarray(jax.jit(lambda: ddim_sample(lambda x, t: apply(0.5, x, t, cond), sched, shape, key,
                                                    steps=5))())
    np.testing.assert_allclose(run(1.0), direct, atol=1e-6)
    # The guided 2B-batch path (any scale != 1) at 1 + 1e-7 gives the conditional samples, 0 the unconditional.
    np.testing.assert_allclose(run(1.0 + 1e-7), direct, atol=1e-4)
    np.testing.assert_allclose(run(0.0), run(1.0, uncond), atol=1e-4)
    assert np.abs(run(3.0) - direct).max() > 1e-2

    # The trained network: guided prediction (scale traced) == conditional at 1, unconditional at 0.
    cfg, model, params = trained["cfg"], trained["model"], trained["state"].params
    cond = {"label": jnp.asarray([1, 7], jnp.int32)}
    uncond = conditions.null_condition(cfg, cond, None)
    assert np.all(np.asarray(uncond["label"]) == 10)
    x, t = jax.random.normal(jax.random.key(4), (2, 8, 8, 3)), jnp.asarray([900, 300], jnp.int32)

    @jax.jit
    def preds(params, scale):
        fn = lambda x, t, c: model.apply({"params": params}, x, t, c)  # noqa: E731
        return classifier_free_guidance(fn, cond, uncond, scale)(x, t), fn(x, t, cond), fn(x, t, uncond)

    g1, c1, u1 = map(np.asarray, preds(params, 1.0))
    np.testing.assert_allclose(g1, c1, atol=1e-5)
    np.testing.assert_allclose(np.asarray(preds(params, 0.0)[0]), u1, atol=1e-5)
    np.testing.assert_allclose(np.asarray(preds(params, 3.0)[0]), u1 + 3.0 * (c1 - u1), atol=1e-4)
    assert np.abs(c1 - u1).max() > 1e-4  # the condition matters to the trained network


def test_inpainting_concat_channels_and_mask(ae_dir):
    cfg = tiny_config(ae_dir, "inpaint")
    fs = W.load_first_stage(ae_dir)
    images = jnp.asarray(make_dataset(cfg.data, "test", 4, 0).batch_at(0)["image"])
    out = jax.jit(lambda v, x: conditions.spatial_condition(cfg, fs, v, x, 0.5, jax.random.key(5)))(fs.variables,
                                                                                                    images)
    mask, concat = np.asarray(out["mask"]), np.asarray(out["concat"])
    assert concat.shape == (4, 8, 8, fs.latent_channels + 1)
    frac = mask.mean(axis=(1, 2, 3))
    assert np.all(frac >= 0.25**2 - 1e-6) and np.all(frac <= 0.6**2 + 1e-6)  # one box, 25–60 % of each side
    # 1 = the region to fill: hidden from the encoder; the last channel is the mask at latent size.
    masked = np.asarray(images) * (1 - mask)
    assert np.all(masked[mask == 1] == 0)
    expect = np.asarray(jax.jit(fs.encode)(fs.variables, jnp.asarray(masked))) * 0.5
    np.testing.assert_allclose(concat[..., :-1], expect, atol=1e-5)
    np.testing.assert_array_equal(concat[..., -1], mask[:, 1::2, 1::2, 0])  # nearest, half-pixel centres
    model = W.build_model(cfg, fs)  # unet.in_channels 7 = 3 latent + 3 masked-image latents + 1 mask
    assert model.unet_kwargs["in_channels"] == 2 * fs.latent_channels + 1


def test_inpainting_samples_keep_known_pixels_and_depend_only_on_their_index(ae_dir):
    from ldm_jax.inference import LoadedLDM

    cfg = tiny_config(ae_dir, "inpaint")
    fs = W.load_first_stage(ae_dir)
    model = W.build_model(cfg, fs)
    x, t, c = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32), {"concat": jnp.zeros((1, 8, 8, 4))}
    params = jax.jit(model.init)(jax.random.key(0), x, t, c)["params"]
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)  # non-zero out
    ldm = LoadedLDM(cfg, model, fs, params, 1.3, W.make_schedule(cfg), 0, ae_dir)
    a = ldm.sample([2, 3], steps=2, seed=4)
    b = ldm.sample([3, 2], steps=2, seed=4)
    # Sample i is a function of (seed, i), not of its slot (even with rbg as the default PRNG here).
    np.testing.assert_allclose(a, b[::-1], atol=1e-5)
    images = ldm.conditions(np.asarray([2, 3]))[1]["image"]
    # Sample i's box comes from fold_in(fold_in(key(seed), i), 1): outside it the test image is kept exactly.
    base = jax.random.key(4, impl="threefry2x32")
    masks = np.stack([np.asarray(conditions.random_box_masks(jax.random.fold_in(jax.random.fold_in(base, i), 1),
                                                             1, RES, RES))[0] for i in (2, 3)])
    assert not np.array_equal(masks[0], masks[1])
    np.testing.assert_array_equal(a[masks == 0], images[masks == 0])
    assert np.abs(a - images)[masks == 1].max() > 0.05  # inside: the model's pixels


def test_lowres_latent_mode_and_semantic(ae_dir):
    cfg = tiny_config(ae_dir, "none")
    fs = W.load_first_stage(ae_dir)
    images = jnp.asarray(make_dataset(cfg.data, "test", 2, 0).batch_at(0)["image"])
    cfg.condition.update(type="lowres", sr_factor=2, lowres_mode="latent")
    c = jax.jit(lambda v, x: conditions.spatial_condition(cfg, fs, v, x, 2.0, None)["concat"])(fs.variables, images)
    low = jax.image.resize(images, (2, 8, 8, 1), "linear", antialias=True)
    up = jax.image.resize(low, images.shape, "linear")
    np.testing.assert_allclose(np.asarray(c), 2.0 * np.asarray(jax.jit(fs.encode)(fs.variables, up)), atol=1e-5)
    cfg.condition.lowres_mode = "pixels"
    concat = conditions.spatial_condition(cfg, fs, fs.variables, images, 2.0, None)["concat"]
    np.testing.assert_allclose(np.asarray(concat),
                               np.asarray(low), atol=1e-6)

    # semantic: int ids -> one-hot -> 1 bilinear halving (16 -> 8) -> 1×1 conv to 2 channels, concatenated.
    cfg.condition.type = "semantic"
    cfg.model.update(conditioning_key="concat", concat_in_channels=5, concat_channels=2, concat_rescale_stages=1)
    cfg.model.unet.in_channels = 5
    ids = jax.random.randint(jax.random.key(1), (2, RES, RES), 0, 5)
    seg = conditions.spatial_condition(cfg, fs, fs.variables, images, 1.0, None, segmentation=ids)["concat"]
    np.testing.assert_array_equal(np.asarray(seg), np.eye(5)[np.asarray(ids)])
    model = W.build_model(cfg, fs)
    x, t = jnp.zeros((2, 8, 8, 3)), jnp.zeros((2,), jnp.int32)
    variables = jax.jit(model.init)(jax.random.key(0), x, t, {"concat": seg})
    kernel = np.asarray(variables["params"]["rescaler"]["channel_mapper"]["kernel"])[0, 0]
    got = np.asarray(jax.jit(lambda v, s: model.apply(v, s, method=lambda m, s: m.rescaler(s)))(variables, seg))
    s = np.asarray(seg)
    half = 0.25 * (s[:, ::2, ::2] + s[:, 1::2, ::2] + s[:, ::2, 1::2] + s[:, 1::2, 1::2])  # torch bilinear ×0.5
    np.testing.assert_allclose(got, half @ kernel, atol=1e-5)
    with pytest.raises(ValueError, match="segmentation"):
        conditions.spatial_condition(cfg, fs, fs.variables, images, 1.0, None)


# --- sample.py ---


@pytest.fixture(scope="module")
def ldm_dir(trained, tmp_path_factory):
    """A stage-2 workdir as the train loop leaves it: config.json + an Orbax checkpoint of the LDMState."""
    d = str(tmp_path_factory.mktemp("ldm"))
    ckpt = Checkpointer(d, async_save=False)
    ckpt.save(STEPS, trained["state"], {"config": trained["cfg"].to_dict(), "data": {"step": STEPS}}, force=True)
    ckpt.close()
    save_config(trained["cfg"], d)
    return d


def _sample_module():
    """sample.py (top level, not a package module) imported from its path."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sample.py")
    spec = importlib.util.spec_from_file_location("ldm_sample_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(argv, capsys):
    code = _sample_module().main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("flags,message", [
    (["--sampler", "heun"], "--sampler must be one of ddpm, ddim, plms, dpmpp_2m"),
    (["--guidance", "-1"], "--guidance must be"),
    (["--steps", "0"], "--steps must be in [1, 1000]"),
    (["--steps", "1001"], "--steps must be in [1, 1000]"),
    (["--class_label", "10"], "--class_label must be in [0, 9]"),
    (["--prompt", "a photo of a bag"], "not text-conditioned"),
    (["--size_factor", "0"], "--size_factor"),
    (["--eta", "0.5", "--sampler", "plms"], "--eta must be 0 for the plms sampler"),
])
def test_sample_py_bad_flags_fail_in_one_line_before_loading(ldm_dir, tmp_path, capsys, monkeypatch, flags, message):
    from ldm_jax import inference

    monkeypatch.setattr(inference.LoadedLDM, "load", lambda *a, **k: pytest.fail("loaded despite a bad flag"))
    code, _, err = _run(["--workdir", ldm_dir, "--out", str(tmp_path / "o"), *flags], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "o")


def test_sample_py_defaults_come_from_the_config(ldm_dir, tmp_path, capsys, monkeypatch):
    from ldm_jax import inference

    seen = {}

    class Fake:
        def sample_to_dir(self, out, n, bs, seed, progress, **opts):
            seen.update(opts)
            return {"written": n, "skipped": 0, "samples_per_s": 1.0}

    monkeypatch.setattr(inference.LoadedLDM, "load", lambda *a, **k: Fake())
    sc = W.read_config(ldm_dir).sampling
    code, _, err = _run(["--workdir", ldm_dir, "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    assert (seen["sampler"], seen["steps"], seen["eta"], seen["guidance"]) == (sc.sampler, sc.steps, sc.eta,
                                                                               sc.guidance)
    _run(["--workdir", ldm_dir, "--out", str(tmp_path / "o"), "--eta", "0.25", "--steps", "7"], capsys)
    assert (seen["steps"], seen["eta"], seen["guidance"]) == (7, 0.25, sc.guidance)  # flags win


def test_sample_py_missing_workdir(tmp_path, capsys):
    code, _, err = _run(["--workdir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "no such directory" in err and err.count("\n") == 1


def test_sample_py_resumes_with_identical_files_at_twice_the_size(ldm_dir, tmp_path, capsys):
    out = str(tmp_path / "samples")
    argv = ["--workdir", ldm_dir, "--out", out, "--num_samples", "5", "--batch_size", "2", "--sampler", "ddim",
            "--steps", "3", "--eta", "0.5", "--guidance", "2.0", "--size_factor", "2", "--seed", "7"]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    names = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    assert names == [f"{i:06d}.png" for i in range(5)] + ["grid.png"]
    first = {n: open(os.path.join(out, n), "rb").read() for n in names}
    img = np.asarray(Image.open(os.path.join(out, "000000.png")))
    assert img.shape == (2 * RES, 2 * RES)  # convolutional sampling: 2× latent side → 2× image side
    assert len({first[f"{i:06d}.png"] for i in range(5)}) == 5  # different keys → different samples
    # Interrupted run: two files missing; one kept file made older to prove it is not rewritten.
    os.remove(os.path.join(out, "000001.png"))
    os.remove(os.path.join(out, "000004.png"))
    os.utime(os.path.join(out, "000002.png"), (1, 1))
    code, stdout, err = _run(argv, capsys)
    assert code == 0 and stdout.startswith("2 written, 3 already there"), (stdout, err)
    for n in names:
        assert open(os.path.join(out, n), "rb").read() == first[n], n
    assert os.stat(os.path.join(out, "000002.png")).st_mtime == 1
    # Resuming with other settings would mix two runs in one folder: refused.
    code, _, err = _run([*argv[:-1], "8"], capsys)
    assert code == 2 and "seed=7" in err
    settings = json.load(open(os.path.join(out, "sampling.json")))
    assert settings["guidance"] == 2.0 and settings["size_factor"] == 2 and settings["checkpoint_step"] == STEPS


def test_loaded_model_has_the_ema_weights_and_scale(ldm_dir, trained):
    from ldm_jax.inference import LoadedLDM

    ldm = LoadedLDM.load(ldm_dir)
    assert ldm.step == STEPS and ldm.scale_factor == pytest.approx(trained["scale"], rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), ldm.params, trained["state"].ema_params)
    assert ldm.latent_shape(1) == (8, 8, 3) and ldm.latent_shape(2) == (16, 16, 3)
