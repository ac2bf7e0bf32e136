"""Tiny train.py configs for the scale-out / resume tests: `--config=tests/tiny_config.py:ae` (or `:ldm`)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from scaleout_utils import tiny_ae_config, tiny_ldm_config  # noqa: E402


def get_config(arg: str = "ae"):
    if arg == "ae":
        return tiny_ae_config()
    if arg == "ldm":
        return tiny_ldm_config("")
    raise ValueError(f"tests/tiny_config.py: unknown config {arg!r} (ae or ldm)")
