"""Stage 2, CelebA-HQ 256 LDM-VQ-4 (unconditional; paper FID 5.11): UNet ch 224, mult 1,2,3,4, attention at
ds 8,4,2 with 32-channel heads, on 64×64×3 VQ-f4 latents (configs/vq_f4.py), batch 48, base lr 2e-6 (× batch).

python train.py --config configs/ldm_f4.py --workdir runs/ldm_f4 --config.data.path=/data/celebahq/{split}
"""

from ldm_jax.config_defaults import ldm_config


def get_config():
    c = ldm_config()
    c.first_stage.update(workdir="runs/vq_f4", scale_factor=1.0, scale_by_std=False)  # VQ: no rescaling
    c.condition.update(type="none")
    c.model.update(conditioning_key=None, cond_stage="none", latent_channels=3)
    c.model.unet.update(in_channels=3, out_channels=3, model_channels=224, channel_mult=(1, 2, 3, 4),
                        num_res_blocks=2, attention_resolutions=(8, 4, 2), num_heads=-1, num_head_channels=32)
    c.diffusion.update(schedule="linear", num_timesteps=1000, linear_start=0.0015, linear_end=0.0195,
                       loss_type="l2")
    c.train.update(batch_size=48, base_lr=2e-6, scale_lr=True, ema_decay=0.9999)
    c.data.update(name="folder", path="data/celebahq/{split}", resolution=256, channels=3, preprocess="resize",
                  random_flip=False)
    c.sampling.update(sampler="ddim", steps=500, eta=0.0, guidance=1.0)  # the paper's 500 DDIM steps
    return c
