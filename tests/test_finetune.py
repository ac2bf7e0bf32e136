"""Fine-tuning a converted Stable Diffusion (`config.init_from`): the first step's loss equals diffusers' PyTorch
training objective (eps and v), the VAE and CLIP text encoder stay frozen bit for bit while the UNet and its EMA
move, and train.py → sample.py work end to end on the fine-tuned workdir.

The tiny SD is random diffusers/transformers modules saved with save_pretrained and converted with our CLI.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="fine-tuning parity needs PyTorch")
diffusers = pytest.importorskip("diffusers", reason="fine-tuning parity needs diffusers")
transformers = pytest.importorskip("transformers")

from PIL import Image  # noqa: E402
from test_parity import CTX, VOCAB, randomize, write_tokenizer  # noqa: E402

PROMPTS = ["hi", "hi hi", "a hi", "ih"]


def _save_sd(root: str, prediction_type: str) -> dict:
    vae = randomize(diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16), 0)
    # Two levels, one ResBlock each: the smallest UNet with both block kinds (compiles fast; the parity tests in
    # test_parity.py cover the full SD layout).
    unet = randomize(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CTX, attention_head_dim=8, norm_num_groups=32), 5)
    cfg = transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=CTX, intermediate_size=2 * CTX,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                      bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)
    clip = randomize(transformers.CLIPTextModel(cfg), 7)
    sched = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    prediction_type=prediction_type)
    vae.save_pretrained(os.path.join(root, "vae"))
    unet.save_pretrained(os.path.join(root, "unet"))
    clip.save_pretrained(os.path.join(root, "text_encoder"))
    write_tokenizer(os.path.join(root, "tokenizer"))
    sched.save_pretrained(os.path.join(root, "scheduler"))
    index = {"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"],
             "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"]}
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump(index, f)
    return {"vae": vae, "unet": unet, "clip": clip, "sched": sched}


def _captioned_folder(root: str, n: int = 8) -> str:
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(os.path.join(root, f"{i}.png"))
        with open(os.path.join(root, f"{i}.txt"), "w") as f:
            f.write(PROMPTS[i % len(PROMPTS)])
    return root


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def converted(request, tmp_path_factory):
    from ldm_jax.convert.__main__ import main

    root = tmp_path_factory.mktemp("sd_" + request.param)
    torch_models = _save_sd(str(root / "sd"), request.param)
    assert main([str(root / "sd"), "--out", str(root / "out"), "--trainable"]) == 0
    return str(root / "out" / "ldm"), torch_models, _captioned_folder(str(root / "images"))


def _finetune_config(init_from: str, data: str, **train):
    from configs.finetune_sd import get_config

    c = get_config()
    c.init_from = init_from
    c.model.update(dtype="float32")
    c.model.unet.update(remat_policy="")
    c.data.update(path=data, resolution=16, preprocess="resize", random_flip=False, prefetch=0)
    c.train.update(batch_size=8, num_steps=8, base_lr=1e-3, log_every=4, ckpt_every=8, async_checkpoint=False,
                   **train)
    c.condition.p_uncond = 0.0
    c.first_stage.sample_posterior = False  # the posterior mean, so diffusers' side needs no shared randomness
    c.sampling.update(sampler="ddim", steps=2, grid_per_class=1)
    return c


def test_first_step_loss_matches_diffusers_and_freezing(converted):
    from ldm_jax import workdir as W
    from ldm_jax.data.pipeline import make_dataset
    from ldm_jax.data.text import NULL_TEXT, TextEncoder, load_tokenizer, tokenize
    from ldm_jax.training import ldm as L
    from ldm_jax.training.init_from import apply_init_from, load_init_weights

    ldm_dir, tm, images = converted
    cfg = apply_init_from(_finetune_config(ldm_dir, images))
    assert cfg.condition.tokenizer == "clip" and cfg.first_stage.scale_factor == pytest.approx(0.18215)
    want = "v" if tm["sched"].config.prediction_type == "v_prediction" else "eps"
    assert cfg.diffusion.parameterization == want and cfg.condition.p_uncond == 0.0  # the run's, not the source's
    fs = W.load_first_stage(cfg.first_stage.workdir)
    model, sched, tx = W.build_model(cfg, fs), W.make_schedule(cfg), L.make_optimizer(cfg)
    raw, ema, scale = load_init_weights(ldm_dir)
    state = L.LDMState(step=jnp.zeros((), jnp.int32), params=raw, ema_params=ema, opt_state=tx.init(raw),
                       scale_factor=jnp.float32(scale), skipped=jnp.zeros((), jnp.int32))
    tok = load_tokenizer("clip", cfg.condition.vocab_path)
    b = make_dataset(cfg.data, "train", 4, cfg.seed, text_fn=TextEncoder(tok, 77)).batch_at(0)
    batch = {"image": jnp.asarray(b["image"]), "tokens": jnp.asarray(b["tokens"])}
    step = jax.jit(L.make_train_step(cfg, model, fs, tx, sched))
    new, metrics = step(state, batch, fs.variables, jnp.asarray(tokenize(tok, [NULL_TEXT], 77)[0]))

    # The step's timesteps and noise, from its keys (diffusion_loss documents the split).
    key = jax.random.fold_in(jax.random.key(cfg.seed + 1), 0)
    k_loss = jax.random.split(key, 5)[3]
    t_key, noise_key = jax.random.split(k_loss)
    t = np.asarray(jax.random.randint(t_key, (4,), 0, 1000, dtype=jnp.int32))
    z_shape = (4, 8, 8, 4)
    noise = np.asarray(jax.random.normal(noise_key, z_shape, jnp.float32))
    with torch.no_grad():
        x = torch.from_numpy(np.transpose(b["image"], (0, 3, 1, 2)).copy())
        latents = tm["vae"].encode(x).latent_dist.mean * 0.18215
        n = torch.from_numpy(np.transpose(noise, (0, 3, 1, 2)).copy())
        tt = torch.from_numpy(t.astype(np.int64))
        noisy = tm["sched"].add_noise(latents, n, tt)
        target = n if want == "eps" else tm["sched"].get_velocity(latents, n, tt)
        ctx = tm["clip"](torch.from_numpy(b["tokens"].astype(np.int64)))[0]
        pred = tm["unet"](noisy, tt, encoder_hidden_states=ctx).sample
        ref = float(torch.nn.functional.mse_loss(pred, target))
    assert float(metrics["loss"]) == pytest.approx(ref, rel=1e-4)
    assert float(metrics["finite"]) == 1.0

    # Frozen: the text encoder (raw and EMA) bit for bit; the UNet and its EMA move.
    same = lambda a, b: all(jax.tree.leaves(jax.tree.map(lambda u, v: bool(np.array_equal(u, v)), a, b)))  # noqa
    assert same(new.params["cond_encoder"], raw["cond_encoder"])
    assert same(new.ema_params["cond_encoder"], ema["cond_encoder"])
    assert not same(new.params["unet"], raw["unet"]) and not same(new.ema_params["unet"], ema["unet"])


def test_finetune_end_to_end(converted, tmp_path):
    """train.py with init_from: a new run from the converted weights; the loss on a fixed batch falls; the VAE and
    text encoder are unchanged; sample.py --prompt works on the result; the run resumes."""
    from ldm_jax import workdir as W
    from ldm_jax.checkpoint import Checkpointer
    from ldm_jax.inference import LoadedLDM
    from ldm_jax.training.init_from import load_init_weights
    from ldm_jax.training.train_ldm import train_and_evaluate
    from ldm_jax.workdir import restore_ema
    from sample import main as sample_main

    ldm_dir, tm, images = converted
    if tm["sched"].config.prediction_type != "epsilon":
        pytest.skip("the end-to-end run is checked once (eps); the objective parity covers v")
    cfg = _finetune_config(ldm_dir, images)
    workdir = str(tmp_path / "ft")
    train_and_evaluate(cfg, workdir)
    metrics = json.load(open(os.path.join(workdir, "metrics.json")))
    assert np.isfinite(metrics["final_loss"])
    ckpt = Checkpointer(workdir, async_save=False)
    assert ckpt.latest_step() == 8
    state, _ = ckpt.restore_raw()
    ckpt.close()
    raw0, ema0, _ = load_init_weights(ldm_dir)
    np.testing.assert_equal(jax.tree.map(np.asarray, state["params"]["cond_encoder"]), raw0["cond_encoder"])
    fs_before = W.load_first_stage(os.path.join(os.path.dirname(ldm_dir), "autoencoder")).variables
    fs_after = W.load_first_stage(json.load(open(os.path.join(workdir, "config.json")))["first_stage"]["workdir"])
    jax.tree.map(np.testing.assert_array_equal, fs_before, fs_after.variables)

    # The loss on one fixed batch, timesteps and noise: lower with the fine-tuned raw weights than before.
    loaded = LoadedLDM.load(workdir)
    tokens = loaded.tokens(PROMPTS)
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.normal(size=(4, 4, 4, 4)).astype(np.float32))
    t = jnp.asarray([100, 400, 700, 900])
    noise = jnp.asarray(rng.normal(size=(4, 4, 4, 4)).astype(np.float32))

    @jax.jit  # one compile for both weight sets (eager dispatch of the UNet op by op is slow)
    def loss(params):
        from ldm_jax.diffusion.gaussian import q_sample

        x_t = q_sample(loaded.sched, x0, t, noise)
        return jnp.mean((loaded.model.apply({"params": params}, x_t, t, {"tokens": tokens}) - noise) ** 2)

    assert float(loss(jax.tree.map(jnp.asarray, state["params"]))) < float(loss(jax.tree.map(jnp.asarray, raw0)))
    ema_now, _, step = restore_ema(workdir)
    assert step == 8
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ema_now["unet"]),
                                                      jax.tree.leaves(ema0["unet"]), strict=True)]
    assert all(moved)  # every UNet leaf's EMA moved
    np.testing.assert_equal(ema_now["cond_encoder"], ema0["cond_encoder"])
    out = str(tmp_path / "samples")
    assert sample_main(["--workdir", workdir, "--prompt", "hi", "--num_samples", "2", "--batch_size", "2",
                        "--steps", "2", "--out", out]) == 0
    assert os.path.isfile(os.path.join(out, "000001.png"))
