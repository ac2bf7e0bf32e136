"""Study: perceptual compression factor f for the diffusion model at equal training wall-clock (paper Fig. 6 and
Table 6: LDM-1 in pixel space trains and samples far slower, LDM-4/8 reach better FID at equal compute).

LDM-1 diffuses pixels through a parameter-free identity first stage (scale 1, as a pixel-space DDPM); LDM-2/4/8
use the KL autoencoders of studies/first_stage.py (trained here first if missing). Every LDM is the demo
class-conditional UNet (configs/demo_ldm.py: 32 channels, mult (1, 2), attention at ds 1 and 2), trained by the
library's stage-2 step for the same wall-clock seconds (compilation excluded), then sampled with DDIM.

python studies/compression.py [--budget_s 120] [--factors 1,2,4,8] [--num_samples 500] [--guidance 1]
-> studies/results/compression.json, compression.png, compression_samples.png
"""

from __future__ import annotations

import argparse
import os
import time

import _common as C
from first_stage import RUNS, workdir_for


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget_s", type=float, default=120.0, help="training wall-clock seconds per model")
    p.add_argument("--factors", default="1,2,4,8")
    p.add_argument("--batch_size", type=int, default=64, help="training batch")
    p.add_argument("--num_samples", type=int, default=500)
    p.add_argument("--sample_batch", type=int, default=100)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--ae_steps", type=int, default=300, help="stage-1 steps if a KL-f workdir must be trained")
    p.add_argument("--first_stage_runs", default=RUNS, help="studies/first_stage.py's --runs")
    p.add_argument("--num_real", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=C.RESULTS)
    args = p.parse_args(argv)

    from ldm_jax.evaluate_workdir import evaluate_ldm, real_stats
    from ldm_jax.evaluation.classifier import get_or_train_classifier
    from ldm_jax.evaluation.evaluate import MAX_RESERVOIR, make_feature_extractor
    from ldm_jax.workdir import load_first_stage

    t0 = time.time()
    extractor = make_feature_extractor("fmnist")
    _, logits_fn = get_or_train_classifier()
    real = None
    runs, rows = [], []
    for f in (int(x) for x in args.factors.split(",")):
        if f == 1:
            fs = C.identity_first_stage(32, 1)
        else:
            wd = workdir_for("kl", f, args.first_stage_runs)
            if not os.path.isfile(os.path.join(wd, "config.json")):
                C.log(f"no KL-f{f} first stage at {wd}: training it ({args.ae_steps} steps)")
                C.train_autoencoder(C.autoencoder_config("kl", f), wd, args.ae_steps)
            fs = load_first_stage(wd)
        config = C.ldm_config(fs, args.batch_size)
        if real is None:
            real = real_stats(config.data, extractor, args.num_real, args.sample_batch,
                              min(MAX_RESERVOIR, args.num_samples), logits_fn=logits_fn)
        C.log(f"LDM-{f}: training for {args.budget_s:.0f} s")
        ldm, info = C.train_ldm_for(config, fs, args.budget_s)
        C.log(f"LDM-{f}: {info['train_steps']} steps ({info['train_steps_per_s']:.2f}/s), latents "
              f"{info['latent_shape']}, loss {info['final_loss']:.4f}")
        ev = evaluate_ldm(ldm=ldm, num_samples=args.num_samples, batch_size=args.sample_batch, sampler="ddim",
                          steps=args.steps, eta=0.0, guidance=args.guidance, real=real, seed=args.seed,
                          keep_images=20)
        rows.append(ev.pop("images"))
        run = {"model": f"LDM-{f}", "f": f, "first_stage": fs.workdir, **info,
               **{k: ev.get(k) for k in ("fd_fmnist", "kid_fmnist", "precision_fmnist", "recall_fmnist",
                                         "conditional_accuracy", "samples_per_s", "sampling_seconds")}}
        runs.append(run)
        C.write_result("compression", {"study": "compression", "partial": True, "runs": runs}, args.out)
        C.log(f"LDM-{f}: fd_fmnist {run['fd_fmnist']:.2f} acc {run['conditional_accuracy']:.3f} "
              f"{run['samples_per_s']:.1f} samples/s")
    result = {"study": "compression", "machine": C.machine(), "budget_s": args.budget_s,
              "batch_size": args.batch_size, "num_samples": args.num_samples,
              "sampler": f"ddim {args.steps} steps, eta 0, guidance {args.guidance:g}", **(real[1] if real else {}),
              "seconds": time.time() - t0, "runs": runs}
    C.write_result("compression", result, args.out)

    plt = C.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.9))
    names = [r["model"] for r in runs]
    for ax, key, title in ((axes[0], "fd_fmnist", "fd_fmnist ↓"), (axes[1], "conditional_accuracy", "cond. accuracy ↑"),
                           (axes[2], None, "throughput")):
        if key:
            ax.bar(names, [r[key] for r in runs], color="C0")
        else:
            xs = range(len(runs))
            ax.bar([x - 0.2 for x in xs], [r["train_steps_per_s"] for r in runs], width=0.4, label="train steps/s")
            ax.bar([x + 0.2 for x in xs], [r["samples_per_s"] for r in runs], width=0.4, label="samples/s")
            ax.set_xticks(list(xs), names)
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"LDM-f at {args.budget_s:.0f} s training each (batch {args.batch_size}), {C.machine()}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "compression.png"), dpi=120)
    plt.close(fig)
    C.sample_rows_png(rows, names, os.path.join(args.out, "compression_samples.png"))
    return result


if __name__ == "__main__":
    main()
