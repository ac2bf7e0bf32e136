"""Evaluate a trained workdir into a JSON of metrics (the stage is read from WORKDIR/config.json).

python eval.py --workdir runs/ae  --json ae_eval.json  [--num_samples 2000] [--feature fmnist]
python eval.py --workdir runs/ldm --json ldm_eval.json [--num_samples 1000] [--batch_size 100] \
    [--sampler ddim --steps 50 --eta 0 --guidance 3.0] [--feature fmnist|inception] [--inception_weights PATH]

Stage 1: psnr, ssim, lpips, rfd_fmnist (or rfid). Stage 2: fd_fmnist, kid_fmnist, precision/recall_fmnist (or
fid, kid_inception, …: true FID needs InceptionV3 FID weights, else the JSON says why it is unavailable),
conditional_accuracy for class-conditional Fashion-MNIST models, samples_per_s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ldm_jax.cli import SAMPLING_FLAGS, add_sampling_flags


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="training workdir (config.json + checkpoints)")
    p.add_argument("--json", required=True, help="where to write the metrics")
    p.add_argument("--num_samples", type=int, default=None,
                   help="held-out images (stage 1, default 2000) or samples (stage 2, default 1000)")
    p.add_argument("--batch_size", type=int, default=100)
    add_sampling_flags(p)
    p.add_argument("--feature", default="fmnist", help="fmnist (Fashion-MNIST classifier) | inception (true FID)")
    p.add_argument("--inception_weights", default=None, help="pytorch-fid pt_inception-*.pth (or .npz/.safetensors)")
    p.add_argument("--lpips_weights", default=None, help="LPIPS .npz (default: ~/.cache/ldm_jax/lpips_vgg16.npz)")
    p.add_argument("--num_real", type=int, default=None, help="held-out real images for stage 2 (default 10000)")
    p.add_argument("--first_stage", default=None, help="stage-1 workdir (default: the one the config names)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Runs eval.py; returns the exit status (bad input: one line on stderr, status 2)."""
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ldm_jax.xla_flags import set_default_xla_flags

    set_default_xla_flags()  # before jax is imported
    from ldm_jax.evaluate_workdir import evaluate_workdir, write_json

    opts = {k: getattr(args, k) for k in ("num_samples", "batch_size", *SAMPLING_FLAGS, "feature",
                                          "inception_weights", "lpips_weights", "num_real", "first_stage", "seed")}
    try:
        result = evaluate_workdir(args.workdir, **opts)
    except (ValueError, FileNotFoundError) as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    write_json(result, args.json)
    shown = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in shown.items()}))
    for key, why in result.get("unavailable", {}).items():
        print(f"{key} unavailable: {why}")
    print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
