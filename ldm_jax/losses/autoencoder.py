"""Stage-1 generator objectives (pure functions): reconstruction (L1 + LPIPS), KL or VQ term, adaptive GAN term.

Reference semantics (LPIPSWithDiscriminator / VQLPIPSWithDiscriminator):
- KL: nll = rec / exp(logvar) + logvar with a learned scalar logvar; nll and KL summed per image, averaged over the
  batch; loss = nll + kl_weight·KL + d_weight·disc_factor·g_loss.
- VQ: nll = mean(rec); loss = nll + d_weight·disc_factor·g_loss + codebook_weight·q_loss.
- d_weight = disc_weight·‖∇_W nll‖ / (‖∇_W g_loss‖ + 1e-4), clipped to [0, 1e4], W = the decoder's output kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.losses.gan import adaptive_disc_weight

LpipsFn = Callable[[jax.Array, jax.Array], jax.Array]


def reconstruction_loss(x: jax.Array, rec: jax.Array, lpips_fn: LpipsFn | None, perceptual_weight: float) -> jax.Array:
    """Per-pixel |x − x̂| + perceptual_weight · LPIPS(x, x̂) (broadcast over pixels), shape (B, H, W, C)."""
    rec_loss = jnp.abs(x - rec)
    if lpips_fn is not None and perceptual_weight > 0:
        rec_loss = rec_loss + perceptual_weight * lpips_fn(x, rec)[:, None, None, None]
    return rec_loss


def kl_nll(rec_loss: jax.Array, logvar: jax.Array) -> jax.Array:
    """Gaussian NLL with a learned scalar log-variance, summed per image and averaged over the batch."""
    nll = rec_loss / jnp.exp(logvar) + logvar
    return jnp.sum(nll) / rec_loss.shape[0]


def vq_nll(rec_loss: jax.Array) -> jax.Array:
    return jnp.mean(rec_loss)


def last_layer_grad(features: jax.Array, conv_params: dict, d_out: jax.Array) -> jax.Array:
    """∂L/∂W of the decoder's output 3×3 conv given its input `features` and ∂L/∂output (one vjp, no re-run
    of the decoder): the adaptive GAN weight compares two such gradients."""
    kernel = conv_params["kernel"]
    conv = nn.Conv(kernel.shape[-1], kernel.shape[:2])

    def out_fn(k):
        return conv.apply({"params": {**conv_params, "kernel": k}}, features)

    _, vjp = jax.vjp(out_fn, kernel)
    return vjp(d_out.astype(features.dtype))[0]


def adaptive_weight_from_outputs(
    nll_fn: Callable[[jax.Array], jax.Array],
    g_fn: Callable[[jax.Array], jax.Array],
    rec: jax.Array,
    features: jax.Array,
    conv_params: dict,
    disc_weight: float,
) -> jax.Array:
    """The adaptive weight, with both gradients taken w.r.t. the decoder's last kernel (stop-gradient'ed)."""
    rec = jax.lax.stop_gradient(rec)
    features = jax.lax.stop_gradient(features)
    conv_params = jax.lax.stop_gradient(conv_params)
    nll_grad = last_layer_grad(features, conv_params, jax.grad(nll_fn)(rec))
    g_grad = last_layer_grad(features, conv_params, jax.grad(g_fn)(rec))
    return adaptive_disc_weight(nll_grad, g_grad, disc_weight)
