"""`python -m ldm_jax.bench`: see ldm_jax/bench/runner.py and docs/benchmarks.md."""

import sys

from ldm_jax.bench.runner import main

sys.exit(main())
