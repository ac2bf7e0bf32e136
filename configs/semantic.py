"""Stage 2, semantic synthesis LDM on VQ-f4 latents (reference semantic_synthesis256): the one-hot segmentation
(182 COCO-stuff classes) is rescaled by 2 bilinear halvings + a 1×1 conv to 3 channels (SpatialRescaler) and
concatenated to the latents (UNet in 6), UNet ch 128, mult 1,4,8, 8 heads (the reference's attention at ds
32,16,8 is never reached with 3 levels: attention only in the middle block), L1, schedule 0.0015 → 0.0205,
base lr 1e-6.

Needs a data source whose examples carry a 'segmentation' map (int class ids (H, W) or one-hot (H, W, 182)).
python train.py --config configs/semantic.py --workdir runs/semantic
"""

from ldm_jax.config_defaults import ldm_config


def get_config():
    c = ldm_config()
    c.first_stage.update(workdir="runs/vq_f4", scale_factor=1.0, scale_by_std=False)
    c.condition.update(type="semantic")
    c.model.update(conditioning_key="concat", cond_stage="none", concat_in_channels=182, concat_channels=3,
                   concat_rescale_stages=2, latent_channels=3)
    c.model.unet.update(in_channels=6, out_channels=3, model_channels=128, channel_mult=(1, 4, 8),
                        num_res_blocks=2, attention_resolutions=(), num_heads=8, num_head_channels=-1)
    c.diffusion.update(schedule="linear", num_timesteps=1000, linear_start=0.0015, linear_end=0.0205,
                       loss_type="l1")
    c.train.update(batch_size=8, base_lr=1e-6, scale_lr=True, ema_decay=0.9999)
    c.data.update(name="folder", path="data/landscapes/{split}", resolution=256, channels=3, preprocess="resize",
                  random_flip=False)
    c.sampling.update(sampler="ddim", steps=100, eta=1.0, guidance=1.0)
    return c
