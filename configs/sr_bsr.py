"""Stage 2, ×4 super-resolution LDM on VQ-f4 latents (reference bsr_sr; paper ImageNet ×4 FID 2.8): the 64×64
low-res image is concatenated to the 64×64×3 latents (UNet in 6 = 3 + 3), UNet ch 160, mult 1,2,2,4, attention
at ds 8 (the reference lists 16, 8; 16 is never reached) with 32-channel heads, schedule 0.0015 → 0.0155, L2,
base lr 1e-6, batch 64.

Degradation: an antialiased bilinear ×1/4 (the reference's "bsrgan_light" degradation pipeline is not ported).
python train.py --config configs/sr_bsr.py --workdir runs/sr --config.data.path=/data/openimages/{split}
"""

from ldm_jax.config_defaults import ldm_config


def get_config():
    c = ldm_config()
    c.first_stage.update(workdir="runs/vq_f4", scale_factor=1.0, scale_by_std=False)
    c.condition.update(type="lowres", sr_factor=4, lowres_mode="pixels")
    c.model.update(conditioning_key="concat", cond_stage="none", concat_channels=3, latent_channels=3)
    c.model.unet.update(in_channels=6, out_channels=3, model_channels=160, channel_mult=(1, 2, 2, 4),
                        num_res_blocks=2, attention_resolutions=(8,), num_heads=-1, num_head_channels=32)
    c.diffusion.update(schedule="linear", num_timesteps=1000, linear_start=0.0015, linear_end=0.0155,
                       loss_type="l2")
    c.train.update(batch_size=64, base_lr=1e-6, scale_lr=True, ema_decay=0.9999)
    c.data.update(name="folder", path="data/openimages/{split}", resolution=256, channels=3,
                  preprocess="random_crop", random_flip=False)
    c.sampling.update(sampler="ddim", steps=100, eta=1.0, guidance=1.0)
    return c
