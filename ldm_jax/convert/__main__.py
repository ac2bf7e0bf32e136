"""Convert pretrained weights into ldm_jax workdirs.

python -m ldm_jax.convert SRC --out OUT [--format auto|compvis|diffusers] [--original-config v1-inference.yaml]
    [--num-heads N | --num-head-channels N] [--weights ema|raw] [--tokenizer DIR_OR_BPE] [--scale-factor F]
    [--resolution R] [--parameterization eps|v|x0] [--trainable]

SRC: a CompVis LDM / Stable Diffusion v1 .ckpt or .safetensors (or a first-stage autoencoder .ckpt), or a diffusers
folder (model_index.json with vae|vqvae, unet, text_encoder, tokenizer, scheduler; or a single vae folder).
Writes OUT/autoencoder and OUT/ldm (+ OUT/conversion.json); then
    python sample.py --workdir OUT/ldm --prompt "a photo of an astronaut" --guidance 7.5 --out samples/
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ldm_jax.convert", description=__doc__.split("\n")[0])
    p.add_argument("src", help="checkpoint file (.ckpt/.safetensors) or diffusers folder")
    p.add_argument("--out", required=True, help="output directory: OUT/autoencoder and OUT/ldm are written")
    p.add_argument("--format", default="auto", choices=("auto", "compvis", "diffusers"))
    p.add_argument("--original-config", default=None, help="CompVis yaml of the checkpoint (architecture, schedule)")
    p.add_argument("--num-heads", type=int, default=None, help="CompVis UNet attention heads (not in the weights)")
    p.add_argument("--num-head-channels", type=int, default=None, help="... or channels per head")
    p.add_argument("--weights", default="ema", choices=("ema", "raw"), help="CompVis files with both: which to sample")
    p.add_argument("--tokenizer", default=None, help="CLIP tokenizer dir or bpe_simple_vocab_16e6.txt.gz")
    p.add_argument("--scale-factor", type=float, default=None, help="latent scale (default: from the source)")
    p.add_argument("--resolution", type=int, default=None, help="image size sampled by default")
    p.add_argument("--parameterization", default=None, choices=("eps", "v", "x0"))
    p.add_argument("--trainable", action="store_true",
                   help="also keep the non-EMA UNet weights (fine-tuning starts from them)")
    return p.parse_args(argv)


def detect_format(src: str) -> str:
    """'diffusers' for a folder, 'compvis' for a file."""
    if os.path.isdir(src):
        return "diffusers"
    if os.path.isfile(src):
        return "compvis"
    raise FileNotFoundError(f"SRC: no such file or folder: {src}")


def main(argv: list[str] | None = None) -> int:
    """Runs the conversion; returns the exit status (bad input: the error on stderr, status 2)."""
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ldm_jax.convert.core import ConversionError
    from ldm_jax.convert.sources import from_compvis, from_diffusers
    from ldm_jax.convert.workdir import write_workdirs

    t0 = time.time()
    try:
        fmt = detect_format(args.src) if args.format == "auto" else args.format
        if fmt == "diffusers":
            conv = from_diffusers(args.src, args.tokenizer, args.scale_factor, args.resolution)
        else:
            conv = from_compvis(args.src, args.original_config, args.num_heads, args.num_head_channels,
                                args.weights, args.tokenizer, args.scale_factor, args.resolution,
                                args.parameterization, args.trainable)
        written = write_workdirs(conv, args.out, args.trainable, os.path.abspath(args.src))
    except (ConversionError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    for name, n in conv.report.converted.items():
        print(f"{name}: {n} tensors converted")
    for reason, keys in conv.report.ignored.items():
        print(f"left aside ({len(keys)}): {reason}")
    for note in conv.notes:
        print(f"note: {note}")
    print(f"wrote {', '.join(f'{k}={v}' for k, v in written.items())} in {time.time() - t0:.1f} s")
    if "ldm" in written:
        print(f"sample: python sample.py --workdir {written['ldm']} --out samples/ --num_samples 4")
    return 0


if __name__ == "__main__":
    sys.exit(main())
