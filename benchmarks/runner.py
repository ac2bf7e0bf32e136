"""Orchestrator of `python -m benchmarks`: starts one worker per side, interleaves their repetitions, reports.

Method: per case every side is set up (compiled) first, then warmed up once, then timed `reps` times with the
sides interleaved (A B C, B C A, ...); the median is reported with the ratio ours/peer (< 1: ours is faster).
FLOPs come from XLA's cost analysis of our compiled step (the same network on every side); MFU divides the
achieved FLOP/s by the machine's dense matmul rate measured in the same run (float32 on CPU, bf16 on GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks import spec
from benchmarks.protocol import Worker
from benchmarks.report import fmt, table, targets
from ldm_jax import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# XLA CPU: YNNPACK's convolution fusion computes weight gradients ~4x slower than XLA's Eigen convolution
# on AVX2 (measured, docs/benchmarks.md), so ours and the Flax peer both run with it switched off.
CPU_XLA_FLAGS = " ".join(xla_flags.CPU_XLA_FLAGS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here (JSON)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 warm-up + 2 reps (CI smoke test)")
    p.add_argument("--gpu", action="store_true", help="GPU mode: bf16 compute, attention_impl='cudnn'")
    p.add_argument("--reps", type=int, help="timed repetitions per case (default 5; --quick: 2)")
    p.add_argument("--cases", help="comma-separated subset of case names")
    p.add_argument("--sides", default="ours,torch,flax", help="comma-separated subset of ours,torch,flax")
    p.add_argument("--flax-python", default=os.environ.get("LDM_BENCH_FLAX_PYTHON", ""),
                   help="interpreter of a venv with diffusers 0.39 + jax, the last diffusers with Flax models (Flax "
                        "peer; default $LDM_BENCH_FLAX_PYTHON; none: the Flax side is absent)")
    p.add_argument("--no-shared-x", action="store_true",
                   help="ours' guided sampling evaluates [x; x] like the peers instead of sharing the UNet's "
                        "condition-free layers between the two halves (diffusion/samplers.classifier_free_guidance)")
    p.add_argument("--attention-impl", default=None, choices=("xla", "cudnn", "matmul"),
                   help="pin ours' attention_impl (default: the model's default for the backend, as train.py: "
                        "'matmul' on CPU, 'cudnn' on GPU in bf16)")
    p.add_argument("--xla-flags", default=None, help=f"XLA_FLAGS of the JAX workers (CPU default: {CPU_XLA_FLAGS})")
    p.add_argument("--torch-omp-default", action="store_true",
                   help="leave torch's OpenMP spin-waiting on (default: OMP_WAIT_POLICY=PASSIVE, see docs)")
    p.add_argument("--no-weight-check", action="store_true",
                   help="skip running ours on the torch peer's converted weights (always skipped with --quick)")
    p.add_argument("--log-dir", help="keep the workers' logs here (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        p.error("--reps must be >= 1")
    return args


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def start_workers(args: argparse.Namespace, log_dir: str) -> dict[str, Worker | str]:
    """One worker per requested side; a side that cannot start maps to the reason (a string)."""
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    base["PYTHONPATH"] = REPO + os.pathsep + base.get("PYTHONPATH", "")
    base.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    base["HF_HUB_OFFLINE"] = "1"
    if args.gpu:
        base["LDM_BENCH_GPU"] = "1"
    xla = args.xla_flags if args.xla_flags is not None else ("" if args.gpu else CPU_XLA_FLAGS)
    jax_env = dict(base, XLA_FLAGS=xla) if xla else dict(base)
    if not args.gpu:
        jax_env["JAX_PLATFORMS"] = "cpu"
    torch_env = dict(base)
    if not args.torch_omp_default:
        torch_env["OMP_WAIT_POLICY"] = "PASSIVE"
    plan = {
        "ours": ([sys.executable, "-m", "benchmarks.ours"], jax_env),
        "torch": ([sys.executable, "-m", "benchmarks.torch_peer"], torch_env),
        "flax": ([args.flax_python, "-m", "benchmarks.flax_peer"], jax_env),
    }
    wanted = [s.strip() for s in args.sides.split(",") if s.strip()]
    out: dict[str, Worker | str] = {}
    for side in spec.SIDES:
        if side not in wanted:
            out[side] = "not requested (--sides)"
            continue
        cmd, env = plan[side]
        if not cmd[0]:
            out[side] = "no interpreter given (--flax-python or LDM_BENCH_FLAX_PYTHON)"
            continue
        if not shutil.which(cmd[0]) and not os.path.exists(cmd[0]):
            out[side] = f"interpreter {cmd[0]} not found"
            continue
        w = Worker(side, cmd, env, os.path.join(log_dir, f"{side}.log"), cwd=REPO)
        out[side] = w if w.ok else f"cannot start: {w.error}"
        print(f"[bench] {side}: " + (json.dumps(w.info) if w.ok else out[side]), flush=True)
    return out


def export_weights(torch_worker: Worker, case: dict[str, Any], folder: str, done: dict[str, str | None]) -> str | None:
    """Have the torch peer write its weights for this network (once per network); the path, or None."""
    net = case.get("unet") or case.get("ae")
    key = json.dumps([net, case.get("in_channels"), case["size"], "unet" in case], sort_keys=True)
    if key not in done:
        path = os.path.join(folder, f"net{len(done)}.npz")
        r = torch_worker.call("call", method="export_weights", kwargs={"case": case, "path": path})
        done[key] = path if r.get("ok") else None
        if not r.get("ok"):
            print(f"[bench] weight export failed: {r.get('error')}", flush=True)
    return done[key]


def run_pipeline_case(case: dict[str, Any], quick: bool, reps: int, env: dict[str, str], log_dir: str) -> dict:
    """A benchmarks/pipeline.py case in its own process (it compares two ldm_jax variants: a ratio)."""
    cmd = [sys.executable, "-m", "benchmarks.pipeline", case["name"], "--reps", str(reps)] + (["--quick"] if quick
                                                                                              else [])
    with open(os.path.join(log_dir, f"pipeline_{case['name']}.log"), "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True, timeout=3600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT ")), None)
    if proc.returncode or line is None:
        return {"about": case["about"], "status": "error", "reason": f"exit {proc.returncode}; log in {log_dir}",
                "sides": {}, "ratio_ours_over": {}}
    return {**json.loads(line.split(" ", 1)[1]), "status": "ok", "sides": {}, "ratio_ours_over": {}}


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def run_case(case: dict[str, Any], workers: dict[str, Worker | str], reps: int, warmup: int) -> dict[str, Any]:
    """Set up every side, warm up, then time `reps` interleaved rounds."""
    res: dict[str, Any] = {}
    live = []
    for side in case["sides"]:
        w = workers.get(side)
        if not isinstance(w, Worker):
            res[side] = {"status": "absent", "reason": w or "not started"}
            continue
        r = w.call("setup", case=case)
        if not r.pop("ok", False):
            res[side] = {"status": "error", "reason": r.get("error")}
            continue
        res[side] = {"status": "ok", **r, "times_s": [], "cpu_s": []}
        peak = w.call("peak")  # set-up (compilation, weights) apart from the steady state
        if peak.get("ok"):
            res[side]["setup_peak_rss_gib"] = peak["peak_rss_gib"]
        w.call("reset_peak")
        live.append(side)
    for i in range(warmup + reps):
        k = i % max(len(live), 1)
        for side in live[k:] + live[:k]:  # rotate the order so no side always runs first
            if res[side]["status"] != "ok":
                continue
            r = workers[side].call("run", name=case["name"])
            if not r.get("ok"):
                res[side].update(status="error", reason=r.get("error"))
            elif i < warmup:
                res[side]["first_run_s"] = r["wall_s"]
            else:
                res[side]["times_s"].append(r["wall_s"])
                res[side]["cpu_s"].append(r["cpu_s"])
    for side in live:
        peak = workers[side].call("peak")
        if peak.get("ok"):
            res[side]["peak_rss_gib"] = peak["peak_rss_gib"]  # steady state: since the reset after set-up
        td = workers[side].call("teardown", name=case["name"])
        if td.get("gpu_peak_gib") is not None:
            res[side]["gpu_peak_gib"] = td["gpu_peak_gib"]
        res[side]["median_s"] = _median(res[side]["times_s"])
        res[side]["cpu_median_s"] = _median(res[side]["cpu_s"])
    return res


def summarise(case: dict[str, Any], res: dict[str, Any], peak_gflops: float | None) -> dict[str, Any]:
    """Ratios ours/peer and MFU (each side's own FLOP count; ours' where a side has none: the same network)."""
    ours = res.get("ours", {})
    flops = ours.get("gflop")
    out = {"about": case["about"], "shapes": {k: case[k] for k in ("batch", "size") if k in case},
           "sides": res, "ratio_ours_over": {}}
    for k in ("in_channels", "steps", "guidance"):
        if k in case:
            out["shapes"][k] = case[k]
    for r in res.values():
        side_flops = r.get("gflop") or flops  # ours may execute fewer FLOPs for the same output (docs)
        if r.get("median_s") and side_flops:
            r["achieved_gflops"] = side_flops / r["median_s"]
            if peak_gflops:
                r["mfu"] = r["achieved_gflops"] / peak_gflops
    out["gflop_per_call"] = flops
    peers = [s for s in res if s != "ours" and res[s].get("median_s")]
    if ours.get("median_s"):
        for s in peers:
            out["ratio_ours_over"][s] = ours["median_s"] / res[s]["median_s"]
        if peers:
            fastest = min(peers, key=lambda s: res[s]["median_s"])
            out["fastest_peer"] = fastest
            out["speedup_vs_fastest_peer"] = res[fastest]["median_s"] / ours["median_s"]
            # Robust to drift on a shared machine: the median of the per-round ratios (sides interleaved per round).
            pairs = [p / o for p, o in zip(res[fastest]["times_s"], ours["times_s"], strict=False) if o]
            if pairs:
                out["paired_speedup_vs_fastest_peer"] = _median(pairs)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    cases = spec.make_cases(args.quick)
    if args.cases:
        keep = {c.strip() for c in args.cases.split(",")}
        unknown = keep - {c["name"] for c in cases}
        if unknown:
            raise SystemExit(f"--cases: unknown case(s) {sorted(unknown)}; known: {[c['name'] for c in cases]}")
        cases = [c for c in cases if c["name"] in keep]
    reps = args.reps or (2 if args.quick else 5)
    impl = args.attention_impl  # None: the backend's default (models/latent_diffusion.default_attention_impl)
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="ldm_bench_")
    os.makedirs(log_dir, exist_ok=True)
    load_before = _load()
    workers = start_workers(args, log_dir)
    live = {k: v for k, v in workers.items() if isinstance(v, Worker)}
    results: dict[str, Any] = {
        "meta": {"mode": "quick" if args.quick else "full", "gpu": args.gpu, "reps": reps, "warmup": 1,
                 "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                             "python": platform.python_version()},
                 "load_avg_before": load_before, "xla_flags_jax_workers": (
                     args.xla_flags if args.xla_flags is not None else ("" if args.gpu else CPU_XLA_FLAGS)),
                 "ours_attention_impl": impl or "backend default", "ours_guidance_shared_x": not args.no_shared_x,
                 "torch_env": "default" if args.torch_omp_default else "OMP_WAIT_POLICY=PASSIVE",
                 "sides": {k: (v.info if isinstance(v, Worker) else {"absent": v}) for k, v in workers.items()},
                 "log_dir": log_dir},
        "cases": {},
    }
    try:
        n, mreps = (512, 3) if args.quick else (2048, 5)
        rates = {}
        for side in ("ours", "torch"):
            if side in live:
                r = live[side].call("matmul", n=n, reps=mreps)
                if r.get("ok"):
                    rates[side] = r["gflops"]
        peak = max(rates.values()) if rates else None
        results["peak_matmul_gflops"] = {**rates, "used": peak, "n": n,
                                         "dtype": "bfloat16" if args.gpu else "float32"}
        print(f"[bench] dense matmul {n}^3: {json.dumps(rates)} GFLOP/s", flush=True)
        weights_dir, exported = tempfile.mkdtemp(prefix="ldm_bench_w_"), {}
        pipeline_env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if not args.gpu:
            pipeline_env["JAX_PLATFORMS"] = "cpu"
        for case in cases:
            case["gpu"] = args.gpu
            case["attention_impl"] = impl
            case["shared_x"] = not args.no_shared_x
            if not (args.no_weight_check or args.quick) and "torch" in live and {"ours", "torch"} <= set(case["sides"]):
                case["weights"] = export_weights(live["torch"], case, weights_dir, exported)
            for side in ("ours", "torch"):  # the machine's rate drifts with its load: re-measure per case
                r = live[side].call("matmul", n=n, reps=mreps) if side in live else {}
                if r.get("ok"):
                    rates[f"{side}_{case['name']}"] = r["gflops"]
            t0 = time.time()
            print(f"[bench] {case['name']}: {case['about']}", flush=True)
            if case["kind"] == "pipeline":
                results["cases"][case["name"]] = run_pipeline_case(case, args.quick, reps, pipeline_env, log_dir)
                c = results["cases"][case["name"]]
                print(f"[bench]   ratio {fmt(c.get('ratio'))} (target {c.get('target')})" if "ratio" in c
                      else f"[bench]   {c.get('reason')}", flush=True)
                continue
            if case.get("same_as") in results["cases"]:  # identical shapes: reuse, do not re-measure
                res = {s: results["cases"][case["same_as"]]["sides"][s] for s in case["sides"]}
            else:
                res = run_case(case, workers, reps, warmup=1)
            results["cases"][case["name"]] = summarise(case, res, None)
            results["cases"][case["name"]]["case_wall_s"] = time.time() - t0
            for side, r in res.items():
                print(f"[bench]   {side}: " + (f"median {r['median_s']:.4g} s, compile {fmt(r.get('compile_s'))} s"
                                               if r.get("median_s") else f"{r.get('status')}: {r.get('reason')}"),
                      flush=True)
        shutil.rmtree(weights_dir, ignore_errors=True)
        c4, c1 = results["cases"].get("ldm4_train"), results["cases"].get("ldm1_train")
        if c4 and c1:
            t4, t1 = c4["sides"]["ours"].get("median_s"), c1["sides"]["ours"].get("median_s")
            if t4 and t1:
                results["ldm4_vs_ldm1"] = {"speedup": t1 / t4, "ldm4_median_s": t4, "ldm1_median_s": t1,
                                           "batch": next(c["batch"] for c in spec.make_cases(args.quick)
                                                         if c["name"] == "ldm4_train")}
        # Re-measure the matmul rate at the end: the machine may have been busier or quieter than at the start.
        for side in ("ours", "torch"):
            if side in live:
                r = live[side].call("matmul", n=n, reps=mreps)
                if r.get("ok"):
                    rates[side + "_end"] = r["gflops"]
        # MFU against the best dense matmul rate seen in this run (start, per case, end; XLA or torch).
        peak = max(rates.values()) if rates else None
        results["peak_matmul_gflops"].update(rates, used=peak)
        for r in (r for c in results["cases"].values() for r in c["sides"].values()):
            if peak and r.get("achieved_gflops"):
                r["mfu"] = r["achieved_gflops"] / peak
    finally:
        for w in live.values():
            w.close()
    results["targets"] = targets(results)
    results["meta"]["load_avg_after"] = _load()
    results["meta"]["wall_s"] = time.time() - t_start
    print("\n" + table(results))
    if "ldm4_vs_ldm1" in results:
        print(f"\nLDM-4 vs LDM-1 (same UNet, batch {results['ldm4_vs_ldm1']['batch']}): "
              f"{results['ldm4_vs_ldm1']['speedup']:.2f}x faster per step")
    print("\nTargets:")
    for k, v in results["targets"].items():
        verdict = {True: "reached", False: "NOT reached", None: "n/a"}[v["reached"]]
        paired = f" (median of per-round ratios {fmt(v['paired_median'])})" if v.get("paired_median") else ""
        print(f"  {k}: {fmt(v['value'])} -> {verdict}{paired}")
    print(f"\nwall {results['meta']['wall_s']:.0f} s, load average before {load_before} after {_load()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"[bench] wrote {args.json}")
    return 0
