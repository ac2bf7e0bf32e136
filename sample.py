"""Sample a trained latent diffusion model into numbered PNGs (resumable) and a grid.

python sample.py --workdir runs/ldm --num_samples 100 --batch_size 25 --sampler ddim --steps 50 --eta 0 \
    --guidance 3.0 [--class_label 7 | --prompt "a photo of a sneaker"] [--size_factor 2] [--seed 0] --out samples/ \
    [--init_noise x_T.npy] [--init_image photo.png --strength 0.75]

Labels and prompts may be repeated; sample i uses the (i mod count)-th (default: all classes, or for
Fashion-MNIST text models the training captions). Spatial conditions (low-res, inpainting, semantic) come
from test-split example i. Existing OUT/NNNNNN.png files are skipped: rerunning an interrupted command
finishes it with the files it would have written.
"""

from __future__ import annotations

import argparse
import os
import sys

from ldm_jax.cli import SAMPLING_FLAGS, add_sampling_flags


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="stage-2 training workdir (config.json + checkpoints)")
    p.add_argument("--out", required=True, help="output directory for NNNNNN.png and grid.png")
    p.add_argument("--num_samples", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=16)
    add_sampling_flags(p)
    p.add_argument("--class_label", type=int, action="append", help="class index (repeatable)")
    p.add_argument("--prompt", action="append", help="text prompt (repeatable)")
    p.add_argument("--size_factor", type=int, default=1, help="sample at this × the training latent side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--first_stage", default=None, help="stage-1 workdir (default: the one the config names)")
    p.add_argument("--init_noise", default=None, help=".npy of starting latents: (N, h, w, c), or (h, w, c) for all")
    p.add_argument("--init_image", default=None,
                   help="img2img (SDEdit, DDIM): an image file or a folder; sample i starts from image i mod count")
    p.add_argument("--strength", type=float, default=0.75,
                   help="img2img: share of the DDIM steps run from the noised image (1: nearly text-to-image)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Runs sample.py; returns the exit status (bad flags: one line on stderr, status 2)."""
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ldm_jax.xla_flags import set_default_xla_flags

    set_default_xla_flags()  # before jax is imported
    from ldm_jax import inference
    from ldm_jax import workdir as W
    from ldm_jax.data.images import load_images, load_npy
    from ldm_jax.data.pipeline import image_size

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"sample.py: error: --out {args.out} exists and is not a directory", file=sys.stderr)
        return 2
    try:
        # Everything a user can get wrong is checked against config.json before loading or compiling.
        config = W.read_config(args.workdir, "ldm")
        opts = dict(inference.sampling_options(config, **{k: getattr(args, k) for k in SAMPLING_FLAGS}),
                    class_labels=args.class_label, prompts=args.prompt, size_factor=args.size_factor)
        inference.check_sample_args(config, num_samples=args.num_samples, batch_size=args.batch_size,
                                    seed=args.seed, **opts)
        inputs, arrays = {}, {}
        if args.init_noise:
            arrays["x_T"] = load_npy(args.init_noise, "--init_noise")
            inputs["init_noise"] = os.path.abspath(args.init_noise)
        if args.init_image:
            if opts["sampler"] != "ddim":
                raise ValueError(f"--init_image (img2img) samples with DDIM, as SD's img2img script; got --sampler "
                                 f"{opts['sampler']}")
            h, w = (side * args.size_factor for side in image_size(config.data))
            arrays["init_images"] = load_images(args.init_image, h, w, int(config.data.channels))
            inputs["init_image"] = os.path.abspath(args.init_image)
            opts["strength"] = float(args.strength)
            if not 0.0 < args.strength <= 1.0:
                raise ValueError(f"--strength must be in (0, 1], got {args.strength}")
        ldm = inference.LoadedLDM.load(args.workdir, args.first_stage)
        from tqdm import tqdm

        stats = ldm.sample_to_dir(args.out, args.num_samples, args.batch_size, seed=args.seed,
                                  progress=lambda it: tqdm(it, desc="batches", unit="batch"), inputs=inputs,
                                  **arrays, **opts)
    except (ValueError, FileNotFoundError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2
    print(f"{stats['written']} written, {stats['skipped']} already there, "
          f"{stats['samples_per_s']:.2f} samples/s (incl. compile) -> {os.path.join(args.out, 'grid.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
