"""Defaults shared by the config files in configs/ (each file sets the paper's numbers on top of these)."""

from __future__ import annotations

import ml_collections

from ldm_jax.data.pipeline import default_data_config


def base_config(stage: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = stage  # which train loop train.py runs: "autoencoder" or "ldm"
    c.seed = 0
    c.data = default_data_config()
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, min_shard_size=2**16))
    c.distributed = ml_collections.ConfigDict(
        dict(enabled=False, coordinator_address="", num_processes=1, process_id=0)
    )
    c.train = ml_collections.ConfigDict(dict(
        batch_size=32, num_steps=1000, base_lr=4.5e-6, scale_lr=True, grad_accum=1,
        log_every=50, ckpt_every=1000, grid_every=0, max_to_keep=3, keep_every=0, async_checkpoint=True,
        max_nonfinite_steps=20,
        preemption_sync_every=10,  # multi-process: steps between SIGTERM agreements (each is a host sync)
        allow_resume_changes=False,  # resume even if batch size, lr scaling, data or seed differ from the ckpt
    ))
    c.eval = ml_collections.ConfigDict(dict(split="test", num_examples=1000, batch_size=100))
    return c


def autoencoder_config(type_: str = "kl") -> ml_collections.ConfigDict:
    """Stage 1: the reference first-stage defaults (ch 128, 2 res blocks, LPIPS 1.0, hinge PatchGAN)."""
    c = base_config("autoencoder")
    c.model = ml_collections.ConfigDict(dict(
        type=type_, embed_dim=4, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_resolutions=(),
        resolution=256, in_channels=3, z_channels=4, mid_attn=True, dropout=0.0, dtype="float32", norm_groups=32,
    ))
    if type_ == "vq":
        c.model.update(n_embed=16384, beta=0.25, legacy_beta=False, ema_decay=None, dead_code_threshold=0.0)
        c.model.z_channels = c.model.embed_dim
    c.loss = ml_collections.ConfigDict(dict(
        perceptual_weight=1.0, lpips_path="", kl_weight=1e-6, logvar_init=0.0, codebook_weight=1.0,
        disc_start=50001, disc_weight=0.5 if type_ == "kl" else 0.8, disc_factor=1.0, disc_loss="hinge",
        disc_n_layers=3, disc_ndf=64, disc_norm="batch", disc_lr_mult=1.0,
    ))
    c.data.update(name="folder", resolution=256, channels=3, preprocess="random_crop", random_flip=True)
    c.train.update(batch_size=12, num_steps=500_000, base_lr=4.5e-6, ckpt_every=5000, grid_every=5000)
    return c


def ldm_config() -> ml_collections.ConfigDict:
    """Stage 2: latent diffusion on a frozen first stage (reference defaults; configs set the paper's numbers)."""
    from ml_collections import config_dict

    c = base_config("ldm")
    c.init_from = ""  # a stage-2 workdir to fine-tune: a new run from its weights (training/init_from.py)
    c.first_stage = ml_collections.ConfigDict(dict(
        workdir="", scale_factor=1.0, scale_by_std=False, sample_posterior=True,
    ))
    c.condition = ml_collections.ConfigDict(dict(
        type="none",  # none | class | text | lowres | inpaint | semantic
        p_uncond=0.0,  # classifier-free guidance: condition dropout probability in training
        sr_factor=4,  # lowres: downsampling factor of the low-resolution condition
        lowres_mode="pixels",  # lowres: concat the pixels | the stage-1 latents of their upsampled copy
        tokenizer="bert",  # text: bert (WordPiece) | clip (BPE, as the converted SD models)
        vocab_path="",  # text: BERT vocab.txt or tokenizer dir ('' = train WordPiece on the captions)
        vocab_size=200,
    ))
    c.model = ml_collections.ConfigDict(dict(
        conditioning_key=config_dict.placeholder(str),  # crossattn | concat | hybrid | adm | None
        cond_stage="none", n_classes=0, context_dim=512, vocab_size=0, text_layers=1, text_max_len=77,
        train_text_encoder=True,  # text/clip τθ trained with the UNet (False: frozen, as SD fine-tuning)
        concat_channels=0, concat_rescale_stages=0, concat_in_channels=0, latent_channels=0, dtype="float32",
        unet=ml_collections.ConfigDict(dict(
            in_channels=3, out_channels=3, model_channels=224, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
            attention_resolutions=(8, 4, 2), num_heads=-1, num_head_channels=32, use_scale_shift_norm=False,
            resblock_updown=False, transformer_depth=1, dropout=0.0, remat_policy="", attention_impl="",
        )),
    ))
    c.diffusion = ml_collections.ConfigDict(dict(
        schedule="linear", num_timesteps=1000, linear_start=0.0015, linear_end=0.0195, cosine_s=8e-3,
        parameterization="eps", loss_type="l2",
        snr_gamma=0.0,  # min-SNR-gamma loss weighting (Hang et al. 2023; 5 in the paper); 0 = off
        zero_terminal_snr=False,  # rescale betas to zero terminal SNR (Lin et al. 2024); needs v or x0
        offset_noise=0.0,  # noise += c * N(0, 1) per channel (c ~ 0.1); 0 = off
    ))
    # sampler: ddpm | ddim | plms | dpmpp_2m | dpmpp_2m_sde | euler | euler_a | unipc; spacing '' = the sampler's
    # default (ddim/plms: the reference's 'uniform'; the solvers: diffusers' 'linspace').
    # prompts: text models' grid rows and sample.py's default prompts (() = the data set's own, set by train.py);
    # pair_eval_samples: fashion_mnist_pairs runs judge this many samples per ordered pair at the end.
    c.sampling = ml_collections.ConfigDict(dict(sampler="ddim", steps=50, eta=0.0, guidance=1.0, grid_per_class=8,
                                                spacing="", karras=False, order=2, guidance_rescale=0.0,
                                                prompts=(), pair_eval_samples=10))
    c.train.update(batch_size=48, base_lr=2e-6, ema_decay=0.9999, warmup_steps=0, weight_decay=0.01,
                   grad_clip=0.0, num_steps=500_000, ckpt_every=5000)  # grad_clip 0: none, as the reference
    c.data.update(name="folder", resolution=256, channels=3, preprocess="resize", random_flip=True)
    return c


def _overlay(base: dict, saved: dict) -> dict:
    out = dict(base)
    for k, v in saved.items():
        out[k] = _overlay(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def load_saved_config(path: str) -> ml_collections.ConfigDict:
    """A workdir's config.json on top of the defaults of its stage, so that code reads every field by attribute
    even from a config.json written before the field existed (the one place that fills such gaps). Raises
    ValueError for a file that is not a run config."""
    import json

    with open(path) as f:
        saved = json.load(f)
    stage = saved.get("stage") if isinstance(saved, dict) else None
    if stage == "autoencoder":
        base = autoencoder_config(saved.get("model", {}).get("type", "kl"))
    elif stage == "ldm":
        base = ldm_config()
    else:
        return ml_collections.ConfigDict(saved if isinstance(saved, dict) else {})
    return ml_collections.ConfigDict(_overlay(base.to_dict(), saved))
