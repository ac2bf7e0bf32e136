"""Stage 1, KL-f16 (c16): the reference's kl-f16 first stage (256² → 16×16×16, attention at 16²; Table 8:
rFID 0.87).

python train.py --config configs/kl_f16.py --workdir runs/kl_f16 --config.data.path=/data/openimages/{split}
"""

from ldm_jax.config_defaults import autoencoder_config


def get_config():
    c = autoencoder_config("kl")
    c.model.update(embed_dim=16, z_channels=16, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                   attn_resolutions=(16,))
    c.loss.update(disc_start=50001, kl_weight=1e-6, disc_weight=0.5)
    c.data.update(name="folder", path="data/openimages/{split}", resolution=256, preprocess="random_crop")
    c.train.update(batch_size=6)
    return c
