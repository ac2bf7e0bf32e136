"""Stage-1 demo sized for a 2-core CPU: KL-f4 autoencoder on Fashion-MNIST (32×32×1 → 8×8×4 latents).

Full objective as the paper (L1 + LPIPS + PatchGAN with adaptive weight and delayed start), small widths.
`python train.py --config configs/demo_autoencoder.py --workdir runs/ae`
"""

from ldm_jax.config_defaults import autoencoder_config


def get_config():
    c = autoencoder_config("kl")
    c.model.update(embed_dim=4, z_channels=4, ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(),
                   resolution=32, in_channels=1, norm_groups=8)
    c.data.update(name="fashion_mnist", resolution=32, channels=1, preprocess="pad", random_flip=False)
    c.loss.update(perceptual_weight=1.0, kl_weight=1e-6, disc_start=1500, disc_weight=0.5, disc_n_layers=2,
                  disc_ndf=32)
    c.train.update(batch_size=32, num_steps=2000, base_lr=2e-5, log_every=100, ckpt_every=500, grid_every=1000)
    c.eval.update(split="test", num_examples=2000, batch_size=100)
    return c
