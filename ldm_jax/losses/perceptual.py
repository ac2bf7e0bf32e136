"""Perceptual (LPIPS) distance as a pure function of images, for training losses and evaluation."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ldm_jax.models.lpips import LPIPS

_LPIPS = LPIPS()


def make_lpips_fn(params: dict) -> Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]:
    """Return `fn(x, y) -> (B,)` LPIPS distances; `params` from `load_lpips_params` ('params' key optional).

    Inside a jitted step, call this on params passed as an argument (rather than closing over concrete
    arrays) so the 59 MB of VGG weights are not baked into the compiled program as constants.
    """
    variables = params if "params" in params else {"params": params}

    def lpips_fn(x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
        # LPIPS is a frozen metric: gradients reach the images only, never the VGG/linear weights
        # (applied per call so it also holds when params are traced arguments of a jitted step).
        frozen = jax.tree.map(jax.lax.stop_gradient, variables)
        return _LPIPS.apply(frozen, x, y)

    return lpips_fn
