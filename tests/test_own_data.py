"""Training on your own folder through the real entry points: a 3-class RGB folder with captions. The end-of-run grid
follows the class count / the captions, mismatched model fields fail in one line, eval.py reports "no feature
extractor" instead of training a Fashion-MNIST classifier, and sample.py's --init_noise and --init_image (img2img)
work on the trained text model."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ldm_jax.checkpoint import Checkpointer
from ldm_jax.config_defaults import autoencoder_config, ldm_config
from ldm_jax.models.autoencoder import build_autoencoder
from ldm_jax.workdir import save_config

RES, CLASSES = 16, ("apple", "boat", "cloud")


@pytest.fixture(scope="module", autouse=True)
def rbg_keys():
    old = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "rbg")  # faster CPU compiles of init and step draws
    yield
    jax.config.update("jax_default_prng_impl", old)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 3)):
        for k, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                img = np.clip(rng.normal(60 + 70 * k, 20, (20, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
                (d / f"{i}.txt").write_text(f"a picture of a {name}\nthe {name} number {i % 3}\n")
    return str(root / "{split}")


@pytest.fixture(scope="module")
def ae_dir(tmp_path_factory):
    """A tiny (untrained) RGB KL-f2 stage-1 workdir: 16×16×3 → 8×8×3."""
    d = str(tmp_path_factory.mktemp("ae"))
    c = autoencoder_config("kl")
    c.model.update(embed_dim=3, z_channels=3, ch=8, ch_mult=(1, 2), num_res_blocks=1, resolution=RES, in_channels=3,
                   norm_groups=4, mid_attn=False)
    variables = jax.jit(build_autoencoder(c.model).init)(jax.random.key(0), jnp.zeros((1, RES, RES, 3)))
    ckpt = Checkpointer(d, async_save=False)
    ckpt.save(1, {"params": {"model": variables["params"]}}, {"config": c.to_dict()}, force=True)
    ckpt.close()
    save_config(c, d)
    return d


def _config(ae_dir, folder, ctype):
    c = ldm_config()
    c.first_stage.update(workdir=ae_dir, scale_by_std=False, scale_factor=1.0, sample_posterior=False)
    c.data.update(name="folder", path=folder, resolution=RES, channels=3, preprocess="resize", random_flip=False,
                  prefetch=0)
    c.model.unet.update(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1,), num_res_blocks=1,
                        attention_resolutions=(1,), num_head_channels=32)
    if ctype == "class":
        c.condition.update(type="class", p_uncond=0.2)
        c.model.update(conditioning_key="crossattn", cond_stage="class", n_classes=len(CLASSES) + 1, context_dim=16)
    else:
        c.condition.update(type="text", p_uncond=0.2, vocab_size=60)
        c.model.update(conditioning_key="crossattn", cond_stage="text", context_dim=16, text_max_len=12)
    c.train.update(batch_size=8, num_steps=2, base_lr=1e-3, scale_lr=False, log_every=1, ckpt_every=2,
                   async_checkpoint=False)
    c.sampling.update(sampler="ddim", steps=2, guidance=2.0, grid_per_class=2)
    return c


def _rows(path: str, tile: int) -> int:
    h = np.asarray(Image.open(path)).shape[0]
    return round(h / (tile + 2))  # make_grid: 2-px borders


@pytest.fixture(scope="module")
def class_run(ae_dir, folder, tmp_path_factory):
    from ldm_jax.training.train_ldm import train_and_evaluate

    workdir = str(tmp_path_factory.mktemp("class_run"))
    train_and_evaluate(_config(ae_dir, folder, "class"), workdir)
    return workdir


def test_class_grid_follows_the_folder(class_run, ae_dir, folder, tmp_path):
    from ldm_jax.training.train_ldm import train_and_evaluate

    metrics = json.load(open(os.path.join(class_run, "metrics.json")))
    assert metrics["grid_samples"] == len(CLASSES) * 2 and "grid_conditional_accuracy" not in metrics
    assert _rows(os.path.join(class_run, "samples.png"), RES) == len(CLASSES)
    bad = _config(ae_dir, folder, "class")
    bad.model.n_classes = 3
    with pytest.raises(ValueError, match=r"model.n_classes=3 but the data has 3 classes: set model.n_classes=4"):
        train_and_evaluate(bad, str(tmp_path / "bad"))
    gray = _config(ae_dir, folder, "class")
    gray.data.channels = 1
    with pytest.raises(ValueError, match="data.channels=1 but the stage-1 model"):
        train_and_evaluate(gray, str(tmp_path / "gray"))


def test_eval_has_no_feature_extractor_for_rgb(class_run, tmp_path, monkeypatch):
    from ldm_jax.evaluate_workdir import evaluate_workdir

    judge = tmp_path / "never_trained.npz"
    monkeypatch.setenv("LDM_JAX_CLASSIFIER", str(judge))
    out = evaluate_workdir(class_run, num_samples=6, batch_size=6, num_real=6, steps=2)
    assert out["fd_fmnist"] is None and "no feature extractor for this data" in out["unavailable"]["fd_fmnist"]
    assert "conditional_accuracy" in out["unavailable"] and not judge.exists()


@pytest.fixture(scope="module")
def text_run(ae_dir, folder, tmp_path_factory):
    from ldm_jax.training.train_ldm import train_and_evaluate

    workdir = str(tmp_path_factory.mktemp("text_run"))
    train_and_evaluate(_config(ae_dir, folder, "text"), workdir)
    return workdir


def test_text_run_on_captions(text_run):
    cfg = json.load(open(os.path.join(text_run, "config.json")))
    assert cfg["sampling"]["prompts"][:2] == ["a picture of a apple", "the apple number 0"]
    metrics = json.load(open(os.path.join(text_run, "metrics.json")))
    assert metrics["caption_missing"] == 0 and metrics["caption_truncated"] == 0
    assert _rows(os.path.join(text_run, "samples.png"), RES) == len(cfg["sampling"]["prompts"])
    from ldm_jax.data.text import load_tokenizer

    tok = load_tokenizer("bert", os.path.join(text_run, "tokenizer"))  # WordPiece trained on the folder's captions
    ids = tok(["a picture of a boat", "the cloud number 2"])["input_ids"]
    assert tok.unk_token_id not in ids[0] + ids[1] and len(tok) <= 60


def test_init_noise_and_img2img(text_run, folder, tmp_path, capsys):
    from ldm_jax.inference import LoadedLDM
    from sample import main as sample_main

    ldm = LoadedLDM.load(text_run)
    noise = np.random.default_rng(3).normal(size=(2, *ldm.latent_shape())).astype(np.float32)
    a = ldm.sample([0, 1], steps=2, prompts=["a boat"], x_T=noise, seed=1)
    b = ldm.sample([0, 1], steps=2, prompts=["a boat"], x_T=noise, seed=2)
    np.testing.assert_allclose(a, b, atol=1e-6)  # DDIM eta 0: the image is a function of the given noise
    assert not np.allclose(a, ldm.sample([0, 1], steps=2, prompts=["a boat"], x_T=-noise, seed=1), atol=1e-3)

    # img2img at a small strength on an (almost) untrained model, whose zero-initialised output layer predicts
    # eps ≈ 0: DDIM then rescales the noised latent back, so the result is ≈ the autoencoder's reconstruction.
    from ldm_jax.data.images import load_images

    init = load_images(folder.replace("{split}", "test"), RES, RES, 3)[:2]
    out = ldm.sample([0, 1], steps=50, prompts=["a boat"], init_images=init, strength=0.02, seed=0)
    fs = ldm.first_stage
    rec = np.clip(np.asarray(fs.decode(fs.variables, fs.encode(fs.variables, jnp.asarray(init)))), -1, 1)
    near_err = np.abs(out - rec).mean()
    far = ldm.sample([0, 1], steps=50, prompts=["a boat"], init_images=init, strength=1.0, seed=0)
    far_err = np.abs(far - rec).mean()
    assert near_err < 0.2 * np.abs(rec).mean() and far_err > 3 * near_err, (near_err, far_err)

    np.save(tmp_path / "noise.npy", noise)
    args = ["--workdir", text_run, "--prompt", "a boat", "--num_samples", "2", "--batch_size", "2", "--steps", "2"]
    assert sample_main(args + ["--init_noise", str(tmp_path / "noise.npy"), "--out", str(tmp_path / "n")]) == 0
    got = np.stack([np.asarray(Image.open(tmp_path / "n" / f"00000{i}.png")) for i in range(2)])
    np.testing.assert_allclose(got.astype(float), np.rint((a + 1) * 127.5).clip(0, 255), atol=1)
    assert sample_main(args + ["--init_image", folder.replace("{split}", "test"), "--strength", "0.5",
                               "--out", str(tmp_path / "i")]) == 0
    assert (tmp_path / "i" / "000001.png").exists()
    assert sample_main(args + ["--init_image", str(tmp_path / "nope.png"), "--out", str(tmp_path / "x")]) == 2
    assert "--init_image: no such file or folder" in capsys.readouterr().err
    assert sample_main(args + ["--init_noise", str(tmp_path / "noise.npy"), "--num_samples", "3",
                               "--out", str(tmp_path / "y")]) == 2
    assert "--init_noise holds 2 starting noises for 3 samples" in capsys.readouterr().err


def test_init_from_our_own_text_run(text_run, ae_dir, folder, tmp_path):
    """init_from works for our own stage-2 workdirs: the new run takes the source's model, tokenizer and weights
    and starts at step 0 (its first EMA is 0.1 × source EMA + 0.9 × the first update, the warm-up decay)."""
    from ldm_jax.training.init_from import load_init_weights
    from ldm_jax.training.train_ldm import train_and_evaluate
    from ldm_jax.workdir import restore_ema

    cfg = _config(ae_dir, folder, "class")  # the run's own model fields are replaced by the source's
    cfg.init_from = text_run
    cfg.train.update(num_steps=1, base_lr=1e-9, ckpt_every=1)
    workdir = str(tmp_path / "ft")
    train_and_evaluate(cfg, workdir)
    saved = json.load(open(os.path.join(workdir, "config.json")))
    source = json.load(open(os.path.join(text_run, "config.json")))
    assert saved["model"]["cond_stage"] == "text" and saved["condition"]["type"] == "text"
    assert {k: v for k, v in saved["model"].items() if k != "train_text_encoder"} == \
        {k: v for k, v in source["model"].items() if k != "train_text_encoder"}
    assert saved["condition"]["vocab_path"] == os.path.join(text_run, "tokenizer")
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1"]  # a new run: step 0 -> 1
    src_raw, src_ema, _ = load_init_weights(text_run)
    new_ema, _, _ = restore_ema(workdir)
    # lr 1e-9: the update is negligible, so the first EMA is 0.1 × the source's EMA + 0.9 × its raw weights.
    jax.tree.map(lambda n, e, r: np.testing.assert_allclose(n, 0.1 * e + 0.9 * r, atol=1e-5), new_ema, src_ema,
                 src_raw)
