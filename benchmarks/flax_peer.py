"""Benchmark worker for diffusers 0.39's Flax models (its last Flax release), run in a separate virtualenv:

    PYTHONPATH=<repo> PEER/bin/python -m benchmarks.flax_peer

Needs jax, flax, optax and diffusers==0.39.* (+ transformers<5); imports nothing of ldm_jax; of benchmarks/ only
protocol/spec (standard library) and ours.random_params (numpy). Sampling follows
FlaxStableDiffusionPipeline (a jitted fori_loop).
"""

from __future__ import annotations

import gc
import time
import warnings
from typing import Any

import numpy as np

from benchmarks import protocol, spec

warnings.filterwarnings("ignore", message=".*Flax classes are deprecated.*")


def random_params(abstract: Any, seed: int = 0) -> Any:
    """ours.random_params as device arrays (benchmarks/ours.py imports nothing of ldm_jax at module level, so this
    venv without ldm_jax's dependencies can use it)."""
    import jax

    from benchmarks.ours import random_params as host_random_params

    return jax.tree.map(jax.numpy.asarray, host_random_params(abstract, seed))


class FlaxSide:
    """FlaxUNet2DConditionModel / FlaxAutoencoderKL / FlaxDDIMScheduler with optax AdamW."""

    def __init__(self):
        import diffusers  # noqa: F401
        import jax

        self.jax = jax
        self.state: dict[str, Any] = {}

    def info(self) -> dict[str, Any]:
        import diffusers
        import flax
        import jax

        return {"versions": {"jax": jax.__version__, "flax": flax.__version__, "diffusers": diffusers.__version__},
                "device": str(jax.devices()[0].device_kind)}

    def _compile(self, fn, args: tuple, donate: tuple = ()) -> tuple[Any, dict[str, Any]]:
        t0 = time.perf_counter()
        lowered = self.jax.jit(fn, donate_argnums=donate).lower(*args)
        compiled = lowered.compile()
        rep: dict[str, Any] = {"compile_s": time.perf_counter() - t0}
        gflop = protocol.xla_gflop(lowered, compiled)
        if gflop is not None:
            rep["gflop"] = gflop
        return compiled, rep

    def setup(self, case: dict[str, Any]) -> dict[str, Any]:
        jax, jnp = self.jax, self.jax.numpy
        kind, name = case["kind"], case["name"]
        dt = jnp.bfloat16 if case.get("gpu") else jnp.float32
        key = jax.random.key(0)
        if kind in ("unet_train", "ddim"):
            from diffusers import FlaxDDIMScheduler, FlaxUNet2DConditionModel

            model = FlaxUNet2DConditionModel(**spec.diffusers_unet_kwargs(case), dtype=dt)
            b, s, c = case["batch"], case["size"], case["in_channels"]
            x0 = jax.random.normal(key, (b, c, s, s), jnp.float32)  # diffusers' Flax models take NCHW
            ctx = jax.random.normal(jax.random.key(1), spec.context_shape(case), jnp.float32)
            abstract = jax.eval_shape(model.init, key, x0[:1], jnp.zeros((1,), jnp.int32), ctx[:1])["params"]
            params = random_params(abstract)
            sc = case["schedule"]
            sched = FlaxDDIMScheduler(num_train_timesteps=sc["num_timesteps"], beta_start=sc["beta_start"],
                                      beta_end=sc["beta_end"], beta_schedule="scaled_linear", clip_sample=False,
                                      set_alpha_to_one=False, steps_offset=1)
            sstate = sched.create_state()
            if kind == "unet_train":
                import optax

                tx = optax.adamw(case["train"]["lr"], weight_decay=case["train"]["weight_decay"])
                abar = sstate.common.alphas_cumprod

                def step(params, opt_state, x0, ctx, key):
                    t_key, n_key = jax.random.split(key)
                    t = jax.random.randint(t_key, (b,), 0, sc["num_timesteps"])
                    noise = jax.random.normal(n_key, x0.shape)
                    a = abar[t][:, None, None, None]
                    xt = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise

                    def loss_fn(p):
                        pred = model.apply({"params": p}, xt, t, ctx).sample
                        return jnp.mean((pred.astype(jnp.float32) - noise) ** 2)

                    loss, grads = jax.value_and_grad(loss_fn)(params)
                    updates, opt_state = tx.update(grads, opt_state, params)
                    return optax.apply_updates(params, updates), opt_state, loss

                opt_state = tx.init(params)
                compiled, rep = self._compile(step, (params, opt_state, x0, ctx, key),
                                              donate=protocol.train_donation(jax.default_backend()))
                st = {"params": params, "opt": opt_state, "i": 0}

                def run():
                    st["i"] += 1
                    st["params"], st["opt"], loss = compiled(st["params"], st["opt"], x0, ctx,
                                                             jax.random.fold_in(key, st["i"]))
                    loss.block_until_ready()
            else:
                steps, gs = case["steps"], case["guidance"]
                c_in = jnp.concatenate([jnp.zeros_like(ctx), ctx])

                def sample(params, c_in, key):
                    state = sched.set_timesteps(sstate, steps, x0.shape)
                    lat = jax.random.normal(key, x0.shape, jnp.float32) * state.init_noise_sigma

                    def body(i, carry):
                        lat, state = carry
                        t = jnp.array(state.timesteps, dtype=jnp.int32)[i]
                        inp = jnp.concatenate([lat, lat])
                        eps = model.apply({"params": params}, inp, jnp.broadcast_to(t, (inp.shape[0],)),
                                          encoder_hidden_states=c_in).sample
                        e_u, e_c = jnp.split(eps.astype(jnp.float32), 2)
                        return sched.step(state, e_u + gs * (e_c - e_u), t, lat).to_tuple()

                    return jax.lax.fori_loop(0, steps, body, (lat, state))[0]

                compiled, rep = self._compile(sample, (params, c_in, key))
                rep["gflop"] = rep.get("gflop", 0.0) * steps  # while-loop body counted once

                def run():
                    compiled(params, c_in, key).block_until_ready()
        elif kind in ("ae_encode", "ae_decode"):
            from diffusers import FlaxAutoencoderKL

            model = FlaxAutoencoderKL(**spec.diffusers_ae_kwargs(case), dtype=dt)
            b, s = case["batch"], case["size"]
            x = jax.random.uniform(key, (b, 3, s, s), jnp.float32, -1.0, 1.0)
            abstract = jax.eval_shape(model.init, key, x[:1])["params"]
            params = random_params(abstract)
            if kind == "ae_encode":
                fn = lambda p, x: model.apply({"params": p}, x, method=model.encode).latent_dist.mode()  # noqa
                arg = x
            else:
                fn = lambda p, z: model.apply({"params": p}, z, method=model.decode).sample  # noqa: E731
                ls = spec.latent_size(case)
                arg = jax.random.normal(key, (b, case["ae"]["embed_dim"], ls, ls), jnp.float32)
            compiled, rep = self._compile(fn, (params, arg))

            def run():
                compiled(params, arg).block_until_ready()
        else:
            raise ValueError(f"unknown case kind {kind!r}")
        rep["params"] = int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract)))
        self.state[name] = run
        return rep

    def run(self, name: str) -> None:
        self.state[name]()

    def teardown(self, name: str) -> None:
        self.state.pop(name, None)
        gc.collect()

    def matmul(self, n: int, reps: int) -> float:
        raise NotImplementedError("the machine's matmul rate is measured by the ours/torch workers")


if __name__ == "__main__":
    protocol.serve(FlaxSide)
