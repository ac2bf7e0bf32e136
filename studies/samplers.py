"""Study: sampler and step count vs fd_fmnist and throughput (paper: DDIM with few steps is close to 1000-step
DDPM; PLMS is used for text-to-image).

python studies/samplers.py --workdir runs/ldm [--ddim_steps 10,20,50,100] [--plms_steps 50] [--num_samples 500]
    [--solvers dpmpp_2m:10,dpmpp_2m:20,euler_a:25,unipc:10,unipc:20:order=3,dpmpp_2m:20:karras=1]
-> studies/results/NAME.json, NAME.png (fd_fmnist and samples/s per sampler/steps; NAME: --name, samplers)
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
    p.add_argument("--solvers", default="", help="NAME:STEPS[:opt=value...] comma list, e.g. dpmpp_2m:20, "
                   "unipc:10:order=3, dpmpp_2m:20:karras=1 (options: karras, order, spacing)")
    p.add_argument("--name", default="samplers", help="result file name under --out")
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
    settings = [("ddim", int(s), float(e), {}) for e in args.ddim_etas.split(",") if e
                for s in args.ddim_steps.split(",") if s]
    settings += [("plms", int(s), 0.0, {}) for s in args.plms_steps.split(",") if s]
    settings += [parse_solver(item) for item in args.solvers.split(",") if item]
    if args.ddpm:
        settings.append(("ddpm", int(ldm.config.diffusion.num_timesteps), 1.0, {}))
    runs = []
    for sampler, steps, eta, opts in settings:
        n = args.ddpm_samples if sampler == "ddpm" and args.ddpm_samples else args.num_samples
        r = evaluate_ldm(ldm=ldm, num_samples=n, batch_size=args.batch_size, sampler=sampler, steps=steps,
                         eta=eta, guidance=guidance, real=real, seed=args.seed, **opts)
        r.update(eta=eta, options=opts, label=label_of(sampler, eta, opts))
        runs.append(r)
        acc = r.get("conditional_accuracy")
        C.log(f"{r['label']} {steps}: fd_fmnist {r['fd_fmnist']:.2f} kid {r['kid_fmnist']:.4f} "
              f"{'' if acc is None else f'acc {acc:.3f} '}{r['samples_per_s']:.2f} samples/s")
    result = {"study": "samplers", "workdir": ldm.workdir, "checkpoint_step": ldm.step, "machine": C.machine(),
              "guidance": guidance, "num_samples": args.num_samples, **real[1], "seconds": time.time() - t0,
              "runs": runs}
    C.write_result(args.name, result, args.out)

    plt = C.pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(8, 3.2))
    styles = {"ddpm": "*", "plms": "s-"}
    for label in dict.fromkeys(r["label"] for r in runs):
        rs, style = [r for r in runs if r["label"] == label], styles.get(label, "o-")
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
    fig.savefig(C.os.path.join(args.out, f"{args.name}.png"), dpi=120)
    plt.close(fig)
    return result


def parse_solver(item: str) -> tuple[str, int, float, dict]:
    """'dpmpp_2m:20:karras=1' -> ('dpmpp_2m', 20, 0.0, {'karras': True})."""
    name, steps, *opts = item.split(":")
    kinds = {"karras": lambda v: bool(int(v)), "order": int, "spacing": str}
    parsed = {}
    for opt in opts:
        key, _, value = opt.partition("=")
        if key not in kinds:
            raise SystemExit(f"--solvers: unknown option {key!r} in {item!r} (one of {', '.join(kinds)})")
        parsed[key] = kinds[key](value)
    return name, int(steps), 0.0, parsed


def label_of(sampler: str, eta: float, opts: dict) -> str:
    label = f"{sampler} eta={eta:g}" if sampler == "ddim" else sampler
    return label + "".join(f" {k}={v}" for k, v in sorted(opts.items()))


if __name__ == "__main__":
    main()
