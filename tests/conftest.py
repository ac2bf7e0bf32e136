"""Test-wide setup: 8 forced host devices so sharding tests run on one CPU."""

import os

# Must be set before jax is imported anywhere in the test session.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
from ldm_jax.xla_flags import set_default_xla_flags  # noqa: E402

set_default_xla_flags()  # the same fast CPU convolutions as train.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
