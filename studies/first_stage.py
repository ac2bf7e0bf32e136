"""Study: first-stage downsampling factor f and regularisation (KL vs VQ) vs reconstruction quality, a
Fashion-MNIST version of the paper's Table 8 (rFID / PSNR / PSIM / SSIM of its autoencoders).

Every model is the demo stage-1 architecture (configs/demo_autoencoder.py: ch 16, 1 res block, 4 latent
channels; VQ: 256 codes) at ch_mult (1,2) / (1,2,4) / (1,2,4,4), trained for the same number of steps of the
library's stage-1 step, then evaluated by ldm_jax.evaluate_workdir on held-out test images.

python studies/first_stage.py [--steps 300] [--factors 2,4,8] [--kinds kl,vq] [--num_eval 1000]
-> runs/studies/first_stage/{kl,vq}_f{2,4,8}/ (workdirs, reused by studies/compression.py),
   studies/results/first_stage.json, first_stage.png
"""

from __future__ import annotations

import argparse
import os
import time

import _common as C

RUNS = os.path.join(C.REPO, "runs", "studies", "first_stage")


def workdir_for(kind: str, f: int, runs: str = RUNS) -> str:
    return os.path.join(runs, f"{kind}_f{f}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300, help="training steps per model (batch --batch_size)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--channels", type=int, default=16, help="base channels (ch)")
    p.add_argument("--factors", default="2,4,8")
    p.add_argument("--kinds", default="kl,vq")
    p.add_argument("--disc_start", type=int, default=1000,
                   help="first PatchGAN step (the demo's 1000; shorter runs are L1 + KL/VQ only)")
    p.add_argument("--num_eval", type=int, default=1000, help="held-out test images per model")
    p.add_argument("--runs", default=RUNS, help="where the stage-1 workdirs go")
    p.add_argument("--out", default=C.RESULTS)
    args = p.parse_args(argv)

    from ldm_jax.evaluate_workdir import evaluate_autoencoder

    t0 = time.time()
    runs = []
    for kind in args.kinds.split(","):
        for f in (int(x) for x in args.factors.split(",")):
            cfg = C.autoencoder_config(kind, f, channels=args.channels, batch_size=args.batch_size)
            cfg.loss.disc_start = args.disc_start
            wd = workdir_for(kind, f, args.runs)
            C.log(f"{kind}-f{f}: training {args.steps} steps -> {wd}")
            info = C.train_autoencoder(cfg, wd, args.steps)
            ev = evaluate_autoencoder(wd, num_samples=args.num_eval, batch_size=100)
            side = cfg.data.resolution // f
            run = {"model": f"{kind}-f{f}", "kind": kind, "f": f,
                   "latent": f"{side}x{side}x{cfg.model.embed_dim}",
                   "compression": cfg.data.resolution**2 * cfg.data.channels / (side * side * cfg.model.embed_dim),
                   **{k: info[k] for k in ("steps", "train_seconds", "steps_per_s", "compile_seconds")},
                   **{k: ev.get(k) for k in ("psnr", "ssim", "lpips", "rfd_fmnist", "rkid_fmnist",
                                             "rprecision_fmnist", "rrecall_fmnist")},
                   "unavailable": ev["unavailable"], "workdir": wd}
            runs.append(run)
            C.write_result("first_stage", {"study": "first_stage", "partial": True, "runs": runs}, args.out)
            lp = "n/a" if run["lpips"] is None else f"{run['lpips']:.4f}"
            C.log(f"{kind}-f{f}: PSNR {run['psnr']:.2f} SSIM {run['ssim']:.3f} LPIPS {lp} "
                  f"rFD {run['rfd_fmnist']:.3f} ({info['steps_per_s']:.2f} steps/s)")
    result = {"study": "first_stage", "machine": C.machine(), "steps": args.steps, "batch_size": args.batch_size,
              "channels": args.channels, "disc_start": args.disc_start, "num_eval": args.num_eval,
              "seconds": time.time() - t0, "runs": runs}
    C.write_result("first_stage", result, args.out)

    plt = C.pyplot()
    metrics = [("psnr", "PSNR (dB) ↑"), ("ssim", "SSIM ↑"), ("lpips", "LPIPS ↓"), ("rfd_fmnist", "rFD fmnist ↓")]
    fig, axes = plt.subplots(1, 4, figsize=(11, 2.8))
    factors = sorted({r["f"] for r in runs})
    for ax, (key, title) in zip(axes, metrics, strict=True):
        for i, kind in enumerate(args.kinds.split(",")):
            vals = [next((r[key] for r in runs if r["f"] == f and r["kind"] == kind), None) for f in factors]
            xs = [j + (i - 0.5) * 0.38 for j in range(len(factors))]
            ax.bar(xs, [float("nan") if v is None else v for v in vals], width=0.36, label=kind.upper())
        ax.set_xticks(range(len(factors)), [f"f={f}" for f in factors])
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"stage 1 on Fashion-MNIST: {args.steps} steps × batch {args.batch_size} each, {C.machine()}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "first_stage.png"), dpi=120)
    plt.close(fig)
    return result


if __name__ == "__main__":
    main()
