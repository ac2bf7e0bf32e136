"""Study: what the Fashion-MNIST pairs model (configs/demo_pairs.py) gets right, per checkpoint and sampler.

The training run's own evaluation (metrics.json) uses the config's sampler and guidance at the last step; this
re-runs evaluation/pairs.py's plan on any saved checkpoint with other samplers and guidance scales, to tell
what limits pair accuracy: garment identity (half accuracy) or placement (swap consistency, order accuracy: the
share of samples showing both garments with the two sides exchanged).

python studies/pairs.py --workdir runs/pairs [--steps 1000,2000,3000] [--settings ddim:25:1:3,dpmpp_2m:10:0:3]
    [--first_x0 1]
-> studies/results/NAME.json (NAME: --name, pairs)

--first_x0 1 also judges the network's x0 prediction at the first sampling step (t = T - 1, pure noise in), i.e.
the layout the caption alone asks for before any step has committed to one.
"""

from __future__ import annotations

import argparse
import time

import _common as C


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/pairs", help="a configs/demo_pairs.py workdir")
    p.add_argument("--steps", default="", help="checkpoint steps, comma list (default: the newest)")
    p.add_argument("--settings", default="ddim:25:1:3",
                   help="SAMPLER:STEPS:ETA:GUIDANCE[:SPACING] comma list, e.g. ddim:25:1:3,dpmpp_2m:10:0:5:trailing "
                   "(default spacing: the run's sampling.spacing)")
    p.add_argument("--samples_per_pair", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=200)
    p.add_argument("--first_x0", type=int, default=0, help="1: also judge the x0 prediction at t = T - 1")
    p.add_argument("--name", default="pairs")
    p.add_argument("--out", default=C.RESULTS)
    args = p.parse_args(argv)

    import jax.numpy as jnp

    from ldm_jax import inference
    from ldm_jax.evaluation.classifier import get_or_train_classifier
    from ldm_jax.evaluation.pairs import eval_plan, judge_plan, pair_metrics

    _, logits_fn = get_or_train_classifier()
    judge = lambda x: logits_fn(jnp.asarray(x))  # noqa: E731
    plan = eval_plan(args.samples_per_pair)
    steps = [int(s) for s in args.steps.split(",")] if args.steps else [None]
    runs = []
    for step in steps:
        ldm = inference.LoadedLDM.load(args.workdir, step=step)
        for setting in args.settings.split(","):
            sampler, n, eta, guidance, *spacing = setting.split(":")
            t0 = time.time()
            draw = _sampler(ldm, sampler, int(n), float(eta), float(guidance),
                            spacing[0] if spacing else ldm.config.sampling.spacing)
            pl, pr = judge_plan(plan, draw, args.batch_size, judge)
            m = {**pair_metrics(pl, pr, plan), **_order(pl, pr, plan)}
            m.update(step=ldm.step, setting=setting, eval_s=time.time() - t0)
            C.log({k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()})
            runs.append(m)
        if args.first_x0:
            pl, pr = judge_plan(plan, _first_x0(ldm), args.batch_size, judge)
            t_last = ldm.config.diffusion.num_timesteps - 1
            order = _order(pl, pr, plan)
            m = {"step": ldm.step, "setting": f"x0 prediction at t={t_last}",
                 "order_right": order["set_accuracy"] - order["order_swapped"], "order_swapped": order["order_swapped"]}
            C.log(m)
            runs.append(m)
    result = {"workdir": args.workdir, "machine": C.machine(), "samples_per_pair": args.samples_per_pair,
              "runs": runs}
    C.write_result(args.name, result, args.out)
    return result


def _order(pl, pr, plan) -> dict[str, float]:
    """set_accuracy: both garments right in either order; order_swapped: both right, sides exchanged (A != B)."""
    import numpy as np

    a, b = plan["a"], plan["b"]
    right, swapped = (pl == a) & (pr == b), (pl == b) & (pr == a) & (a != b)
    return {"set_accuracy": float(np.mean(right | swapped)), "order_swapped": float(np.mean(swapped))}


def _first_x0(ldm):
    """draw(prompts, noise_ids) for evaluation/pairs.judge_plan: the conditional x0 prediction at t = T - 1 from
    standard noise (no guidance), decoded."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ldm_jax.diffusion.gaussian import to_x0_eps

    t_last = ldm.config.diffusion.num_timesteps - 1
    fs, par = ldm.first_stage, ldm.config.diffusion.parameterization

    @jax.jit
    def x0_image(params, x, tokens):
        t = jnp.full((x.shape[0],), t_last, jnp.int32)
        x0, _ = to_x0_eps(ldm.sched, x, t, ldm.model.apply({"params": params}, x, t, {"tokens": tokens}), par)
        return jnp.clip(fs.decode(fs.variables, x0 / ldm.scale_factor), -1.0, 1.0)

    def draw(prompts, ids):
        x = np.stack([np.random.default_rng([5, int(i)]).standard_normal(ldm.latent_shape()) for i in ids])
        return x0_image(ldm.params, jnp.asarray(x, jnp.float32), jnp.asarray(ldm.tokens(prompts)))

    return draw


def _sampler(ldm, sampler, steps, eta, guidance, spacing):
    """draw(prompts, noise_ids) for evaluation/pairs.judge_plan: samples whose starting and sampler noise come from
    the plan's noise ids (a prompt and its swap share them), as the training run's own evaluation. LoadedLDM.sample
    cannot do this (it cycles prompts over the sample indices), hence its compiled generator."""
    import jax.numpy as jnp

    gen = ldm._generator(sampler, steps, eta, guidance, 1, dict(spacing=spacing, karras=False, order=2,
                                                                guidance_rescale=0.0))

    def draw(prompts, ids):
        cond = {"tokens": jnp.asarray(ldm.tokens(prompts))}
        return gen(ldm.params, ldm.first_stage.variables, cond, {}, jnp.asarray(ids, jnp.int32), 0, None, None)

    return draw


if __name__ == "__main__":
    main()
