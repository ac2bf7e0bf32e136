"""Stage 2, LSUN-churches 256 LDM-KL-8 (unconditional; paper FID 4.02): UNet ch 192, mult 1,2,2,4,4, attention
at ds 1,2,4,8 with 8 heads, scale-shift norm and resblock up/down, on 32×32×4 KL-f8 latents rescaled by
1/std of the first batch (scale_by_std), L1 loss, batch 96, lr 5e-5 (not scaled by batch), 10k warm-up steps.

python train.py --config configs/ldm_kl8.py --workdir runs/ldm_kl8 --config.data.path=/data/churches/{split}
"""

from ldm_jax.config_defaults import ldm_config


def get_config():
    c = ldm_config()
    c.first_stage.update(workdir="runs/kl_f8", scale_by_std=True)
    c.condition.update(type="none")
    c.model.update(conditioning_key=None, cond_stage="none", latent_channels=4)
    c.model.unet.update(in_channels=4, out_channels=4, model_channels=192, channel_mult=(1, 2, 2, 4, 4),
                        num_res_blocks=2, attention_resolutions=(1, 2, 4, 8), num_heads=8, num_head_channels=-1,
                        use_scale_shift_norm=True, resblock_updown=True)
    c.diffusion.update(schedule="linear", num_timesteps=1000, linear_start=0.0015, linear_end=0.0155,
                       loss_type="l1")
    c.train.update(batch_size=96, base_lr=5e-5, scale_lr=False, warmup_steps=10_000, ema_decay=0.9999)
    c.data.update(name="folder", path="data/churches/{split}", resolution=256, channels=3, preprocess="resize",
                  random_flip=False)
    c.sampling.update(sampler="ddim", steps=200, eta=0.0, guidance=1.0)
    return c
