"""VectorQuantizer: nearest-codebook-entry quantisation with a straight-through estimator.

Loss placement: textbook (van den Oord et al.) puts beta on the commitment term, ‖z − sg(e)‖²; the reference's
`legacy=True` puts it on the codebook term instead (a bug kept for checkpoint compatibility) — both available.
With `ema_decay` the codebook is not a parameter but a k-means-style EMA of assigned encoder outputs (collection
`vq_ema`, updated when `train=True`); then only the commitment term is a loss, and `dead_code_threshold` restarts
codes whose EMA cluster size fell below it with encoder outputs from the current batch.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def nearest_code(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the nearest codebook row (squared L2) for each row of z (N, D) → (N,)."""
    d = (
        jnp.sum(z**2, axis=1, keepdims=True)
        + jnp.sum(codebook**2, axis=1)[None, :]
        - 2.0 * z @ codebook.T
    )
    return jnp.argmin(d, axis=1)


class VectorQuantizer(nn.Module):
    n_embed: int
    embed_dim: int
    beta: float = 0.25
    legacy_beta: bool = False
    ema_decay: float | None = None
    dead_code_threshold: float = 0.0
    epsilon: float = 1e-5

    def setup(self):
        init = nn.initializers.uniform(scale=2.0 / self.n_embed)  # U(0, 2/n) shifted below → U(−1/n, 1/n)

        def codebook_init(key, shape):
            return init(key, shape) - 1.0 / self.n_embed

        if self.ema_decay is None:
            self.embedding = self.param("embedding", codebook_init, (self.n_embed, self.embed_dim))
        else:
            shape = (self.n_embed, self.embed_dim)
            emb = self.variable("vq_ema", "embedding", lambda: codebook_init(self.make_rng("params"), shape))
            self.ema_embedding = emb
            self.cluster_size = self.variable("vq_ema", "cluster_size", jnp.ones, (self.n_embed,))
            self.embed_sum = self.variable("vq_ema", "embed_sum", lambda: emb.value.copy())

    def codebook(self) -> jax.Array:
        return self.embedding if self.ema_decay is None else self.ema_embedding.value

    def lookup(self, indices: jax.Array) -> jax.Array:
        return self.codebook()[indices]

    def __call__(self, z: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """z (..., D) → (z_q with straight-through gradient, quantisation loss, info dict)."""
        codebook = self.codebook()
        flat = z.reshape(-1, self.embed_dim).astype(jnp.float32)
        idx = nearest_code(flat, codebook)
        zq = codebook[idx].reshape(z.shape)
        commit = jnp.mean((jax.lax.stop_gradient(zq) - z) ** 2)
        if self.ema_decay is None:
            cb = jnp.mean((zq - jax.lax.stop_gradient(z)) ** 2)
            loss = commit + self.beta * cb if self.legacy_beta else self.beta * commit + cb
        else:
            loss = self.beta * commit
            if train and not self.is_initializing():
                self._ema_update(flat, idx)
        onehot = jax.nn.one_hot(idx, self.n_embed, dtype=jnp.float32)
        probs = jnp.mean(onehot, axis=0)
        info = {
            "indices": idx.reshape(z.shape[:-1]),
            "perplexity": jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10))),
            "codebook_usage": jnp.mean((probs > 0).astype(jnp.float32)),
        }
        zq = z + jax.lax.stop_gradient(zq - z)  # straight-through: d zq / d z = identity
        return zq, loss, info

    def _ema_update(self, flat: jax.Array, idx: jax.Array) -> None:
        decay = self.ema_decay
        flat = jax.lax.stop_gradient(flat)
        onehot = jax.nn.one_hot(idx, self.n_embed, dtype=jnp.float32)
        cs = decay * self.cluster_size.value + (1 - decay) * onehot.sum(0)
        es = decay * self.embed_sum.value + (1 - decay) * onehot.T @ flat
        n = cs.sum()
        smoothed = (cs + self.epsilon) / (n + self.n_embed * self.epsilon) * n  # Laplace smoothing
        emb = es / smoothed[:, None]
        if self.dead_code_threshold > 0:
            # Restart dead codes at random encoder outputs of this batch (deterministic from the 'vq' rng).
            dead = cs < self.dead_code_threshold
            pick = jax.random.randint(self.make_rng("vq"), (self.n_embed,), 0, flat.shape[0])
            emb = jnp.where(dead[:, None], flat[pick], emb)
            es = jnp.where(dead[:, None], flat[pick], es)
            cs = jnp.where(dead, 1.0, cs)
        self.cluster_size.value, self.embed_sum.value, self.ema_embedding.value = cs, es, emb
