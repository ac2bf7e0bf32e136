"""Study: sampler and step count vs fd_fmnist and throughput (paper: DDIM with few steps is close to 1000-step
DDPM; PLMS is used for text-to-image).

python studies/samplers.py --workdir runs/ldm [--ddim_steps 10,20,50,100] [--plms_steps 50] [--num_samples 500]
-> studies/results/samplers.json, samplers.png (fd_fmnist and samples/s per sampler/steps)
"""

from __future__ import annotations

import argparse
import time

import _common as C


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/ldm", help="stage-2 workdir")
    p.add_argument("--ddim_steps", default="10,20,50,100")
    p.add_argument("--ddim_etas", default="0,1", help="DDIM eta values, each at every --ddim_steps")
    p.add_argument("--plms_steps", default="50")
    p.add_argument("--ddpm", type=int, default=1, help="1: include 1000-step DDPM (the slowest run by far)")
    p.add_argument("--num_samples", type=int, default=500)
    p.add_argument("--ddpm_samples", type=int, default=None, help="fewer samples for DDPM (default: --num_samples)")
    p.add_argument("--batch_size", type=int, default=100)
    p.add_argument("--guidance", type=float, default=None, help="default: the model's sampling.guidance")
    p.add_argument("--num_real", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=C.RESULTS)
    args = p.parse_args(argv)

    from ldm_jax import inference
    from ldm_jax.evaluate_workdir import evaluate_ldm, judge_for, real_stats
    from ldm_jax.evaluation.classifier import get_or_train_classifier
    from ldm_jax.evaluation.evaluate import MAX_RESERVOIR, make_feature_extractor

    t0 = time.time()
    ldm = inference.LoadedLDM.load(args.workdir)
    guidance = float(ldm.config.sampling.get("guidance", 1.0) if args.guidance is None else args.guidance)
    extractor = make_feature_extractor("fmnist")
    logits_fn = get_or_train_classifier()[1] if judge_for(ldm.config) else None
    real = real_stats(ldm.config.data, extractor, args.num_real, args.batch_size,
                      min(MAX_RESERVOIR, args.num_samples), logits_fn=logits_fn)
    settings = [("ddim", int(s), float(e)) for e in args.ddim_etas.split(",") if e
                for s in args.ddim_steps.split(",") if s]
    settings += [("plms", int(s), 0.0) for s in args.plms_steps.split(",") if s]
    if args.ddpm:
        settings.append(("ddpm", int(ldm.config.diffusion.num_timesteps), 1.0))
    runs = []
    for sampler, steps, eta in settings:
        n = args.ddpm_samples if sampler == "ddpm" and args.ddpm_samples else args.num_samples
        r = evaluate_ldm(ldm=ldm, num_samples=n, batch_size=args.batch_size, sampler=sampler, steps=steps,
                         eta=eta, guidance=guidance, real=real, seed=args.seed)
        r["eta"] = eta
        runs.append(r)
        acc = r.get("conditional_accuracy")
        C.log(f"{sampler} {steps} eta {eta:g}: fd_fmnist {r['fd_fmnist']:.2f} kid {r['kid_fmnist']:.4f} "
              f"{'' if acc is None else f'acc {acc:.3f} '}{r['samples_per_s']:.2f} samples/s")
    result = {"study": "samplers", "workdir": ldm.workdir, "checkpoint_step": ldm.step, "machine": C.machine(),
              "guidance": guidance, "num_samples": args.num_samples, **real[1], "seconds": time.time() - t0,
              "runs": runs}
    C.write_result("samplers", result, args.out)

    plt = C.pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(8, 3.2))
    curves = [(f"ddim eta={e:g}", lambda r, e=e: r["sampler"] == "ddim" and r["eta"] == e, "o-")
              for e in sorted({r["eta"] for r in runs if r["sampler"] == "ddim"})]
    curves += [("plms", lambda r: r["sampler"] == "plms", "s-"), ("ddpm", lambda r: r["sampler"] == "ddpm", "*")]
    for label, keep, style in curves:
        rs = [r for r in runs if keep(r)]
        if rs:
            xs = [r["steps"] for r in rs]
            ax.plot(xs, [r["fd_fmnist"] for r in rs], style, label=label, ms=9 if label == "ddpm" else 6)
            ax2.plot(xs, [r["samples_per_s"] for r in rs], style, label=label, ms=9 if label == "ddpm" else 6)
    for a, title in ((ax, "fd_fmnist (lower is better)"), (ax2, "samples / s")):
        a.set_xscale("log")
        a.set_xlabel("network evaluations per sample (steps)")
        a.set_title(title, fontsize=9)
        a.legend(fontsize=8)
    ax2.set_yscale("log")
    fig.suptitle(f"samplers, guidance {guidance:g}, {args.num_samples} samples, {C.machine()}", fontsize=8)
    fig.tight_layout()
    fig.savefig(C.os.path.join(args.out, "samplers.png"), dpi=120)
    plt.close(fig)
    return result


if __name__ == "__main__":
    main()
