"""Study: why the deterministic samplers get worse with more steps on the demo model (issue #19), with evidence.

python studies/ode_blobs.py --workdir runs/ldm [--num_samples 500] [--num_heldout 1000] [--name ode_blobs]
-> studies/results/NAME.json, NAME.png (denoising error per timestep, x_t statistics along the trajectories),
   NAME_samples.png (the eta-0 samples the judge is least sure of, beside eta 1 and 10-step eta 0 from the same
   starting noise)

Three measurements on one stage-2 workdir:
1. Denoising error per timestep on held-out latents (the test split encoded by the frozen first stage, scaled as
   in training): eps-MSE of the EMA and of the raw weights, conditional / unconditional / guided, and the x0 error
   it implies, (1 - abar) / abar * eps-MSE: the factor by which DDIM's x0 prediction amplifies an eps error.
2. DDIM trajectories (a plain loop here that records statistics; checked against the library's `ddim_sample` on
   the same starting noise) at eta 0 and 1, several step counts, guidance 1 and the model's guidance: the mean
   per-sample standard deviation of x_t at every visited timestep against the same statistic of real latents
   noised to that timestep (q(x_t | x_0)); where the sampled x_t drift from the noised real ones the network is
   evaluated off its training distribution (the "exposure bias" of Ning et al., 2023).
3. Sample quality of each run (fd_fmnist, KID, conditional accuracy) and, per sample, the final latent's standard
   deviation and the judge's confidence, to relate bad samples to off-distribution latents; plus the same
   sampler with the raw weights, and with the eps output scaled by 1/lambda (Ning et al., 2024, "epsilon
   scaling"), the remedy for exposure bias: if that removes the degradation, the blobs are exposure bias.
"""

from __future__ import annotations

import argparse
import time

import _common as C
import jax
import jax.numpy as jnp
import numpy as np

T_GRID = (1, 10, 25, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 950, 980, 999)


def heldout_latents(ldm, num: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(scaled latents, labels) of the first `num` test images, encoded as the train step does (posterior
    sample when first_stage.sample_posterior, fixed key)."""
    from ldm_jax.data.pipeline import make_dataset

    cfg, fs = ldm.config, ldm.first_stage
    ds = make_dataset(cfg.data, "test", batch_size, cfg.seed, augment=False)
    enc = jax.jit(lambda v, x, k: fs.encode(v, x, k if cfg.first_stage.sample_posterior else None))
    zs, labels = [], []
    for i in range(-(-num // batch_size)):
        b = ds.batch_at(i)
        zs.append(np.asarray(enc(fs.variables, jnp.asarray(b["image"]), jax.random.key(1000 + i))) * ldm.scale_factor)
        labels.append(np.asarray(b["label"]))
    return np.concatenate(zs)[:num], np.concatenate(labels)[:num]


def denoising_errors(ldm, params_by_name: dict, z0: np.ndarray, labels: np.ndarray, guidance: float,
                     batch_size: int) -> dict:
    """eps-MSE per timestep in T_GRID for each weight set and condition (same noise for all)."""
    from ldm_jax.conditions import null_condition
    from ldm_jax.diffusion.gaussian import q_sample, to_x0_eps

    cfg, sched, model = ldm.config, ldm.sched, ldm.model
    param = cfg.diffusion.parameterization

    @jax.jit
    def errors(params, z, label, t, key):
        noise = jax.random.normal(key, z.shape)
        tb = jnp.full((z.shape[0],), t, jnp.int32)
        x = q_sample(sched, z, tb, noise)
        cond = {"label": label}
        unc = null_condition(cfg, cond, None)
        eps_c = to_x0_eps(sched, x, tb, model.apply({"params": params}, x, tb, cond), param)[1]
        eps_u = to_x0_eps(sched, x, tb, model.apply({"params": params}, x, tb, unc), param)[1]
        eps_g = eps_u + guidance * (eps_c - eps_u)
        out = {}
        for k, e in (("cond", eps_c), ("uncond", eps_u), ("guided", eps_g)):
            out[k] = jnp.mean((e - noise) ** 2)
            # Orthogonality: an MMSE predictor's error is uncorrelated with its prediction, E[e.(eps - e)] = 0;
            # > 0 means the prediction is shrunk (too small), which DDIM turns into too large an x0.
            out[f"cross_{k}"] = jnp.mean(e * (noise - e))
            out[f"sq_{k}"] = jnp.mean(e * e)
        return out

    out = {}
    ac = np.asarray(sched.alphas_cumprod, np.float64)
    for name, params in params_by_name.items():
        rows = []
        for t in T_GRID:
            acc = dict.fromkeys(("cond", "uncond", "guided", "cross_cond", "cross_uncond", "cross_guided", "sq_cond",
                                 "sq_uncond", "sq_guided"), 0.0)
            n = 0
            for i in range(0, len(z0), batch_size):
                r = errors(params, jnp.asarray(z0[i:i + batch_size]), jnp.asarray(labels[i:i + batch_size]), t,
                           jax.random.fold_in(jax.random.key(7), t * 1000 + i))
                w = len(z0[i:i + batch_size])
                for k in acc:
                    acc[k] += float(r[k]) * w
                n += w
            kinds = ("cond", "uncond", "guided")
            row = {"t": t, **{f"eps_mse_{k}": acc[k] / n for k in kinds}}
            row.update({f"x0_mse_{k}": (1 - ac[t]) / ac[t] * row[f"eps_mse_{k}"] for k in kinds})
            # the eps prediction's shrink: the least-squares c with eps ~ (1 + c) * prediction
            row.update({f"eps_shrink_{k}": acc[f"cross_{k}"] / acc[f"sq_{k}"] for k in kinds})
            rows.append(row)
        out[name] = rows
    return out


def make_trajectory_fn(ldm, steps: int, eta: float, guidance: float, eps_scale: float = 1.0):
    """jitted (params, x_T, labels, key) -> (final latents, per-step mean per-sample std of x_t, timesteps):
    DDIM as the reference (uniform spacing, +1 offset), eps divided by eps_scale."""
    from ldm_jax.conditions import null_condition
    from ldm_jax.diffusion.gaussian import to_x0_eps
    from ldm_jax.diffusion.samplers import _ddim_alphas, classifier_free_guidance, ddim_timesteps

    cfg, sched, model = ldm.config, ldm.sched, ldm.model
    ts = ddim_timesteps(sched.num_timesteps, steps, "uniform")
    a, a_prev, sigma = _ddim_alphas(sched, ts, eta)  # the library DDIM's coefficients

    @jax.jit
    def run(params, x_T, labels, key):
        cond = {"label": labels}
        fn = lambda x, t, c: model.apply({"params": params}, x, t, c)  # noqa: E731
        model_fn = classifier_free_guidance(fn, cond, null_condition(cfg, cond, None), guidance, shared_x=True)

        def body(x, inp):
            t, a_t, a_p, s, k = inp
            tb = jnp.full((x.shape[0],), t, jnp.int32)
            stat = jnp.mean(jnp.std(x.reshape(x.shape[0], -1), axis=1))
            x0, eps = to_x0_eps(sched, x, tb, model_fn(x, tb), cfg.diffusion.parameterization)
            if eps_scale != 1.0:
                eps = eps / eps_scale
                x0 = (x - jnp.sqrt(1 - a_t) * eps) / jnp.sqrt(a_t)
            x = jnp.sqrt(a_p) * x0 + jnp.sqrt(jnp.maximum(1 - a_p - s**2, 0.0)) * eps
            x = x + s * jax.random.normal(k, x.shape)
            return x, stat

        keys = jax.random.split(key, len(ts))
        x, stats = jax.lax.scan(body, x_T, (jnp.asarray(ts[::-1]), a[::-1], a_prev[::-1], sigma[::-1], keys))
        return x, stats

    return run, ts[::-1]


def real_trajectory_stats(ldm, z0: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """The same statistic for real latents noised to each timestep: mean over samples of std(q(x_t | z0))."""
    from ldm_jax.diffusion.gaussian import q_sample

    z = jnp.asarray(z0)
    out = []
    for t in ts:
        x = q_sample(ldm.sched, z, jnp.full((len(z),), int(t), jnp.int32), jax.random.normal(jax.random.key(int(t)),
                                                                                              z.shape))
        out.append(float(jnp.mean(jnp.std(x.reshape(len(z), -1), axis=1))))
    return np.asarray(out)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/ldm")
    p.add_argument("--num_samples", type=int, default=500)
    p.add_argument("--num_heldout", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=100)
    p.add_argument("--guidance", type=float, default=None, help="default: the model's sampling.guidance")
    p.add_argument("--eps_scales", default="1.005,0.99,0.98,0.95",
                   help="epsilon-scaling factors lambda (eps / lambda) tried at eta 0, 50 steps")
    p.add_argument("--num_real", type=int, default=10000)
    p.add_argument("--name", default="ode_blobs")
    p.add_argument("--out", default=C.RESULTS)
    args = p.parse_args(argv)

    from ldm_jax import workdir as W
    from ldm_jax.diffusion.samplers import ddim_sample
    from ldm_jax.evaluate_workdir import real_stats
    from ldm_jax.evaluation import evaluate as E
    from ldm_jax.evaluation.classifier import get_or_train_classifier
    from ldm_jax.inference import LoadedLDM

    t0 = time.time()
    ldm = LoadedLDM.load(args.workdir)
    cfg = ldm.config
    g = float(cfg.sampling.guidance if args.guidance is None else args.guidance)
    state, step = W.restore_state(args.workdir)
    weights = {"ema": ldm.params, "raw": jax.tree.map(jnp.asarray, state["params"])}
    del state
    z0, labels = heldout_latents(ldm, args.num_heldout, args.batch_size)
    C.log(f"held-out latents {z0.shape}: std {z0.std():.3f}, mean {z0.mean():.3f}")
    errs = denoising_errors(ldm, weights, z0, labels, g, args.batch_size)
    for name, rows in errs.items():
        C.log(f"{name} eps-MSE cond per t: " + " ".join(f"{r['t']}:{r['eps_mse_cond']:.3f}" for r in rows))
        C.log(f"{name} eps shrink cond per t: " + " ".join(f"{r['t']}:{r['eps_shrink_cond']:+.4f}" for r in rows))
        C.log(f"{name} eps shrink guided per t: " + " ".join(f"{r['t']}:{r['eps_shrink_guided']:+.4f}" for r in rows))

    extractor = E.make_feature_extractor("fmnist")
    _, logits_fn = get_or_train_classifier()
    real = real_stats(cfg.data, extractor, args.num_real, args.batch_size, min(E.MAX_RESERVOIR, args.num_samples),
                      logits_fn=logits_fn)
    n, shape, ncls = args.num_samples, ldm.latent_shape(), 10
    base = jax.random.key(0, impl="threefry2x32")
    x_T_all = np.asarray(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), shape))(jnp.arange(n)))
    decode = jax.jit(lambda z: jnp.clip(ldm.first_stage.decode(ldm.first_stage.variables, z / ldm.scale_factor),
                                        -1.0, 1.0))

    # The loop here equals the library's DDIM on the same noise (so its statistics describe what users sample).
    run, _ = make_trajectory_fn(ldm, 50, 0.0, g)
    xb, lb = jnp.asarray(x_T_all[:8]), jnp.asarray(np.arange(8) % ncls, jnp.int32)
    mine = np.asarray(run(ldm.params, xb, lb, jax.random.key(1))[0])
    fn = lambda x, t, c: ldm.model.apply({"params": ldm.params}, x, t, c)  # noqa: E731
    from ldm_jax.conditions import null_condition
    from ldm_jax.diffusion.samplers import classifier_free_guidance

    guided = classifier_free_guidance(fn, {"label": lb}, null_condition(cfg, {"label": lb}, None), g, shared_x=True)
    lib = np.asarray(jax.jit(lambda x: ddim_sample(guided, ldm.sched, x.shape, jax.random.key(1), 50, 0.0,
                                                   parameterization=cfg.diffusion.parameterization, x_T=x))(xb))
    loop_vs_library = float(np.max(np.abs(mine - lib)) / np.max(np.abs(lib)))
    C.log(f"trajectory loop vs library ddim_sample (eta 0, 50 steps): max rel diff {loop_vs_library:.2e}")

    settings = [(1.0, 0.0, 10, "ema", 1.0), (1.0, 0.0, 50, "ema", 1.0), (1.0, 1.0, 50, "ema", 1.0),
                (g, 0.0, 10, "ema", 1.0), (g, 0.0, 20, "ema", 1.0), (g, 0.0, 50, "ema", 1.0),
                (g, 0.0, 100, "ema", 1.0), (g, 1.0, 50, "ema", 1.0), (g, 0.0, 50, "raw", 1.0)]
    settings += [(g, 0.0, 50, "ema", float(s)) for s in args.eps_scales.split(",") if s]
    runs, keep = [], {}
    real_std = z0.reshape(len(z0), -1).std(axis=1)
    for guidance, eta, steps, wname, eps_scale in settings:
        run, ts = make_trajectory_fn(ldm, steps, eta, guidance, eps_scale)
        finals, stats, confs, hits = [], [], [], []

        def generate(indices, run=run, finals=finals, stats=stats, wname=wname):
            idx = np.minimum(indices, n - 1)
            z, st = run(weights[wname], jnp.asarray(x_T_all[idx]), jnp.asarray(idx % ncls, jnp.int32),
                        jax.random.fold_in(jax.random.key(2), int(indices[0])))
            finals.append(np.asarray(z))
            stats.append(np.asarray(st))
            return decode(z)

        def on_batch(images, indices, confs=confs, hits=hits):
            probs = np.asarray(jax.nn.softmax(np.asarray(logits_fn(images)), axis=-1))
            confs.append(probs[np.arange(len(indices)), indices % ncls])
            hits.append(probs.argmax(axis=-1) == indices % ncls)

        r = E.generation_metrics(generate, n, args.batch_size, real[0], extractor, ncls, logits_fn,
                                 min(E.MAX_RESERVOIR, n), on_batch=on_batch)
        z = np.concatenate(finals)[:n]
        conf, hit = np.concatenate(confs)[:n], np.concatenate(hits)[:n]
        zstd = z.reshape(n, -1).std(axis=1)
        lo, hi = np.percentile(real_std, [1, 99])
        outside = (zstd < lo) | (zstd > hi)
        label = f"g={guidance:g} eta={eta:g} steps={steps} {wname}" + (f" eps/{eps_scale:g}" if eps_scale != 1 else "")
        row = {"label": label, "guidance": guidance, "eta": eta, "steps": steps, "weights": wname,
               "eps_scale": eps_scale, **{k: r.get(k) for k in ("fd_fmnist", "kid_fmnist", "conditional_accuracy",
                                                                 "samples_per_s")},
               "timesteps": [int(t) for t in ts], "xt_std": np.mean(np.stack(stats), axis=0).tolist(),
               "xt_std_real": real_trajectory_stats(ldm, z0, ts).tolist(),
               "final_std_mean": float(zstd.mean()), "final_std_outside_real_1_99pct": float(outside.mean()),
               "judge_conf_mean": float(conf.mean()),
               "accuracy_inside": float(np.mean(hit[~outside])) if (~outside).any() else None,
               "accuracy_outside": float(np.mean(hit[outside])) if outside.any() else None}
        runs.append(row)
        keep[label] = (conf, np.concatenate([decode(jnp.asarray(z[i:i + 100])) for i in range(0, n, 100)]))
        C.log(f"{label}: fd {row['fd_fmnist']:.2f} acc {row['conditional_accuracy']:.3f} final std "
              f"{row['final_std_mean']:.3f} (real {real_std.mean():.3f}), outside real 1-99%: "
              f"{row['final_std_outside_real_1_99pct']:.3f}, x_t std drift at the end "
              f"{row['xt_std'][-1] - row['xt_std_real'][-1]:+.3f}")

    result = {"study": "ode_blobs", "workdir": ldm.workdir, "checkpoint_step": step, "machine": C.machine(),
              "guidance": g, "num_samples": n, "num_heldout": len(z0), "heldout_latent_std": float(z0.std()),
              "heldout_per_sample_std_mean": float(real_std.mean()),
              "heldout_per_sample_std_1_99pct": np.percentile(real_std, [1, 99]).tolist(),
              "loop_vs_library_max_rel_diff": loop_vs_library, "denoising": errs, "runs": runs,
              "seconds": time.time() - t0}
    C.write_result(args.name, result, args.out)
    _plots(args, result, keep, g)
    return result


def _plots(args, result: dict, keep: dict, g: float) -> None:
    import os

    from ldm_jax.data.images import make_grid, save_png, to_uint8

    plt = C.pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, rows in result["denoising"].items():
        for k, style in (("cond", "-"), ("guided", "--")):
            ax.plot([r["t"] for r in rows], [r[f"eps_mse_{k}"] for r in rows], style, label=f"{name} {k}")
    ax.set_yscale("log")
    ax.set_xlabel("timestep t")
    ax.set_title("eps-MSE on held-out latents", fontsize=9)
    ax.legend(fontsize=7)
    for r in result["runs"]:
        if r["eps_scale"] == 1 and r["weights"] == "ema" and r["guidance"] == g:
            ax2.plot(r["timesteps"], np.asarray(r["xt_std"]) - np.asarray(r["xt_std_real"]),
                     label=f"eta={r['eta']:g} steps={r['steps']}")
    ax2.axhline(0, color="k", lw=0.5)
    ax2.invert_xaxis()
    ax2.set_xlabel("timestep t (sampling runs right to left)")
    ax2.set_title(f"per-sample std of x_t: sampled - noised real (guidance {g:g})", fontsize=9)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, f"{args.name}.png"), dpi=120)
    plt.close(fig)

    worst_key = f"g={g:g} eta=0 steps=50 ema"
    if worst_key in keep:
        conf, _ = keep[worst_key]
        worst = np.argsort(conf)[:16]
        rows = [keep[k][1][worst] for k in (worst_key, f"g={g:g} eta=1 steps=50 ema", f"g={g:g} eta=0 steps=10 ema")
                if k in keep]
        save_png(make_grid(to_uint8(np.concatenate(rows)), nrow=16),
                 os.path.join(args.out, f"{args.name}_samples.png"))


if __name__ == "__main__":
    main()
