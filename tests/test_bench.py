"""`python -m benchmarks --quick` smoke test: runs the cases and checks the JSON's structure (not timed).

latent_cache and loop (benchmarks/pipeline.py) are left out here for CI time (~80 s of compiles); what they time
is tested functionally in test_latent_cache.py (the cached step, a run's train_steps_per_s)."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import report, runner, spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK_CASES = "unet_train,ddim_cfg,ae_encode,ae_decode,ldm4_train,ldm1_train,data"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the 8 forced test devices stay out
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--json", str(out), "--cases", QUICK_CASES],
                          cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(out) as f:
        return json.load(f), proc.stdout


@pytest.mark.slow
def test_quick_json_has_every_case_with_medians_and_ratios(quick):
    res, stdout = quick
    names = [c["name"] for c in spec.make_cases(quick=True) if c["name"] in QUICK_CASES.split(",")]
    assert list(res["cases"]) == names
    assert res["meta"]["mode"] == "quick" and res["meta"]["reps"] == 2
    data = res["cases"].pop("data")  # a ratio of two ldm_jax pipelines
    variants = data["variants"]
    grain = f"grain_{os.cpu_count()}_workers"
    assert set(variants) == {"single_thread", f"{grain}_float32", f"{grain}_uint8"}
    assert data["ratio"] == pytest.approx(variants[f"{grain}_uint8"]["median_images_per_s"]
                                          / variants["single_thread"]["median_images_per_s"])
    assert "| data | single_thread |" in stdout
    assert res["cases"]["unet_train"]["sides"]["ours"]["step"].startswith("train.py's stage-2 step")
    for name, case in res["cases"].items():
        ours = case["sides"]["ours"]
        assert ours["setup_peak_rss_gib"] > 0 and ours["peak_rss_gib"] > 0
        assert ours["status"] == "ok", (name, ours)
        assert len(ours["times_s"]) == 2 and ours["median_s"] > 0 and ours["compile_s"] > 0
        assert ours["gflop"] > 0 and case["gflop_per_call"] == ours["gflop"]
        for side, r in case["sides"].items():
            if side == "ours":
                continue
            if r["status"] == "ok":  # a present peer: its median and the ratio ours/peer
                assert r["median_s"] > 0 and len(r["times_s"]) == 2
                assert case["ratio_ours_over"][side] == pytest.approx(ours["median_s"] / r["median_s"])
                assert r["params"] == ours["params"], (name, side)  # the same network on every side
            else:  # absent peers are reported with a reason, never given numbers
                assert r["status"] in ("absent", "error") and r["reason"] and "median_s" not in r
        assert name in stdout
    ldm = res["ldm4_vs_ldm1"]
    assert ldm["speedup"] == pytest.approx(ldm["ldm1_median_s"] / ldm["ldm4_median_s"])
    assert set(res["targets"]) and all("reached" in v for v in res["targets"].values())
    assert res["peak_matmul_gflops"]["used"] > 0


def test_cases_map_to_the_same_network_for_diffusers():
    case = spec.make_cases()[0]
    kw = spec.diffusers_unet_kwargs(case)
    assert kw["down_block_types"] == ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D")
    assert kw["up_block_types"] == ("UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    assert kw["block_out_channels"] == (96, 192, 192, 192) and kw["attention_head_dim"] == 6
    assert spec.ours_unet_kwargs(case)["num_head_channels"] * 6 == 192


def test_summarise_ratios_and_table():
    case = {"name": "c", "about": "x", "batch": 2, "size": 8}
    res = {"ours": {"status": "ok", "median_s": 1.0, "gflop": 10.0, "times_s": [1.0]},
           "torch": {"status": "ok", "median_s": 2.0, "times_s": [2.0]},
           "flax": {"status": "absent", "reason": "not installed"}}
    s = runner.summarise(case, res, peak_gflops=100.0)
    assert s["ratio_ours_over"] == {"torch": 0.5}
    assert s["fastest_peer"] == "torch" and s["speedup_vs_fastest_peer"] == 2.0
    assert res["ours"]["mfu"] == pytest.approx(0.1) and res["torch"]["mfu"] == pytest.approx(0.05)
    # A side's own FLOP count when it has one (ours may execute fewer FLOPs for the same output); paired ratios.
    res2 = {"ours": {"status": "ok", "median_s": 1.0, "gflop": 8.0, "times_s": [1.0, 2.0, 0.5]},
            "flax": {"status": "ok", "median_s": 2.0, "gflop": 10.0, "times_s": [1.5, 3.0, 2.0]}}
    s2 = runner.summarise(case, res2, peak_gflops=100.0)
    assert res2["flax"]["achieved_gflops"] == pytest.approx(5.0) and res2["ours"]["achieved_gflops"] == 8.0
    assert s2["paired_speedup_vs_fastest_peer"] == pytest.approx(1.5)  # median of 1.5, 1.5, 4.0
    text = report.table({"cases": {"c": s}})
    assert "| c | torch | 2 |" in text and "absent: not installed" in text


def test_components_rates_count_the_convolutions():
    """`python -m benchmarks.components --quick`: XLA's FLOP count of a ResBlock matches its two 3x3 convs
    counted by hand, and the backward adds about twice the forward's work (not a timing test)."""
    from benchmarks import components

    rows = components.run(quick=True, reps=1)
    assert [r["name"] for r in rows][:2] == ["SpatialTransformer 4x4x128", "ResBlock 8x8 64->64"]
    # batch 2, 8x8, 64 -> 64, two 3x3 convs with padding 1; XLA counts the taps that fall inside the image
    # (22 of 8 x 3 per row and column), not the zero padding
    convs = 2 * (2 * 2 * 64 * 64 * 22 * 22) / 1e9
    res = rows[1]
    assert convs <= res["fwd"]["gflop"] <= 1.1 * convs
    for r in rows:
        assert 2.0 <= r["fwd+bwd"]["gflop"] / r["fwd"]["gflop"] <= 3.5, r
        assert r["fwd"]["median_s"] > 0 and r["fwd+bwd"]["gflops"] > 0
    assert components.table(rows).count("\n") == len(rows) + 1


def test_train_donation_avoids_parameter_copies_on_cpu():
    """Both JAX sides' bench step donates nothing on CPU: with params donated, XLA:CPU copies a kernel that the
    backward still reads (the input gradient of the second conv) before updating it in place; without donation
    there is no such copy, and the update is the same."""
    import re

    import jax
    import jax.numpy as jnp
    import optax

    from benchmarks import protocol

    assert protocol.train_donation("cpu") == ()
    assert protocol.train_donation("gpu") == (0, 1) == protocol.train_donation("tpu")

    tx = optax.adamw(1e-3, weight_decay=0.01)
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",  # noqa: E731
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    params = {"w1": jnp.linspace(-1, 1, 576).reshape(3, 3, 8, 8), "w2": jnp.linspace(1, -1, 576).reshape(3, 3, 8, 8)}
    x = jnp.linspace(0, 1, 1024).reshape(2, 8, 8, 8)

    def step(p, s, x):
        grads = jax.grad(lambda p: jnp.sum(conv(jax.nn.silu(conv(x, p["w1"])), p["w2"]) ** 2))(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    def param_copies(donate):
        hlo = jax.jit(step, donate_argnums=donate).lower(params, tx.init(params), x).compile().as_text()
        entry = hlo[hlo.index("ENTRY"):]
        names = set(re.findall(r"%([\w.\-]+) = f32\[3,3,8,8\]\S* parameter\(", entry))
        return sum(1 for n in re.findall(r"= f32\[3,3,8,8\]\S* copy\(%([\w.\-]+)\)", entry) if n in names)

    # What the policy avoids; if a new jaxlib stops copying, re-measure docs/benchmarks.md item 35.
    assert param_copies((0, 1)) >= 1
    assert param_copies(protocol.train_donation("cpu")) == 0
    new, _ = jax.jit(step, donate_argnums=protocol.train_donation("cpu"))(params, tx.init(params), x)
    # The donated step (what the policy replaces) computes the same update, bit for bit.
    ref, _ = jax.jit(step, donate_argnums=(0, 1))(jax.tree.map(jnp.copy, params), tx.init(params), x)
    assert all(bool(jnp.array_equal(new[k], ref[k])) for k in ref)
    assert not bool(jnp.array_equal(new["w2"], params["w2"]))  # the step did update
