#!/usr/bin/env bash
# The main job, end to end on the embedded Fashion-MNIST: set-up, stage 1 (autoencoder), stage 2 (class-
# conditional latent diffusion with classifier-free guidance), then a guided sample grid with sample.py.
# Re-running reuses finished stages (each train run resumes from its last checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs}
[ "${SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh  # SKIP_SETUP=1 PY=... to reuse an environment
PY=${PY:-.venv/bin/python}
export TF_CPP_MIN_LOG_LEVEL=2
SECONDS=0
echo "== stage 1: autoencoder -> $RUNS/ae"
$PY train.py --config configs/demo_autoencoder.py --workdir "$RUNS/ae" "$@"
echo "== stage 2: class-conditional LDM -> $RUNS/ldm"
$PY train.py --config configs/demo_ldm.py --workdir "$RUNS/ldm" --config.first_stage.workdir="$RUNS/ae"
echo "== samples: $RUNS/samples (one row per class; the config's sampling: DPM-Solver++ 2M, 10 steps, guidance 3)"
$PY sample.py --workdir "$RUNS/ldm" --num_samples 100 --batch_size 100 --out "$RUNS/samples"
echo "train + sample: $SECONDS s"
echo "stage-1 metrics: $(cat "$RUNS/ae/metrics.json" | tr -d '\n ')"
echo "stage-2 metrics: $(cat "$RUNS/ldm/metrics.json" | tr -d '\n ')"
echo "grids: $RUNS/ae/reconstructions.png $RUNS/ldm/samples.png $RUNS/samples/grid.png"
