"""Benchmark worker for ldm_jax (run as `python -m benchmarks.ours`; the orchestrator sets XLA_FLAGS)."""

from __future__ import annotations

import gc
import json
import time
from typing import Any

import numpy as np

from benchmarks import protocol, spec


def random_params(abstract: Any, seed: int = 0) -> Any:
    """Random params of the right shapes without compiling `init` (slow for big models on a CPU): norm scales
    1, biases 0, kernels N(0, 1/fan_in). Timing does not depend on the values; the output stays O(1)."""
    import jax

    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return np.ones(x.shape, x.dtype)
        if name == "bias":
            return np.zeros(x.shape, x.dtype)
        fan_in = int(np.prod(x.shape[:-1])) or 1
        return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def compiled_report(compiled: Any, lowered: Any = None) -> dict[str, Any]:
    """FLOPs (XLA cost analysis) and memory (XLA memory analysis) of a compiled executable."""
    rep: dict[str, Any] = {}
    gflop = protocol.xla_gflop(*([lowered] if lowered is not None else []), compiled)
    if gflop is not None:
        rep["gflop"] = gflop
    try:
        m = compiled.memory_analysis()
        rep["xla_memory_gib"] = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                                 - m.alias_size_in_bytes) / 2**30
    except Exception:
        pass
    return rep


class OursSide:
    """ldm_jax: UNetModel / AutoencoderKL, diffusion_loss + optax AdamW, make_sample_fn (one lax.scan)."""

    def __init__(self):
        import jax

        self.jax = jax
        self.state: dict[str, Any] = {}
        self.weights: dict[str, tuple[Any, float]] = {}

    def info(self) -> dict[str, Any]:
        import flax
        import jax

        return {"versions": {"jax": jax.__version__, "flax": flax.__version__},
                "device": str(jax.devices()[0].device_kind), "platform": jax.default_backend()}

    # -- building blocks ------------------------------------------------------------------------------------
    def _unet(self, case: dict[str, Any]):
        import jax.numpy as jnp

        from ldm_jax.models.latent_diffusion import default_attention_impl
        from ldm_jax.models.unet import UNetModel

        kw = spec.ours_unet_kwargs(case)
        if case.get("gpu"):
            kw["dtype"] = jnp.bfloat16
        kw["attention_impl"] = case.get("attention_impl") or default_attention_impl(kw.get("dtype", jnp.float32))
        return UNetModel(**kw)

    def _sched(self, case: dict[str, Any]):
        from ldm_jax.diffusion.schedules import DiffusionSchedule, make_beta_schedule

        s = case["schedule"]
        return DiffusionSchedule.from_betas(make_beta_schedule("linear", s["num_timesteps"], s["beta_start"],
                                                               s["beta_end"]))

    def _params(self, model: Any, args: tuple, case: dict[str, Any], converter: str) -> tuple[Any, dict]:
        """Converted torch-peer weights when the case names a weights file, else random params."""
        jax = self.jax
        abstract = jax.eval_shape(lambda k: model.init(k, *args), jax.random.key(0))["params"]
        extra: dict[str, Any] = {"params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract)))}
        path = case.get("weights")
        if path:
            try:
                t0 = time.perf_counter()
                if path not in self.weights:  # one conversion + output check per network
                    self.weights[path] = self._load_and_check(model, abstract, path, converter)
                params, diff = self.weights[path]
                params = jax.tree.map(jax.numpy.asarray, params)
                extra.update(weights="torch peer's, converted by ldm_jax.convert", max_abs_diff_vs_torch=diff,
                             weights_s=time.perf_counter() - t0)
                return params, extra
            except Exception as e:  # the converter is optional here: fall back to random weights
                extra["weights_error"] = f"{type(e).__name__}: {e}"[:300]
        extra["weights"] = "random"
        return jax.tree.map(jax.numpy.asarray, random_params(abstract)), extra

    def _load_and_check(self, model: Any, abstract: Any, path: str, converter: str) -> tuple[Any, float]:
        import jax.numpy as jnp

        data = np.load(path)
        cfg = json.loads(str(data["__config__"]))
        state = {k: data[k] for k in data.files if not k.startswith("__")}
        if converter == "unet":
            from ldm_jax.convert import unet as conv

            params = conv.convert_unet(state, conv.config_from_diffusers(cfg), "diffusers")
            x = jnp.asarray(data["__x__"]).transpose(0, 2, 3, 1)
            out = model.apply({"params": params}, x, jnp.asarray(data["__t__"]), jnp.asarray(data["__ctx__"]))
        else:
            from ldm_jax.convert import autoencoder as conv

            params = conv.convert_autoencoder(state, conv.config_from_diffusers(cfg), "diffusers")
            x = jnp.asarray(data["__x__"]).transpose(0, 2, 3, 1)
            out = model.apply({"params": params}, x, method=lambda m, x: m.decode(m.encode(x).mode()))
        ref = data["__out__"].transpose(0, 2, 3, 1)
        leaves = self.jax.tree.leaves(abstract)
        got = self.jax.tree.leaves(params)
        if [tuple(a.shape) for a in leaves] != [tuple(np.shape(b)) for b in got]:
            raise ValueError("converted params do not match the model's shapes")
        # Kept on the host: on accelerators a train step donates (deletes) the device copies it is given.
        return params, float(np.max(np.abs(np.asarray(out, np.float32) - ref)))

    def _compile(self, fn, args: tuple, donate: tuple = ()) -> tuple[Any, dict[str, Any]]:
        t0 = time.perf_counter()
        lowered = self.jax.jit(fn, donate_argnums=donate).lower(*args)
        compiled = lowered.compile()
        return compiled, {"compile_s": time.perf_counter() - t0, **compiled_report(compiled, lowered)}

    def _train_step(self, case: dict[str, Any], unet_params: Any, x0: Any, ctx: Any) -> tuple[Any, dict]:
        """The stage-2 step train.py compiles for a latent-cache run: posterior sample from stored moments,
        condition dropout, eps loss, the non-finite guard around AdamW, EMA, the state donated, the config's
        attention default for this backend (model.unet.attention_impl '' unless --attention-impl pins one).
        The context is given in the batch (model.cond_stage 'context') as the peers give theirs."""
        jax, jnp = self.jax, self.jax.numpy
        from ldm_jax import workdir as W
        from ldm_jax.config_defaults import autoencoder_config, ldm_config
        from ldm_jax.models.autoencoder import AutoencoderKL
        from ldm_jax.training import common
        from ldm_jax.training import ldm as L
        from ldm_jax.training import mesh as mesh_lib

        u, c, s = case["unet"], case["in_channels"], case["schedule"]
        cfg = ldm_config()
        cfg.model.update(conditioning_key="crossattn", cond_stage="context", context_dim=u["context_dim"],
                         dtype="bfloat16" if case.get("gpu") else "float32")
        cfg.model.unet.update(in_channels=c, out_channels=c, model_channels=u["model_channels"],
                              channel_mult=tuple(u["channel_mult"]), num_res_blocks=u["num_res_blocks"],
                              attention_resolutions=tuple(u["attention_resolutions"]), num_heads=-1,
                              num_head_channels=u["num_head_channels"],
                              attention_impl=case.get("attention_impl") or "")
        cfg.diffusion.update(schedule="linear", num_timesteps=s["num_timesteps"], linear_start=s["beta_start"],
                             linear_end=s["beta_end"])
        cfg.train.update(base_lr=case["train"]["lr"], weight_decay=case["train"]["weight_decay"], scale_lr=False,
                         warmup_steps=0, batch_size=case["batch"])
        ae = autoencoder_config("kl")
        ae.model.embed_dim = c
        fs = W.FirstStage(AutoencoderKL(embed_dim=c), {}, ae, "")  # only from_moments runs: no encoder
        model, tx, sched = W.build_model(cfg, fs), L.make_optimizer(cfg), W.make_schedule(cfg)
        params = {"unet": unet_params}
        state = L.LDMState(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree.map(jnp.copy, params),
                           opt_state=tx.init(params), scale_factor=jnp.float32(1.0),
                           skipped=jnp.zeros((), jnp.int32))
        # Stored moments: the latents as the posterior mean, a typical log-variance.
        batch = {"moments": jnp.concatenate([x0, jnp.full_like(x0, -6.0)], -1), "context": ctx}
        mesh = mesh_lib.make_mesh(cfg.mesh)
        state_sh = mesh_lib.state_shardings(jax.eval_shape(lambda: state), mesh, cfg.mesh.min_shard_size)
        rep = mesh_lib.replicated(mesh)
        state = jax.device_put(state, state_sh)
        compiled, report = common.compile_step(
            L.make_train_step(cfg, model, fs, tx, sched), (state, batch, {}, None),
            (state_sh, mesh_lib.batch_sharding(mesh), {}, None), (state_sh, rep), name="bench_ldm_step")
        rep_out = {"compile_s": report["compile_s"], **compiled_report(compiled),
                   "attention_impl": model.unet_kwargs["attention_impl"]}
        st = {"state": state}

        def run():
            st["state"], metrics = compiled(st["state"], batch, {}, None)
            metrics["loss"].block_until_ready()

        return run, rep_out

    # -- cases --------------------------------------------------------------------------------------------------
    def setup(self, case: dict[str, Any]) -> dict[str, Any]:
        jax, jnp = self.jax, self.jax.numpy
        kind, name = case["kind"], case["name"]
        key = jax.random.key(0)
        if kind in ("unet_train", "ddim"):
            from ldm_jax.diffusion.generate import make_sample_fn

            model, sched = self._unet(case), self._sched(case)
            b, s, c = case["batch"], case["size"], case["in_channels"]
            x0 = jax.random.normal(key, (b, s, s, c), jnp.float32)
            ctx = jax.random.normal(jax.random.key(1), spec.context_shape(case), jnp.float32)
            params, extra = self._params(model, (x0[:1], jnp.zeros((1,), jnp.int32), ctx[:1]), case, "unet")
            if kind == "unet_train":
                run, rep = self._train_step(case, params, x0, ctx)
                extra["step"] = "train.py's stage-2 step (training/ldm.make_train_step, compiled as Run.compile)"
            else:
                sample = make_sample_fn(lambda p, x, t, c: model.apply({"params": p}, x, t, c), sched, "ddim",
                                        steps=case["steps"], guidance=case["guidance"],
                                        shared_x=case.get("shared_x", True))
                uncond = jnp.zeros_like(ctx)
                fn = lambda p, c, u, k: sample(p, c, u, k, x0.shape)  # noqa: E731
                compiled, rep = self._compile(fn, (params, ctx, uncond, key))
                # XLA's cost analysis counts a while-loop body once: scale by the number of steps.
                rep["gflop"] = rep.get("gflop", 0.0) * case["steps"]
                rep["gflop_note"] = "scan body x steps"

                def run():
                    compiled(params, ctx, uncond, key).block_until_ready()
        elif kind in ("ae_encode", "ae_decode"):
            from ldm_jax.models.autoencoder import AutoencoderKL

            kw = spec.ours_ae_kwargs(case)
            if case.get("gpu"):
                kw["dtype"] = jnp.bfloat16
            model = AutoencoderKL(**kw)
            b, s = case["batch"], case["size"]
            x = jax.random.uniform(key, (b, s, s, 3), jnp.float32, -1.0, 1.0)
            params, extra = self._params(model, (x[:1],), case, "ae")
            if kind == "ae_encode":
                fn = lambda p, x: model.apply({"params": p}, x, method=lambda m, x: m.encode(x).mode())  # noqa
                arg = x
            else:
                fn = lambda p, z: model.apply({"params": p}, z, method=lambda m, z: m.decode(z))  # noqa: E731
                ls = spec.latent_size(case)
                arg = jax.random.normal(key, (b, ls, ls, case["ae"]["embed_dim"]), jnp.float32)
            compiled, rep = self._compile(fn, (params, arg))

            def run():
                compiled(params, arg).block_until_ready()
        else:
            raise ValueError(f"unknown case kind {kind!r}")
        self.state[name] = run
        return {**rep, **extra}

    def run(self, name: str) -> None:
        self.state[name]()

    def teardown(self, name: str) -> None:
        self.state.pop(name, None)
        gc.collect()

    def matmul(self, n: int, reps: int) -> float:
        """Dense float32 (bfloat16 on GPU) n x n x n matmul rate, GFLOP/s (median of `reps`)."""
        jax, jnp = self.jax, self.jax.numpy
        dt = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
        a = jax.random.normal(jax.random.key(0), (n, n), dt)
        b = jax.random.normal(jax.random.key(1), (n, n), dt)
        f = jax.jit(lambda a, b: jnp.dot(a, b, precision="highest"))
        f(a, b).block_until_ready()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f(a, b).block_until_ready()
            ts.append(time.perf_counter() - t0)
        return 2 * n**3 / float(np.median(ts)) / 1e9


if __name__ == "__main__":
    protocol.serve(OursSide)
