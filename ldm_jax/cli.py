"""Command-line flags shared by sample.py and eval.py. Imports no JAX: the entry points parse their flags before
they set the XLA flags and import JAX."""

from __future__ import annotations

import argparse

SAMPLING_FLAGS = ("sampler", "steps", "eta", "guidance", "spacing", "karras", "order", "guidance_rescale")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """--sampler --steps --eta --guidance --spacing --karras --order --guidance_rescale; each defaults to None,
    which means the model config's `sampling` value (inference.sampling_options)."""
    p.add_argument("--sampler", default=None,
                   help="ddim | ddpm | plms | dpmpp_2m | dpmpp_2m_sde | euler | euler_a | unipc "
                   "(default: the config's sampling.sampler)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (ddpm uses all T; default: the config's)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (0: deterministic; default: the config's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (1: none; default: the config's)")
    p.add_argument("--spacing", default=None, help="timestep spacing: uniform | quad (ddim/plms) | linspace | "
                   "leading | trailing (default: the config's; '' = the sampler's own)")
    p.add_argument("--karras", action="store_true", default=None, help="Karras sigmas (dpmpp_*, euler, unipc)")
    p.add_argument("--order", type=int, default=None, help="unipc order: 1, 2 or 3 (default: the config's)")
    p.add_argument("--guidance_rescale", type=float, default=None, help="guidance rescale phi in [0, 1]")
