"""Stage 2, class-conditional ImageNet 256 LDM on VQ-f8 latents (reference cin-ldm-vq-f8): UNet ch 256, mult
1,2,4, spatial transformers at ds 4,2,1 (32-channel heads) cross-attending to a 512-d ClassEmbedder context;
1001 embeddings = 1000 classes + the null class used for classifier-free guidance (paper LDM-G: scale 1.5).

The reference trains without condition dropout; p_uncond 0.1 here trains the null class so guidance works.
python train.py --config configs/cin_ldm_vq_f8.py --workdir runs/cin --config.data.name=tfds:imagenet2012
"""

from ldm_jax.config_defaults import ldm_config


def get_config():
    c = ldm_config()
    c.first_stage.update(workdir="runs/vq_f8", scale_factor=1.0, scale_by_std=False)
    c.condition.update(type="class", p_uncond=0.1)
    c.model.update(conditioning_key="crossattn", cond_stage="class", n_classes=1001, context_dim=512,
                   latent_channels=4)
    c.model.unet.update(in_channels=4, out_channels=4, model_channels=256, channel_mult=(1, 2, 4),
                        num_res_blocks=2, attention_resolutions=(4, 2, 1), num_heads=-1, num_head_channels=32,
                        transformer_depth=1)
    c.diffusion.update(schedule="linear", num_timesteps=1000, linear_start=0.0015, linear_end=0.0195,
                       loss_type="l2")
    c.train.update(batch_size=48, base_lr=1e-6, scale_lr=True, ema_decay=0.9999)
    c.data.update(name="tfds:imagenet2012", resolution=256, channels=3, preprocess="resize", random_flip=False)
    c.sampling.update(sampler="ddim", steps=250, eta=0.0, guidance=1.5, grid_per_class=8)
    return c
