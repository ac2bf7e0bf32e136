"""Stage-2 demo for a 2-core CPU: inpainting on Fashion-MNIST latents (8×8×4) of the demo autoencoder.

As the paper's inpainting model: the UNet sees the noisy latent (4) + the latents of the masked image (4) + the
mask at latent size (1) = 9 channels; one random box (25-60 % of each side) per image is hidden in training.
samples.png shows masked test images above their inpainted samples.

python train.py --config configs/demo_inpainting.py --workdir runs/inpaint --config.first_stage.workdir=runs/ae
"""

from ldm_jax.config_defaults import ldm_config


def get_config():
    c = ldm_config()
    c.first_stage.update(workdir="runs/ae", scale_by_std=True)
    c.condition.update(type="inpaint")
    c.model.update(conditioning_key="concat", cond_stage="none", concat_channels=5)
    c.model.unet.update(in_channels=9, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=(2,), num_head_channels=32)
    c.data.update(name="fashion_mnist", resolution=32, channels=1, preprocess="pad", random_flip=False)
    c.train.update(batch_size=64, num_steps=3000, base_lr=5e-4, scale_lr=False, warmup_steps=100, ema_decay=0.999,
                   log_every=100, ckpt_every=1000)
    c.sampling.update(sampler="ddim", steps=50, guidance=1.0, grid_per_class=8)
    return c
