"""The benchmark report: the markdown tables (sides, ratio cases) and the targets, from the results dict."""

from __future__ import annotations

from typing import Any


def fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def table(results: dict[str, Any]) -> str:
    """Markdown table of the cases (also printed)."""
    head = ("| case | side | median s | min s | ours/side | compile s | first run s | GFLOP | GFLOP/s | MFU | "
            "peak RSS GiB | XLA mem GiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, c in results["cases"].items():
        for side, r in c["sides"].items():
            if r.get("status") != "ok":
                lines.append(f"| {name} | {side} | {r.get('status')}: {str(r.get('reason'))[:80]} |"
                             + " |" * 9)
                continue
            ratio = c["ratio_ours_over"].get(side) if side != "ours" else None
            mfu = r.get("mfu")
            lines.append(
                f"| {name} | {side} | {fmt(r.get('median_s'))} | {fmt(min(r['times_s']) if r['times_s'] else None)}"
                f" | {fmt(ratio)} | {fmt(r.get('compile_s'))} | {fmt(r.get('first_run_s'))} | "
                f"{fmt(r.get('gflop'), 4)} | {fmt(r.get('achieved_gflops'))} | "
                f"{'-' if mfu is None else f'{100 * mfu:.1f}%'} | {fmt(r.get('peak_rss_gib'))} | "
                f"{fmt(r.get('xla_memory_gib'))} |")
    ratio_cases = {n: c for n, c in results["cases"].items() if "ratio" in c or c.get("status") == "error"}
    if ratio_cases:
        lines += ["", "| case | variant | figures | ratio | target |", "|---|---|---|---|---|"]
        for name, c in ratio_cases.items():
            if "ratio" not in c:
                lines.append(f"| {name} | error: {c.get('reason')} | | | |")
                continue
            for k, (variant, v) in enumerate(c["variants"].items()):
                figs = ", ".join(f"{f} {fmt(x)}" for f, x in v.items() if isinstance(x, (int, float)))
                lines.append(f"| {name if k == 0 else ''} | {variant} | {figs} | "
                             f"{fmt(c['ratio']) if k == 0 else ''} | {c['target'] if k == 0 else ''} |")
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """The targets (issue #18), each with the measured value and whether it was reached."""
    cs, out = results["cases"], {}

    def add(label: str, value: float | None, reached: bool | None, **extra: Any) -> None:
        out[label] = {"value": value, "reached": None if value is None else reached, **extra}

    sp = cs.get("unet_train", {}).get("speedup_vs_fastest_peer")
    add("unet_train (train.py's step): ours >= 1.1x faster than the faster peer", sp, sp is not None and sp >= 1.1,
        paired_median=cs.get("unet_train", {}).get("paired_speedup_vs_fastest_peer"))
    sides = cs.get("unet_train", {}).get("sides", {})
    ours_rss, torch_rss = sides.get("ours", {}).get("peak_rss_gib"), sides.get("torch", {}).get("peak_rss_gib")
    rss = ours_rss / torch_rss if ours_rss and torch_rss else None
    add("unet_train: steady-state peak RSS <= 1.5x torch's", rss, rss is not None and rss <= 1.5)
    sp = cs.get("ddim_cfg", {}).get("speedup_vs_fastest_peer")
    add("ddim_cfg: ours faster than the faster peer", sp, sp is not None and sp > 1.0,
        paired_median=cs.get("ddim_cfg", {}).get("paired_speedup_vs_fastest_peer"))
    for name in ("data", "latent_cache", "loop"):
        c = cs.get(name, {})
        if "ratio" in c:
            add(f"{name}: ratio >= {c['target']}", c["ratio"], c["ratio"] >= c["target"])
    sp = results.get("ldm4_vs_ldm1", {}).get("speedup")
    add("LDM-4 >= 4x faster than LDM-1", sp, sp is not None and sp >= 4.0)
    return out
