"""Stage 1, VQ-f8 (16384 codes, d4): the reference's vq-f8 first stage (256² → 32×32×4, attention at 32²,
2-layer PatchGAN; Table 8: rFID 1.14), under the class-conditional ImageNet LDM.

python train.py --config configs/vq_f8.py --workdir runs/vq_f8 --config.data.path=/data/openimages/{split}
"""

from ldm_jax.config_defaults import autoencoder_config


def get_config():
    c = autoencoder_config("vq")
    c.model.update(n_embed=16384, embed_dim=4, z_channels=4, ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=2,
                   attn_resolutions=(32,))
    c.loss.update(disc_start=1, disc_weight=0.6, codebook_weight=1.0, disc_n_layers=2)
    c.data.update(name="folder", path="data/openimages/{split}", resolution=256, preprocess="random_crop")
    c.train.update(batch_size=10)
    return c
