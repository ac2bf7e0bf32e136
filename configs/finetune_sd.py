"""Fine-tune a converted Stable Diffusion (v1 or v2, eps or v-prediction) on your own captioned images.

    python -m ldm_jax.convert /path/to/stable-diffusion --out sd --trainable
    python train.py --config configs/finetune_sd.py --workdir runs/sd_ft --config.init_from=sd/ldm \
        --config.data.path=/path/to/captioned_folder

A new run (step 0, fresh AdamW) from the converted weights: architecture, schedule, parameterisation, scale factor,
VAE, CLIP tokenizer and text tower come from `init_from` (training/init_from.py); the VAE and the text encoder stay
frozen (model.train_text_encoder=True trains the text tower too); the UNet trains. Captions: NAME.txt beside each
image or a metadata.jsonl/.csv (docs/data.md). Numbers: the usual SD fine-tuning recipe (diffusers'
train_text_to_image.py): lr 1e-5 constant, no lr scaling, EMA 0.9999, 10% caption dropout, random flips, 512²
(768² for SD 2.x 768-v: --config.data.resolution=768). bfloat16 compute and remat keep a UNet of 860M parameters
within one 80 GB GPU at batch 8 per device.
"""

from ldm_jax.config_defaults import ldm_config


def get_config():
    c = ldm_config()
    c.init_from = ""  # required: OUT/ldm of python -m ldm_jax.convert (or a stage-2 workdir of ours)
    c.condition.update(p_uncond=0.1)
    c.model.update(dtype="bfloat16", train_text_encoder=False)
    c.model.unet.update(remat_policy="nothing_saveable", dropout=0.0)
    c.data.update(name="folder", path="", resolution=512, channels=3, preprocess="random_crop", random_flip=True)
    c.train.update(batch_size=8, num_steps=15_000, base_lr=1e-5, scale_lr=False, warmup_steps=0, ema_decay=0.9999,
                   weight_decay=1e-2, log_every=50, ckpt_every=1000)
    c.sampling.update(sampler="dpmpp_2m", steps=25, guidance=7.5, grid_per_class=4)
    return c
