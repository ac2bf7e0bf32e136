"""Benchmarks of ldm_jax against diffusers (PyTorch and Flax): `python -m benchmarks [--json OUT] [--quick]`.

Each side (ours, diffusers-torch, diffusers-flax) runs in its own worker process; the orchestrator (runner.py)
interleaves their timed repetitions. This package imports nothing heavy at import time, so the Flax peer's
separate virtualenv can run its worker from it too (protocol.py and spec.py use the standard library only).
"""
