"""Stage 2, inpainting LDM on VQ-f4 latents without attention (reference inpainting_big): concat of the noisy
latent (3) + the masked image's latents (3) + the mask at latent size (1) = 7 input channels, UNet ch 256, mult
1,2,3,4, attention at ds 8,4,2 with 8 heads, resblock up/down, L1, schedule 0.0015 → 0.0205, base lr 1e-6.

Masks: one random box per image (the reference trains on LaMa-style large masks, not ported).
python train.py --config configs/inpainting.py --workdir runs/inpaint --config.data.path=/data/places/{split}
"""

from ldm_jax.config_defaults import ldm_config


def get_config():
    c = ldm_config()
    # The reference first stage is VQ-f4 with attention switched off: train it with configs/vq_f4.py and
    # --config.model.mid_attn=False.
    c.first_stage.update(workdir="runs/vq_f4_noattn", scale_factor=1.0, scale_by_std=False)
    c.condition.update(type="inpaint")
    c.model.update(conditioning_key="concat", cond_stage="none", concat_channels=4, latent_channels=3)
    c.model.unet.update(in_channels=7, out_channels=3, model_channels=256, channel_mult=(1, 2, 3, 4),
                        num_res_blocks=2, attention_resolutions=(8, 4, 2), num_heads=8, num_head_channels=-1,
                        resblock_updown=True)
    c.diffusion.update(schedule="linear", num_timesteps=1000, linear_start=0.0015, linear_end=0.0205,
                       loss_type="l1")
    c.train.update(batch_size=48, base_lr=1e-6, scale_lr=True, ema_decay=0.9999)
    c.data.update(name="folder", path="data/places/{split}", resolution=256, channels=3, preprocess="resize",
                  random_flip=False)
    c.sampling.update(sampler="ddim", steps=50, eta=0.0, guidance=1.0)
    return c
