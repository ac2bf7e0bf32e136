"""Stage 1, VQ-f4 (8192 codes, d3): the reference's vq-f4 first stage (256² → 64×64×3; Table 8: rFID 0.58),
under the CelebA-HQ, super-resolution and semantic-synthesis LDMs.

python train.py --config configs/vq_f4.py --workdir runs/vq_f4 --config.data.path=/data/openimages/{split}
"""

from ldm_jax.config_defaults import autoencoder_config


def get_config():
    c = autoencoder_config("vq")
    c.model.update(n_embed=8192, embed_dim=3, z_channels=3, ch=128, ch_mult=(1, 2, 4), num_res_blocks=2,
                   attn_resolutions=())
    c.loss.update(disc_start=0, disc_weight=0.75, codebook_weight=1.0)
    c.data.update(name="folder", path="data/openimages/{split}", resolution=256, preprocess="random_crop")
    c.train.update(batch_size=8)
    return c
