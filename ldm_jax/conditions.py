"""Condition inputs shared by training and sampling: the null condition of classifier-free guidance and the
spatial conditions concatenated to the latents (low-res image, masked image + mask, semantic map).

Mask convention here: 1 = the region to inpaint (`random_box_masks`, `spatial_condition(inpaint_mask=...)`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

CONDITION_TYPES = ("none", "class", "text", "lowres", "inpaint", "semantic")
LOWRES_MODES = ("pixels", "latent")


def null_condition(cfg: ml_collections.ConfigDict, cond: dict[str, jax.Array], null_tokens: jax.Array | None):
    """The unconditional input for guidance: the null class / the empty prompt; spatial conditions are kept."""
    out = dict(cond)
    if "label" in cond:
        out["label"] = jnp.full_like(cond["label"], cfg.model.n_classes - 1)
    if "tokens" in cond:
        out["tokens"] = jnp.broadcast_to(null_tokens, cond["tokens"].shape).astype(cond["tokens"].dtype)
    if "context" in cond:  # a given context: the null condition is all zeros
        out["context"] = jnp.zeros_like(cond["context"])
    return out


def random_box_masks(key: jax.Array, b: int, h: int, w: int, min_frac: float = 0.25, max_frac: float = 0.6):
    """(B, H, W, 1) masks, 1 = region to inpaint: one random rectangle per image."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    bh = jnp.floor(jax.random.uniform(k1, (b,), minval=min_frac, maxval=max_frac) * h).astype(jnp.int32)
    bw = jnp.floor(jax.random.uniform(k2, (b,), minval=min_frac, maxval=max_frac) * w).astype(jnp.int32)
    y0 = jnp.floor(jax.random.uniform(k3, (b,)) * (h - bh)).astype(jnp.int32)
    x0 = jnp.floor(jax.random.uniform(k4, (b,)) * (w - bw)).astype(jnp.int32)
    ys, xs = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
    inside = ((ys >= y0[:, None, None]) & (ys < (y0 + bh)[:, None, None])
              & (xs >= x0[:, None, None]) & (xs < (x0 + bw)[:, None, None]))
    return inside[..., None].astype(jnp.float32)


def lowres_image(cfg, images: jax.Array) -> jax.Array:
    """The low-resolution condition image: an antialiased bilinear ×(1/sr_factor) copy."""
    f = cfg.condition.sr_factor
    b, h, w, c = images.shape
    return jax.image.resize(images, (b, h // f, w // f, c), method="linear", antialias=True)


def spatial_condition(cfg, first_stage: Any, fs_vars, images: jax.Array, scale: jax.Array,
                      key: jax.Array, inpaint_mask: jax.Array | None = None,
                      segmentation: jax.Array | None = None) -> dict[str, jax.Array]:
    """The concat conditions: a low-res copy (pixels, or its upsampled copy's latents), masked-image latents +
    mask, or a one-hot semantic map (from the batch's `segmentation`: int ids (B, H, W) or one-hot)."""
    ctype = cfg.condition.type
    b, h, w, c = images.shape
    if ctype == "lowres":
        low = lowres_image(cfg, images)
        if cfg.condition.lowres_mode == "latent":
            # Encode the bilinearly upsampled low-res image: the condition keeps all its detail at latent
            # resolution even when sr_factor < the stage-1 factor (pixels mode would have to shrink it).
            up = jax.image.resize(low, images.shape, method="linear")
            return {"concat": first_stage.encode(fs_vars, up) * scale}
        return {"concat": low}
    if ctype == "inpaint":
        mask = random_box_masks(key, b, h, w) if inpaint_mask is None else inpaint_mask
        masked = images * (1.0 - mask)
        zc = first_stage.encode(fs_vars, masked) * scale
        small = jax.image.resize(mask, (b, *zc.shape[1:3], 1), method="nearest")
        return {"concat": jnp.concatenate([zc, small], axis=-1), "mask": mask}
    if ctype == "semantic":
        if segmentation is None:
            raise ValueError("condition.type='semantic' needs batches with a 'segmentation' map")
        k = cfg.model.concat_in_channels
        if segmentation.ndim == 3:  # class ids -> one-hot, as the reference's segmentation key
            segmentation = jax.nn.one_hot(segmentation, k, dtype=jnp.float32)
        if segmentation.shape[-1] != k:
            raise ValueError(f"model.concat_in_channels={k} but the segmentation has {segmentation.shape[-1]} "
                             "classes")
        return {"concat": segmentation.astype(jnp.float32)}
    return {}


def condition_preview(cfg, images: jax.Array, cond: dict[str, jax.Array],
                      segmentation: jax.Array | None = None) -> jax.Array:
    """An image of the spatial condition for sample grids: the masked image, the low-res image, the segment map."""
    ctype = cfg.condition.type
    if ctype == "inpaint":
        return images * (1.0 - cond["mask"])
    if ctype == "lowres":
        return lowres_image(cfg, images)
    if ctype == "semantic" and segmentation is not None:
        k = cfg.model.concat_in_channels
        ids = segmentation if segmentation.ndim == 3 else jnp.argmax(segmentation, axis=-1)
        gray = ids.astype(jnp.float32)[..., None] / max(k - 1, 1) * 2.0 - 1.0
        return jnp.broadcast_to(gray, (*gray.shape[:3], images.shape[-1]))
    return images
