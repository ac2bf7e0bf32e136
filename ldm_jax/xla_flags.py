"""XLA flags that ldm_jax's entry points set before JAX starts (import and call this before importing jax)."""

from __future__ import annotations

import os
from importlib import metadata

# XLA:CPU (jaxlib 0.10) sends convolutions to YNNPACK, whose weight-gradient convolutions run ~4× slower than XLA's
# own Eigen ones on this project's AVX2 CPUs: the stage-1 demo step goes from 1.65 to 2.95 steps/s with them off
# (docs/benchmarks.md). Standalone dots (attention's batched QKᵀ, the Dense backward) are also faster outside
# YNNPACK: a transformer block fwd+bwd 159 -> 138 ms, UNet train step and guided DDIM ~4% faster (both JAX sides
# of the benchmark gain alike). The flag only touches the CPU backend, so GPU/TPU runs are unaffected.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-individual_dot",)


def _jaxlib_version() -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in metadata.version("jaxlib").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return (0,)


def set_default_xla_flags() -> str:
    """Add ldm_jax's default flags to $XLA_FLAGS unless the user already set the same flag.

    Set LDM_JAX_DEFAULT_XLA_FLAGS=0 to leave XLA_FLAGS untouched. Older jaxlibs do not know the YNNPACK flag
    (XLA aborts on unknown flags), so it is only added from jaxlib 0.10 on. Returns the resulting XLA_FLAGS.
    """
    flags = os.environ.get("XLA_FLAGS", "").split()
    if os.environ.get("LDM_JAX_DEFAULT_XLA_FLAGS", "1") != "0":
        for flag in CPU_XLA_FLAGS if _jaxlib_version() >= (0, 10) else ():
            name = flag.split("=")[0]
            if not any(f.split("=")[0] == name for f in flags):
                flags.append(flag)
    os.environ["XLA_FLAGS"] = " ".join(flags)
    return os.environ["XLA_FLAGS"]
