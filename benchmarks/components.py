"""Per-component rates of the benchmark UNet's building blocks: `python -m benchmarks.components [--quick]`.

Forward and forward + backward of one SpatialTransformer and a few ResBlocks at the bench UNet's shapes, each
timed on its own (median of interleaved runs) and reported as GFLOP/s from XLA's cost analysis. This is where
the session-6 profile came from (docs/benchmarks.md item 28): per-op trace events include time spent waiting for a
core, whereas a whole module timed alone does not. For one core: `XLA_FLAGS=--xla_cpu_multi_thread_eigen=false
taskset -c 0 python -m benchmarks.components`. Not a peer comparison: only ldm_jax's modules.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from benchmarks.protocol import xla_gflop
from ldm_jax.xla_flags import set_default_xla_flags


def _components(quick: bool) -> list[tuple[str, Any, tuple]]:
    import jax.numpy as jnp
    import numpy as np

    from ldm_jax.models.attention import SpatialTransformer
    from ldm_jax.models.unet import ResBlock

    rng = np.random.default_rng(0)
    arr = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    b, s, c, ctx = (2, 8, 64, 16) if quick else (8, 32, 96, 128)  # bench UNet: 96 channels, context 16 x 128
    emb = arr(b, 4 * c)
    return [
        (f"SpatialTransformer {s // 2}x{s // 2}x{2 * c}",
         SpatialTransformer(2 * c, 2 * c // 32, 32, context_dim=ctx, attention_impl="matmul"),
         (arr(b, s // 2, s // 2, 2 * c), arr(b, 16, ctx))),
        (f"ResBlock {s}x{s} {c}->{c}", ResBlock(c), (arr(b, s, s, c), emb)),
        (f"ResBlock {s}x{s} {3 * c}->{c}", ResBlock(c), (arr(b, s, s, 3 * c), emb)),
        (f"ResBlock {s // 2}x{s // 2} {2 * c}->{2 * c}", ResBlock(2 * c), (arr(b, s // 2, s // 2, 2 * c), emb)),
    ]


def run(quick: bool = False, reps: int = 11) -> list[dict[str, Any]]:
    """Time every component; returns one row per component with medians (s) and GFLOP/s."""
    import jax
    import jax.numpy as jnp

    rows = []
    for name, module, inputs in _components(quick):
        params = module.init(jax.random.key(0), *inputs)
        loss = lambda p, *a, m=module: jnp.sum(jnp.square(m.apply(p, *a)))  # noqa: E731
        lowered = {"fwd": jax.jit(module.apply).lower(params, *inputs),
                   "fwd+bwd": jax.jit(jax.grad(loss)).lower(params, *inputs)}
        fns = {k: low.compile() for k, low in lowered.items()}
        times: dict[str, list[float]] = {k: [] for k in fns}
        for f in fns.values():  # warm-up
            jax.block_until_ready(f(params, *inputs))
        for _ in range(reps):  # interleaved, so drift hits both
            for k, f in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(params, *inputs))
                times[k].append(time.perf_counter() - t0)
        row: dict[str, Any] = {"name": name}
        for k, f in fns.items():
            med, gflop = statistics.median(times[k]), xla_gflop(lowered[k], f)  # as the bench counts its cases
            row[k] = {"median_s": med, "gflop": gflop, "gflops": gflop / med if gflop else None}
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 reps (smoke test)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 11; --quick: 2)")
    args = p.parse_args(argv)
    set_default_xla_flags()
    print(table(run(args.quick, args.reps or (2 if args.quick else 11))))
    return 0


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of `run`'s rows."""
    out = ["| component | fwd ms | fwd GFLOP/s | fwd+bwd ms | fwd+bwd GFLOP/s | fwd+bwd GFLOP |",
           "|---|---|---|---|---|---|"]
    num = lambda x, fmt: "-" if x is None else format(x, fmt)  # noqa: E731  (no FLOP count from XLA)
    for r in rows:
        f, fb = r["fwd"], r["fwd+bwd"]
        out.append(f"| {r['name']} | {f['median_s'] * 1e3:.2f} | {num(f['gflops'], '.1f')} | "
                   f"{fb['median_s'] * 1e3:.2f} | {num(fb['gflops'], '.1f')} | {num(fb['gflop'], '.2f')} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
