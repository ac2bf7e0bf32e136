"""The stage-2 network: conditioning encoder τθ + time-conditional UNet, as one Flax module.

`conditioning_key` says how the condition reaches the UNet (reference semantics):
- "crossattn": context tokens from τθ (class embedder or text transformer) into every SpatialTransformer;
- "concat": spatial conditions (low-res image, masked-image latents + mask, semantic map) concatenated to x_t,
  after `concat_rescale_stages` bilinear halvings and (concat_in_channels > 0) a 1×1 conv, as SpatialRescaler;
- "hybrid": both;  "adm": a class label embedding added to the time embedding;  None: unconditional.
The condition is a dict: "label" (B,) int, "tokens" (B, L) int, "concat" (B, h, w, c) float.
"""

from __future__ import annotations

import inspect
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ldm_jax.models.attention import repeat_batch
from ldm_jax.models.clip import CLIPTextTransformer, clip_kwargs
from ldm_jax.models.conditioning import ClassEmbedder, SpatialRescaler, TransformerEmbedder
from ldm_jax.models.unet import UNetModel, validate_unet_config

CONDITIONING_KEYS = (None, "crossattn", "concat", "hybrid", "adm")
COND_STAGES = ("none", "class", "text", "clip", "context")


def default_attention_impl(dtype) -> str | None:
    """model.unet.attention_impl '' (auto): the formulation measured fastest on this backend (docs/benchmarks.md):
    "matmul" (hand-written VJPs) on CPU, cuDNN's fused attention on GPU in bf16/fp16, else XLA's."""
    backend = jax.default_backend()
    if backend == "cpu":
        return "matmul"
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "cudnn"
    return None


class LatentDiffusionModel(nn.Module):
    unet_kwargs: dict
    conditioning_key: str | None = None
    cond_stage: str = "none"  # τθ for cross-attention: "class", "text" (trained jointly), "clip" (SD v1) or "none"
    n_classes: int = 0  # including the null class (last index)
    context_dim: int = 512
    vocab_size: int = 0
    text_layers: int = 1
    text_max_len: int = 77
    concat_rescale_stages: int = 0  # bilinear ×0.5 stages applied to the concat condition
    concat_channels: int = 0
    concat_in_channels: int = 0  # > 0: a 1×1 conv maps these (e.g. 182 semantic classes) to concat_channels
    clip: dict | None = None  # cond_stage "clip": CLIPTextTransformer kwargs (models/clip.py)
    dtype: Any = jnp.float32

    def setup(self):
        self.unet = UNetModel(**self.unet_kwargs, dtype=self.dtype)
        if self.cond_stage == "class":
            self.cond_encoder = ClassEmbedder(self.n_classes, self.context_dim)
        elif self.cond_stage == "text":
            self.cond_encoder = TransformerEmbedder(self.vocab_size, self.context_dim, self.text_layers,
                                                    self.text_max_len, dtype=self.dtype)
        elif self.cond_stage == "clip":
            self.cond_encoder = CLIPTextTransformer(**(self.clip or {}), dtype=self.dtype)
        if self._rescales:
            mapped = bool(self.concat_in_channels)
            self.rescaler = SpatialRescaler(self.concat_rescale_stages, "bilinear", 0.5,
                                            self.concat_in_channels if mapped else self.concat_channels,
                                            self.concat_channels if mapped else None)

    @property
    def _rescales(self) -> bool:
        return bool(self.concat_rescale_stages or self.concat_in_channels)

    def encode_condition(self, cond: dict[str, jax.Array]) -> jax.Array | None:
        """τθ(y): the cross-attention context, or None."""
        if self.cond_stage == "class":
            return self.cond_encoder(cond["label"])
        if self.cond_stage in ("text", "clip"):
            return self.cond_encoder(cond["tokens"])
        if self.cond_stage == "context":  # given in the batch, e.g. precomputed text-encoder outputs
            return cond["context"]
        return None

    def __call__(self, x_t: jax.Array, t: jax.Array, cond: dict[str, jax.Array], train: bool = False) -> jax.Array:
        key = self.conditioning_key
        context = self.encode_condition(cond) if key in ("crossattn", "hybrid") else None
        if key in ("concat", "hybrid"):
            c = cond["concat"]
            if self._rescales:
                c = self.rescaler(c)
            x_t = jnp.concatenate([repeat_batch(x_t, c.shape[0]), c.astype(x_t.dtype)], axis=-1)
        y = cond["label"] if key == "adm" else None
        return self.unet(x_t, t, context=context, y=y, train=train)


def build_latent_diffusion(cfg: ml_collections.ConfigDict, latent_channels: int) -> LatentDiffusionModel:
    """From the `model` ConfigDict of an ldm config; validates the fields users get wrong, before any compile."""
    u = cfg.unet
    key = cfg.get("conditioning_key")
    if key not in CONDITIONING_KEYS:
        raise ValueError(f"model.conditioning_key must be one of {CONDITIONING_KEYS}, got {key!r}")
    cond_stage = cfg.get("cond_stage", "none")
    if cond_stage not in COND_STAGES:
        raise ValueError(f"model.cond_stage must be one of {COND_STAGES}, got {cond_stage!r}")
    if key in ("crossattn", "hybrid") and cond_stage == "none":
        raise ValueError(f"model.conditioning_key={key!r} needs a model.cond_stage (class, text, clip or context)")
    if key == "adm" and not cfg.get("n_classes"):
        raise ValueError("model.conditioning_key='adm' needs model.n_classes")
    concat_ch = cfg.get("concat_channels", 0) if key in ("concat", "hybrid") else 0
    if u.in_channels != latent_channels + concat_ch:
        raise ValueError(
            f"model.unet.in_channels={u.in_channels} but the stage-1 latents have {latent_channels} channels"
            + (f" + {concat_ch} concatenated condition channels" if concat_ch else "")
        )
    if u.out_channels != latent_channels:
        raise ValueError(f"model.unet.out_channels={u.out_channels} but the stage-1 latents have "
                         f"{latent_channels} channels")
    crossattn = key in ("crossattn", "hybrid")
    clip = clip_kwargs(cfg.get("clip") or {}) if cond_stage == "clip" else None
    if clip is not None and crossattn and clip["width"] != cfg.context_dim:
        raise ValueError(f"model.context_dim={cfg.context_dim} but model.clip.width={clip['width']} (the context)")
    unet_kwargs = dict(
        in_channels=u.in_channels, out_channels=u.out_channels, model_channels=u.model_channels,
        channel_mult=tuple(u.channel_mult), num_res_blocks=u.num_res_blocks,
        attention_resolutions=tuple(u.attention_resolutions), dropout=u.get("dropout", 0.0),
        num_heads=u.get("num_heads", -1), num_head_channels=u.get("num_head_channels", -1),
        use_scale_shift_norm=u.get("use_scale_shift_norm", False), resblock_updown=u.get("resblock_updown", False),
        use_spatial_transformer=crossattn, transformer_depth=u.get("transformer_depth", 1),
        context_dim=cfg.context_dim if crossattn else None,
        num_classes=cfg.n_classes if key == "adm" else None,
        remat_policy=u.get("remat_policy") or None,
        attention_impl=u.get("attention_impl") or default_attention_impl(cfg.get("dtype", "float32")),
    )
    try:  # the UNet checks these again in setup(), i.e. inside a trace: fail here, eagerly, naming the section
        fields = inspect.signature(validate_unet_config).parameters
        validate_unet_config(**{k: v for k, v in unet_kwargs.items() if k in fields},
                             dtype=jnp.dtype(cfg.get("dtype", "float32")))
    except ValueError as e:
        raise ValueError(f"model.unet: {e}") from None
    return LatentDiffusionModel(
        unet_kwargs=unet_kwargs, conditioning_key=key, cond_stage=cond_stage, n_classes=cfg.get("n_classes", 0),
        context_dim=cfg.get("context_dim", 512), vocab_size=cfg.get("vocab_size", 0),
        text_layers=cfg.get("text_layers", 1), text_max_len=cfg.get("text_max_len", 77),
        concat_rescale_stages=cfg.get("concat_rescale_stages", 0), concat_channels=concat_ch,
        concat_in_channels=cfg.get("concat_in_channels", 0) if concat_ch else 0, clip=clip,
        dtype=jnp.dtype(cfg.get("dtype", "float32")),
    )
