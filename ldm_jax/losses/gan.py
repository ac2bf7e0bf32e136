"""GAN losses and the adaptive generator weight of taming's LPIPSWithDiscriminator (pure, jit-safe)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def hinge_d_loss(logits_real: jnp.ndarray, logits_fake: jnp.ndarray) -> jnp.ndarray:
    """Discriminator hinge loss: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))."""
    loss_real = jnp.mean(jax.nn.relu(1.0 - logits_real))
    loss_fake = jnp.mean(jax.nn.relu(1.0 + logits_fake))
    return 0.5 * (loss_real + loss_fake)


def vanilla_d_loss(logits_real: jnp.ndarray, logits_fake: jnp.ndarray) -> jnp.ndarray:
    """Non-saturating BCE discriminator loss: 0.5 * (mean(softplus(-real)) + mean(softplus(fake)))."""
    return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


def generator_adv_loss(logits_fake: jnp.ndarray) -> jnp.ndarray:
    """Generator adversarial loss -mean(logits_fake) (the reference uses it for both hinge and vanilla)."""
    return -jnp.mean(logits_fake)


_D_LOSSES: dict[str, Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]] = {
    "hinge": hinge_d_loss,
    "vanilla": vanilla_d_loss,
}


def d_loss_fn(name: str) -> Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]:
    """Discriminator loss by config name (`loss.disc_loss`): 'hinge' or 'vanilla'."""
    if name not in _D_LOSSES:
        raise ValueError(f"loss.disc_loss must be one of {sorted(_D_LOSSES)}; got {name!r}")
    return _D_LOSSES[name]


def adopt_weight(weight, step, threshold, value: float = 0.0) -> jnp.ndarray:
    """`value` while step < threshold, else `weight` (jnp.where, so `step` may be traced)."""
    return jnp.where(jnp.asarray(step) < threshold, jnp.asarray(value, jnp.float32),
                     jnp.asarray(weight, jnp.float32))


def _global_norm(tree) -> jnp.ndarray:
    """Frobenius norm over all leaves (torch.norm of a single tensor when given one array)."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def adaptive_disc_weight(nll_grad, g_grad, disc_weight, eps: float = 1e-4,
                         max_weight: float = 1e4) -> jnp.ndarray:
    """disc_weight * clip(||nll_grad|| / (||g_grad|| + eps), 0, max_weight), with stop_gradient.

    As the reference, the ratio is clipped before multiplying by disc_weight. Grads may be arrays or pytrees
    (W = the decoder's last conv kernel in the reference).
    """
    ratio = _global_norm(nll_grad) / (_global_norm(g_grad) + eps)
    ratio = jax.lax.stop_gradient(jnp.clip(ratio, 0.0, max_weight))
    return ratio * disc_weight


def last_layer_grads(loss_fn: Callable[[jnp.ndarray], jnp.ndarray], last_kernel: jnp.ndarray) -> jnp.ndarray:
    """Gradient of scalar `loss_fn(last_kernel)` w.r.t. the last-layer kernel (for `adaptive_disc_weight`)."""
    return jax.grad(loss_fn)(last_kernel)
