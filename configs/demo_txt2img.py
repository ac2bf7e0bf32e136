"""Stage-2 demo for a 2-core CPU: text-to-image on Fashion-MNIST latents (8×8×4) of the demo autoencoder.

Captions "a photo of a t-shirt", "a photo of an ankle boot", ... go through a WordPiece vocabulary trained on
the captions (saved in WORKDIR/tokenizer) and a 2-layer transformer τθ trained jointly with the UNet, whose
spatial transformers cross-attend to its token embeddings; the empty prompt is the null condition (p_uncond 0.1).

python train.py --config configs/demo_txt2img.py --workdir runs/txt2img --config.first_stage.workdir=runs/ae
python sample.py --workdir runs/txt2img --prompt "a photo of a sneaker" --guidance 3 --out samples/sneakers
"""

from ldm_jax.config_defaults import ldm_config


def get_config():
    c = ldm_config()
    c.first_stage.update(workdir="runs/ae", scale_by_std=True)
    c.condition.update(type="text", p_uncond=0.1, vocab_path="", vocab_size=200)
    c.model.update(conditioning_key="crossattn", cond_stage="text", context_dim=64, text_layers=2, text_max_len=16,
                   vocab_size=0)  # 0: the trained tokenizer's size
    c.model.unet.update(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=(1, 2), num_head_channels=32)
    c.data.update(name="fashion_mnist", resolution=32, channels=1, preprocess="pad", random_flip=False)
    c.train.update(batch_size=64, num_steps=3000, base_lr=5e-4, scale_lr=False, warmup_steps=100, ema_decay=0.999,
                   log_every=100, ckpt_every=1000)
    c.sampling.update(sampler="ddim", steps=50, eta=1.0, guidance=3.0, grid_per_class=10)  # eta: see demo_ldm.py
    return c
