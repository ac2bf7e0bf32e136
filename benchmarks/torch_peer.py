"""Benchmark worker for diffusers on PyTorch (`python -m benchmarks.torch_peer`), eager mode, SDPA attention.

CPU: float32, torch's default intra-op threads. GPU (case["gpu"]): CUDA with bfloat16 autocast (fp32 weights), the
mixed-precision counterpart of ours (fp32 params, bf16 compute).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import time
from typing import Any

import numpy as np

from benchmarks import protocol, spec


class TorchSide:
    """diffusers UNet2DConditionModel / AutoencoderKL / DDIMScheduler with torch.optim.AdamW."""

    def __init__(self):
        import diffusers  # noqa: F401  (fail here, at start-up, if absent)
        import torch

        self.torch = torch
        self.state: dict[str, Any] = {}
        self.dev = "cuda" if os.environ.get("LDM_BENCH_GPU") == "1" else "cpu"

    def info(self) -> dict[str, Any]:
        import diffusers

        t = self.torch
        return {"versions": {"torch": t.__version__, "diffusers": diffusers.__version__},
                "threads": t.get_num_threads(), "cuda": t.cuda.is_available()}

    def _sync(self) -> None:
        if self.dev == "cuda":
            self.torch.cuda.synchronize()

    def _autocast(self):
        if self.dev == "cuda":
            return self.torch.autocast("cuda", dtype=self.torch.bfloat16)
        return contextlib.nullcontext()

    def _count_flops(self, fn) -> float:
        """GFLOP of one call by torch's FlopCounterMode (matmul/conv/attention only), -1 if unavailable."""
        try:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as fc:
                fn()
            return fc.get_total_flops() / 1e9
        except Exception:
            return -1.0

    def setup(self, case: dict[str, Any]) -> dict[str, Any]:
        torch = self.torch
        self.dev = "cuda" if case.get("gpu") else "cpu"
        dev, kind, name = self.dev, case["kind"], case["name"]
        torch.manual_seed(0)
        g = torch.Generator(device="cpu").manual_seed(0)
        extra: dict[str, Any] = {}
        if kind in ("unet_train", "ddim"):
            from diffusers import DDIMScheduler, UNet2DConditionModel

            model = UNet2DConditionModel(**spec.diffusers_unet_kwargs(case)).to(dev)
            b, s, c = case["batch"], case["size"], case["in_channels"]
            x0 = torch.randn(b, c, s, s, generator=g).to(dev)
            ctx = torch.randn(*spec.context_shape(case), generator=g).to(dev)
            sc = case["schedule"]
            sched = DDIMScheduler(num_train_timesteps=sc["num_timesteps"], beta_start=sc["beta_start"],
                                  beta_end=sc["beta_end"], beta_schedule="scaled_linear", clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1)
            if kind == "unet_train":
                model.train()
                opt = torch.optim.AdamW(model.parameters(), lr=case["train"]["lr"],
                                        weight_decay=case["train"]["weight_decay"])
                abar = sched.alphas_cumprod.to(dev)

                def run():
                    t = torch.randint(0, sc["num_timesteps"], (b,), device=dev)
                    noise = torch.randn_like(x0)
                    a = abar[t].view(-1, 1, 1, 1)
                    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
                    with self._autocast():
                        pred = model(xt, t, ctx).sample
                    loss = torch.mean((pred.float() - noise) ** 2)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    self._sync()
            else:
                model.eval()
                uncond = torch.zeros_like(ctx)
                c_in = torch.cat([uncond, ctx])
                gs = case["guidance"]

                @torch.inference_mode()
                def run():
                    sched.set_timesteps(case["steps"])
                    lat = torch.randn(x0.shape, generator=torch.Generator(device="cpu").manual_seed(1)).to(dev)
                    for t in sched.timesteps:
                        with self._autocast():
                            eps = model(torch.cat([lat, lat]), t, encoder_hidden_states=c_in).sample.float()
                        e_u, e_c = eps.chunk(2)
                        lat = sched.step(e_u + gs * (e_c - e_u), t, lat).prev_sample
                    self._sync()

                with torch.inference_mode():
                    one = lambda: model(torch.cat([x0, x0]), torch.full((2 * b,), 500, device=dev), c_in)  # noqa
                    extra["gflop"] = self._count_flops(one) * case["steps"]
            extra["params"] = int(sum(p.numel() for p in model.parameters()))
            self.state[name + "/model"] = model
        elif kind in ("ae_encode", "ae_decode"):
            from diffusers import AutoencoderKL

            model = AutoencoderKL(**spec.diffusers_ae_kwargs(case)).to(dev).eval()
            b, s = case["batch"], case["size"]
            x = (torch.rand(b, 3, s, s, generator=g) * 2 - 1).to(dev)
            ls = spec.latent_size(case)
            z = torch.randn(b, case["ae"]["embed_dim"], ls, ls, generator=g).to(dev)

            @torch.inference_mode()
            def run():
                with self._autocast():
                    if kind == "ae_encode":
                        model.encode(x).latent_dist.mode()
                    else:
                        model.decode(z)
                self._sync()

            extra["params"] = int(sum(p.numel() for p in model.parameters()))
            self.state[name + "/model"] = model
        else:
            raise ValueError(f"unknown case kind {kind!r}")
        if "gflop" not in extra:
            with torch.inference_mode(kind != "unet_train"):
                extra["gflop"] = self._count_flops(run)
        extra["gflop_note"] = "torch FlopCounterMode: matmul/conv/attention only"
        self.state[name] = run
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return extra

    def run(self, name: str) -> None:
        self.state[name]()

    def teardown(self, name: str) -> dict[str, Any]:
        out = {}
        if self.dev == "cuda":
            out["gpu_peak_gib"] = self.torch.cuda.max_memory_allocated() / 2**30
        self.state.pop(name, None)
        self.state.pop(name + "/model", None)
        gc.collect()
        return out

    def export_weights(self, case: dict[str, Any], path: str) -> dict[str, Any]:
        """Write the model this case builds (seed 0) + a reference output to `path` (.npz) for ours to load."""
        torch = self.torch
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(123)
        if case["kind"] in ("unet_train", "ddim"):
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel(**spec.diffusers_unet_kwargs(case)).eval()
            # diffusers zero-initialises conv_out: perturb every weight so the output check means something.
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=g))
            x = torch.randn(2, case["in_channels"], case["size"], case["size"], generator=g)
            t = torch.tensor([10, 700])
            ctx = torch.randn(*spec.context_shape(case, 2), generator=g)
            with torch.no_grad():
                out = model(x, t, ctx).sample
            extra = {"__t__": t.numpy().astype(np.int32), "__ctx__": ctx.numpy()}
        else:
            from diffusers import AutoencoderKL

            model = AutoencoderKL(**spec.diffusers_ae_kwargs(case)).eval()
            x = torch.rand(1, 3, case["size"], case["size"], generator=g) * 2 - 1
            with torch.no_grad():
                out = model.decode(model.encode(x).latent_dist.mode()).sample
            extra = {}
        state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        cfg = json.dumps({k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(model.config).items()
                          if not k.startswith("_")})
        np.savez(path, __config__=np.array(cfg), __x__=x.numpy(), __out__=out.numpy(), **extra, **state)
        return {"path": path}

    def matmul(self, n: int, reps: int) -> float:
        torch = self.torch
        dt = torch.bfloat16 if self.dev == "cuda" else torch.float32
        a = torch.randn(n, n, device=self.dev, dtype=dt)
        b = torch.randn(n, n, device=self.dev, dtype=dt)
        a @ b
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            self._sync()
            ts.append(time.perf_counter() - t0)
        return 2 * n**3 / float(np.median(ts)) / 1e9


if __name__ == "__main__":
    protocol.serve(TorchSide)
