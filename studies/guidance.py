"""Study: classifier-free guidance scale vs conditional accuracy and fd_fmnist (paper: guidance trades diversity
for fidelity; LDM-4-G uses s = 1.5 on ImageNet).

python studies/guidance.py --workdir runs/ldm [--scales 1,1.5,3,5] [--num_samples 500] [--steps 50] [--eta E]
-> studies/results/guidance.json, guidance.png (metrics vs scale), guidance_samples.png (one row per scale)
"""

from __future__ import annotations

import argparse
import time

import _common as C


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/ldm", help="class-conditional stage-2 workdir")
    p.add_argument("--scales", default="1,1.5,3,5")
    p.add_argument("--num_samples", type=int, default=500)
    p.add_argument("--batch_size", type=int, default=100)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default: the model's sampling.eta)")
    p.add_argument("--num_real", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=C.RESULTS)
    args = p.parse_args(argv)
    scales = [float(s) for s in args.scales.split(",")]

    from ldm_jax import inference
    from ldm_jax.evaluate_workdir import evaluate_ldm, real_stats
    from ldm_jax.evaluation.classifier import get_or_train_classifier
    from ldm_jax.evaluation.evaluate import MAX_RESERVOIR, make_feature_extractor

    t0 = time.time()
    ldm = inference.LoadedLDM.load(args.workdir)
    if ldm.config.condition.type != "class":
        raise SystemExit(f"--workdir {args.workdir} is not class-conditional (condition.type="
                         f"{ldm.config.condition.type!r})")
    extractor = make_feature_extractor("fmnist")
    _, logits_fn = get_or_train_classifier()
    real = real_stats(ldm.config.data, extractor, args.num_real, args.batch_size,
                      min(MAX_RESERVOIR, args.num_samples), logits_fn=logits_fn)
    C.log(f"real stats: {real[1]}")
    runs, rows = [], []
    for s in scales:
        r = evaluate_ldm(ldm=ldm, num_samples=args.num_samples, batch_size=args.batch_size, sampler="ddim",
                         steps=args.steps, eta=args.eta, guidance=s, real=real, seed=args.seed, keep_images=10)
        rows.append(r.pop("images"))
        runs.append(r)
        C.log(f"guidance {s}: acc {r['conditional_accuracy']:.3f} fd_fmnist {r['fd_fmnist']:.2f} "
              f"kid {r['kid_fmnist']:.4f} P {r['precision_fmnist']:.3f} R {r['recall_fmnist']:.3f} "
              f"{r['samples_per_s']:.1f} samples/s")
    result = {"study": "guidance", "workdir": ldm.workdir, "checkpoint_step": ldm.step, "machine": C.machine(),
              "num_samples": args.num_samples, "sampler": f"ddim {args.steps} steps, eta {runs[0]['eta']:g}", **real[1],
              "seconds": time.time() - t0, "runs": runs}
    C.write_result("guidance", result, args.out)

    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(scales, [r["conditional_accuracy"] for r in runs], "o-", color="C0", label="conditional accuracy")
    ax.axhline(real[1].get("real_classifier_accuracy", float("nan")), color="C0", ls=":", lw=1,
               label="judge on real test images")
    ax.set_xlabel("guidance scale s")
    ax.set_ylabel("conditional accuracy", color="C0")
    ax2 = ax.twinx()
    ax2.plot(scales, [r["fd_fmnist"] for r in runs], "s--", color="C3", label="fd_fmnist")
    ax2.set_ylabel("fd_fmnist (lower is better)", color="C3")
    fig.legend(loc="lower center", fontsize=7, ncol=3, bbox_to_anchor=(0.5, 0.0))
    ax.set_title(f"CFG on {C.os.path.basename(ldm.workdir.rstrip('/'))} (step {ldm.step}), "
                 f"{args.num_samples} samples", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(C.os.path.join(args.out, "guidance.png"), dpi=120)
    plt.close(fig)
    C.sample_rows_png(rows, [f"s={s:g}" for s in scales], C.os.path.join(args.out, "guidance_samples.png"))
    return result


if __name__ == "__main__":
    main()
