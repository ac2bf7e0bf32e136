"""Stage 1, VQ-f16 (16384 codes, d8): the reference's vq-f16 first stage (256² → 16×16×8, attention at 16²,
2-layer PatchGAN).

python train.py --config configs/vq_f16.py --workdir runs/vq_f16 --config.data.path=/data/openimages/{split}
"""

from ldm_jax.config_defaults import autoencoder_config


def get_config():
    c = autoencoder_config("vq")
    c.model.update(n_embed=16384, embed_dim=8, z_channels=8, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                   attn_resolutions=(16,))
    c.loss.update(disc_start=250001, disc_weight=0.75, codebook_weight=1.0, disc_n_layers=2)
    c.data.update(name="folder", path="data/openimages/{split}", resolution=256, preprocess="random_crop")
    c.train.update(batch_size=14)
    return c
