"""Stage 1, KL-f4 (c3): the reference's kl-f4 first stage (256² → 64×64×3 latents; Table 8: rFID 0.27).

python train.py --config configs/kl_f4.py --workdir runs/kl_f4 --config.data.path=/data/openimages/{split}
"""

from ldm_jax.config_defaults import autoencoder_config


def get_config():
    c = autoencoder_config("kl")
    c.model.update(embed_dim=3, z_channels=3, ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, attn_resolutions=())
    c.loss.update(disc_start=50001, kl_weight=1e-6, disc_weight=0.5)
    c.data.update(name="folder", path="data/openimages/{split}", resolution=256, preprocess="random_crop")
    c.train.update(batch_size=10)  # per GPU in the reference; lr = 4.5e-6 × batch
    return c
