"""Stage 1, KL-f8 (c4): the reference's kl-f8 first stage (256² → 32×32×4; Table 8: rFID 0.90), the one under
the LSUN-churches LDM and the text-to-image model.

python train.py --config configs/kl_f8.py --workdir runs/kl_f8 --config.data.path=/data/openimages/{split}
"""

from ldm_jax.config_defaults import autoencoder_config


def get_config():
    c = autoencoder_config("kl")
    c.model.update(embed_dim=4, z_channels=4, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_resolutions=())
    c.loss.update(disc_start=50001, kl_weight=1e-6, disc_weight=0.5)
    c.data.update(name="folder", path="data/openimages/{split}", resolution=256, preprocess="random_crop")
    c.train.update(batch_size=4)
    return c
