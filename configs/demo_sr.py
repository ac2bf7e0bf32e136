"""Stage-2 demo for a 2-core CPU: ×2 super-resolution of Fashion-MNIST (16×16 → 32×32) in the latent space
(8×8×4) of the demo autoencoder.

The 16×16 image is smaller than 32/f = 8 only by 2, so instead of shrinking it to the latent size (pixels mode,
as the paper's ×4 model with f = 4) its bilinear upsampled copy is encoded by the frozen first stage and those
latents (4 channels) are concatenated to the noisy latents (lowres_mode "latent"); UNet input 8 channels.
samples.png shows the low-res inputs above their super-resolved samples.

python train.py --config configs/demo_sr.py --workdir runs/sr --config.first_stage.workdir=runs/ae
"""

from ldm_jax.config_defaults import ldm_config


def get_config():
    c = ldm_config()
    c.first_stage.update(workdir="runs/ae", scale_by_std=True)
    c.condition.update(type="lowres", sr_factor=2, lowres_mode="latent")
    c.model.update(conditioning_key="concat", cond_stage="none", concat_channels=4)
    c.model.unet.update(in_channels=8, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=(2,), num_head_channels=32)
    c.data.update(name="fashion_mnist", resolution=32, channels=1, preprocess="pad", random_flip=False)
    c.train.update(batch_size=64, num_steps=3000, base_lr=5e-4, scale_lr=False, warmup_steps=100, ema_decay=0.999,
                   log_every=100, ckpt_every=1000)
    c.sampling.update(sampler="ddim", steps=50, guidance=1.0, grid_per_class=8)
    return c
