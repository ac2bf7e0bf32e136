"""Issue #4 scale-out: a sharded train step equals the unsharded one (stage 1 with PatchGAN, stage 2), 2 processes
× 4 devices train like 1 process × 8, checkpoints restore onto other device counts, the non-finite guard skips
updates, gradient accumulation / remat / bfloat16 compute behave.

In-process steps run on the 8 forced host devices of conftest.py, compiled with cheap XLA options. The multi-host
run and the reference run are train.py subprocesses started first, so they overlap the in-process compiles.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import scaleout_utils as su
from scaleout_utils import FAST_COMPILE

from ldm_jax import workdir as W
from ldm_jax.checkpoint import Checkpointer
from ldm_jax.data.pipeline import make_dataset
from ldm_jax.training import autoencoder as ae_lib
from ldm_jax.training import ldm as L
from ldm_jax.training import mesh as mesh_lib
from ldm_jax.training.common import compile_step, replicate_to

MESHES = {"1 device": (1, 1, 1), "data=8": (8, 1, 8), "data=2,fsdp=4": (2, 4, 8)}  # data, fsdp, devices
MH_STEPS = 4


def _mesh(d: int, f: int, n: int):
    return mesh_lib.make_mesh(ml_collections.ConfigDict({"data": d, "fsdp": f}), jax.devices()[:n])


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _fsdp_sharded_leaves(shardings) -> int:
    return sum("fsdp" in tuple(s.spec) for s in jax.tree.leaves(shardings))


# --- background subprocesses: the reference run (shared with test_resume) and the 2-process run ---

@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "ae_runs"
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.fixture(scope="module")
def multihost(runs_root):
    """2 processes × 4 CPU devices (gloo collectives), coordinated over 127.0.0.1, same config as the reference."""
    ref = su.reference_run(runs_root)
    wd = os.path.join(runs_root, "multihost")
    port = su.free_port()
    procs = []
    for pid in range(2):
        overrides = dict(su.REF_OVERRIDES, **{
            "train.num_steps": MH_STEPS, "distributed.enabled": True,
            "distributed.coordinator_address": f"127.0.0.1:{port}", "distributed.num_processes": 2,
            "distributed.process_id": pid})
        procs.append(su.start_train(su.TINY_AE, wd, overrides, 4, log_path=f"{wd}.{pid}.log",
                                    extra_env={"JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}))
    yield {"ref": ref, "workdir": wd, "procs": procs}
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


# --- stage 1: one step with the discriminator active, on three meshes ---

@pytest.fixture(scope="module")
def ae(multihost):  # requests `multihost` only to start it early: it overlaps these compiles
    cfg = su.tiny_ae_config()
    model, disc, tx_g, tx_d = ae_lib.build_models(cfg)
    image_shape = (su.RES, su.RES, 1)
    init_fn = lambda key: ae_lib.init_state(cfg, model, disc, tx_g, tx_d, key, image_shape)  # noqa: E731
    key = jax.random.key(cfg.seed)
    abstract = jax.eval_shape(init_fn, key)
    host0 = _host(jax.jit(init_fn).lower(key).compile(FAST_COMPILE)(key))
    batch = make_dataset(cfg.data, "train", cfg.train.batch_size, cfg.seed).batch_at(0)
    step_fn = ae_lib.make_train_step(cfg, model, disc, tx_g, tx_d, use_disc=True)
    out = {"cfg": cfg, "abstract": abstract, "host0": host0, "batch": batch}
    for name, (d, f, n) in MESHES.items():
        mesh = _mesh(d, f, n)
        sh = mesh_lib.state_shardings(abstract, mesh, cfg.mesh.min_shard_size)
        state = jax.device_put(host0, sh)
        gb = mesh_lib.global_batch(batch, mesh)
        compiled, report = compile_step(step_fn, (state, gb, None), (sh, mesh_lib.batch_sharding(mesh), None),
                                        (sh, mesh_lib.replicated(mesh)), name=f"ae_step[{name}]",
                                        compiler_options=FAST_COMPILE)
        new_state, metrics = compiled(state, gb, None)
        out[name] = {"mesh": mesh, "shardings": sh, "compiled": compiled, "report": report,
                     "state": new_state, "metrics": _host(metrics)}
    return out


@pytest.mark.parametrize("name", ["data=8", "data=2,fsdp=4"])
def test_autoencoder_sharded_step_equals_unsharded(ae, name):
    ref, got = ae["1 device"], ae[name]
    assert got["metrics"]["finite"] == 1.0 and "d_loss" in got["metrics"]  # the discriminator took part
    for k in ("loss", "nll_loss", "kl_loss", "g_loss", "d_weight", "d_loss"):
        np.testing.assert_allclose(got["metrics"][k], ref["metrics"][k], rtol=1e-5, atol=1e-6, err_msg=k)
    a, b = _host(got["state"]), _host(ref["state"])
    assert int(a.step) == 1 and int(a.skipped) == 0
    moved = su.max_abs_diff(a.params, ae["host0"].params)
    assert moved > 1e-5  # the step really updated the parameters
    lr = ae["cfg"].train.base_lr * ae["cfg"].train.batch_size
    su.assert_adam_trained_alike(a.params, b.params, a.opt_state, b.opt_state, lr, steps=1)
    su.assert_adam_trained_alike(a.disc_params, b.disc_params, a.disc_opt_state, b.disc_opt_state, lr, steps=1)
    assert su.max_abs_diff(a.disc_state, b.disc_state) < 1e-5  # BatchNorm statistics of the global batch


def test_fsdp_really_shards_parameters(ae):
    got = ae["data=2,fsdp=4"]
    assert _fsdp_sharded_leaves(got["shardings"].params) >= 5
    kernel = got["state"].params["model"]["decoder"]["conv_out"]["kernel"]
    leaf = jax.tree.leaves(got["state"].params)
    sharded = [x for x in leaf if x.addressable_shards[0].data.size < x.size]
    assert sharded, "no parameter is split across devices"
    assert kernel.sharding.is_equivalent_to(got["shardings"].params["model"]["decoder"]["conv_out"]["kernel"],
                                            kernel.ndim)
    # The compile report the train loop logs: time, FLOPs per step, memory.
    assert {"compile_s", "gflops_per_step", "memory_gib"} <= set(got["report"])
    assert got["report"]["gflops_per_step"] > 0


def test_nonfinite_batch_skips_update(ae):
    """A NaN pixel: loss and grads are NaN, so params, optimizer and discriminator states stay as they were."""
    run = ae["1 device"]
    state = jax.device_put(ae["host0"], run["shardings"])
    image = ae["batch"]["image"].copy()
    image[3, 5, 7, 0] = np.nan
    gb = mesh_lib.global_batch({**ae["batch"], "image": image}, run["mesh"])
    new_state, metrics = run["compiled"](state, gb, None)
    new = _host(new_state)
    assert float(metrics["finite"]) == 0.0 and not np.isfinite(float(metrics["loss"]))
    assert int(new.skipped) == 1 and int(new.step) == 1
    for field in ("params", "opt_state", "model_state", "disc_params", "disc_state", "disc_opt_state"):
        su.assert_trees_equal(getattr(new, field), getattr(ae["host0"], field))
    # ... and the next finite batch trains normally from there.
    gb = mesh_lib.global_batch(ae["batch"], run["mesh"])
    newer, metrics = run["compiled"](jax.device_put(new, run["shardings"]), gb, None)
    assert float(metrics["finite"]) == 1.0 and int(newer.skipped) == 1


def test_restore_onto_fewer_devices_is_bit_identical(ae, tmp_path):
    """Saved fsdp-sharded over 8 devices; restored onto 4 (fsdp=4 and data=2,fsdp=2) and onto 1 device."""
    saved = ae["data=2,fsdp=4"]["state"]
    expected = _host(saved)
    ckpt = Checkpointer(str(tmp_path))  # async, as in training
    ckpt.save(1, saved, {"config": ae["cfg"].to_dict()})
    ckpt.close()
    for d, f, n in ((1, 4, 4), (2, 2, 4), (1, 1, 1)):
        mesh = _mesh(d, f, n)
        sh = mesh_lib.state_shardings(ae["abstract"], mesh, ae["cfg"].mesh.min_shard_size)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), ae["abstract"], sh)
        reader = Checkpointer(str(tmp_path), async_save=False)
        state, meta = reader.restore(target)
        reader.close()
        assert meta["config"]["model"]["ch"] == ae["cfg"].model.ch
        su.assert_trees_equal(_host(state), expected)
        assert int(state.step) == 1
        for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(sh), strict=True):
            assert x.sharding.is_equivalent_to(s, x.ndim)
        if f > 1:
            assert _fsdp_sharded_leaves(sh.params) >= 5


# --- stage 2: one step of a tiny UNet on three meshes; grad accumulation, remat, bfloat16 ---

@pytest.fixture(scope="module")
def ldm(tmp_path_factory):
    fs_dir = str(tmp_path_factory.mktemp("stage1"))
    su.write_stage1_workdir(fs_dir, su.tiny_ae_config())
    fs = W.load_first_stage(fs_dir)
    cfg = su.tiny_ldm_config(fs_dir)
    model, sched, tx = W.build_model(cfg, fs), W.make_schedule(cfg), L.make_optimizer(cfg)
    latent_shape = (su.RES // fs.factor, su.RES // fs.factor, fs.latent_channels)
    init_fn = lambda key: L.init_state(cfg, model, tx, key, latent_shape, {}, 1.0)  # noqa: E731
    key = jax.random.key(cfg.seed)
    abstract = jax.eval_shape(init_fn, key)
    host0 = _host(jax.jit(init_fn).lower(key).compile(FAST_COMPILE)(key))
    batch = make_dataset(cfg.data, "train", cfg.train.batch_size, cfg.seed).batch_at(0)
    step_fn = L.make_train_step(cfg, model, fs, tx, sched)
    out = {"cfg": cfg, "fs": fs, "fs_dir": fs_dir, "sched": sched, "host0": host0, "batch": batch,
           "latent_shape": latent_shape, "model": model}
    for name, (d, f, n) in MESHES.items():
        mesh = _mesh(d, f, n)
        sh = mesh_lib.state_shardings(abstract, mesh, cfg.mesh.min_shard_size)
        fs_vars = replicate_to(fs.variables, mesh)
        rep = mesh_lib.replicated(mesh)
        gb = mesh_lib.global_batch({"image": batch["image"]}, mesh)
        fs_sh = jax.tree.map(lambda _, r=rep: r, fs_vars)
        compiled, _ = compile_step(step_fn, (jax.device_put(host0, sh), gb, fs_vars, None),
                                   (sh, mesh_lib.batch_sharding(mesh), fs_sh, None),
                                   (sh, rep), name=f"ldm_step[{name}]", compiler_options=FAST_COMPILE)
        new_state, metrics = compiled(jax.device_put(host0, sh), gb, fs_vars, None)
        out[name] = {"state": new_state, "metrics": _host(metrics), "shardings": sh}
    return out


@pytest.mark.parametrize("name", ["data=8", "data=2,fsdp=4"])
def test_ldm_sharded_step_equals_unsharded(ldm, name):
    ref, got = ldm["1 device"], ldm[name]
    assert got["metrics"]["finite"] == 1.0
    for k in ("loss", "grad_norm", "latent_std"):
        np.testing.assert_allclose(got["metrics"][k], ref["metrics"][k], rtol=1e-5, atol=1e-7, err_msg=k)
    a, b = _host(got["state"]), _host(ref["state"])
    assert su.max_abs_diff(a.params, ldm["host0"].params) > 1e-5
    lr = ldm["cfg"].train.base_lr  # scale_lr off
    su.assert_adam_trained_alike(a.params, b.params, a.opt_state, b.opt_state, lr, steps=1)
    # EMA after one step: decay min(0.9, 1/10) = 0.1 of the old + 0.9 of the new params.
    su.assert_adam_trained_alike(a.ema_params, b.ema_params, a.opt_state, b.opt_state, 0.9 * lr, steps=1)
    if name == "data=2,fsdp=4":
        assert _fsdp_sharded_leaves(got["shardings"].params) >= 5


def _grad_capture() -> optax.GradientTransformation:
    """An 'optimizer' whose state becomes the gradient it was given and whose update is zero."""
    return optax.GradientTransformation(
        lambda p: jax.tree.map(jnp.zeros_like, p), lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))


def _jit1(fn, *args):
    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)


def _fresh_state(host0, tx) -> L.LDMState:
    return L.LDMState(step=jnp.zeros((), jnp.int32), params=host0.params, ema_params=host0.params,
                      opt_state=tx.init(host0.params), scale_factor=jnp.float32(1.0), skipped=jnp.zeros((), jnp.int32))


@pytest.fixture(scope="module")
def micro(ldm):
    """The float32 gradients and losses of the two half-batches at steps 0 and 1, from the real step function."""
    fs, host0 = ldm["fs"], ldm["host0"]
    halves = [{"image": jnp.asarray(ldm["batch"]["image"][i:i + 4])} for i in (0, 4)]
    cap_fn = L.make_train_step(ldm["cfg"], ldm["model"], fs, _grad_capture(), ldm["sched"])
    c0 = _fresh_state(host0, _grad_capture())
    cap = _jit1(cap_fn, c0, halves[0], fs.variables, None)
    c1, n1 = cap(c0, halves[0], fs.variables, None)
    c2, n2 = cap(c1, halves[1], fs.variables, None)
    return {"halves": halves, "grads": (_host(c1.opt_state), _host(c2.opt_state)),
            "losses": (float(n1["loss"]), float(n2["loss"]))}


def test_grad_accumulation_with_remat_equals_mean_gradient_update(ldm, micro):
    """train.grad_accum=2 (optax.MultiSteps) + remat: micro-step 1 leaves params alone; after micro-step 2 they
    equal one AdamW update with the mean of the two micro-batch gradients. (Each micro-step draws its own
    noise and timesteps from its step number, so B/2 + B/2 is by design not the same draw as one batch of B.)"""
    fs, host0, halves = ldm["fs"], ldm["host0"], micro["halves"]
    cfg = su.tiny_ldm_config(ldm["fs_dir"], **{"train.grad_accum": 2, "model.unet.remat_policy": "dots_saveable"})
    model_acc, tx_acc = W.build_model(cfg, fs), L.make_optimizer(cfg)
    assert isinstance(tx_acc, optax.MultiSteps)
    acc_fn = L.make_train_step(cfg, model_acc, fs, tx_acc, ldm["sched"])
    s0 = _fresh_state(host0, tx_acc)
    acc = _jit1(acc_fn, s0, halves[0], fs.variables, None)
    s1, m1 = acc(s0, halves[0], fs.variables, None)
    su.assert_trees_equal(_host(s1.params), host0.params)  # accumulating, not applying
    s2, m2 = acc(s1, halves[1], fs.variables, None)
    # remat recomputes activations in the backward pass: the same losses to float precision.
    np.testing.assert_allclose([float(m1["loss"]), float(m2["loss"])], micro["losses"], rtol=1e-5)
    tx_plain = L.make_optimizer(ldm["cfg"])  # the same AdamW without accumulation
    g1, g2 = micro["grads"]
    mean_g = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    updates, _ = tx_plain.update(mean_g, tx_plain.init(host0.params), host0.params)
    expected = optax.apply_updates(host0.params, updates)
    assert su.max_abs_diff(expected, host0.params) > 1e-4
    su.assert_params_close(_host(s2.params), expected, mean_g, ldm["cfg"].train.base_lr, steps=1, tol=2e-6)


def test_bfloat16_compute_keeps_float32_params(ldm):
    """model.dtype=bfloat16: a finite step, float32 params and optimizer moments, and gradients close to (but not
    the same as) the float32 step's on the same batch and noise."""
    fs, host0 = ldm["fs"], ldm["host0"]
    cfg = su.tiny_ldm_config(ldm["fs_dir"], **{"model.dtype": "bfloat16"})
    model, tx = W.build_model(cfg, fs), L.make_optimizer(cfg)
    step_fn = L.make_train_step(cfg, model, fs, tx, ldm["sched"])
    state = _fresh_state(host0, tx)
    batch = {"image": jnp.asarray(ldm["batch"]["image"])}
    new, metrics = _jit1(step_fn, state, batch, fs.variables, None)(state, batch, fs.variables, None)
    assert float(metrics["finite"]) == 1.0 and np.isfinite(float(metrics["loss"]))
    for tree in (new.params, new.ema_params, su.adam_mu(new.opt_state)):
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(tree))
    assert su.max_abs_diff(_host(new.params), host0.params) > 1e-5
    mu = jax.tree.leaves(_host(su.adam_mu(new.opt_state)))
    mu32 = jax.tree.leaves(_host(su.adam_mu(ldm["1 device"]["state"].opt_state)))
    scale = max(float(np.max(np.abs(m))) for m in mu32)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(mu, mu32, strict=True))
    assert 0 < diff < 0.05 * scale, (diff, scale)  # bf16 is in effect (8-bit mantissa) and still close


# --- 2 processes × 4 devices train like 1 process × 8 devices ---

def test_two_processes_train_like_one(multihost):
    procs = multihost["procs"]
    for p in procs:
        rc = su.wait(p, 600)
        assert rc == 0, f"process {procs.index(p)} failed ({rc}):\n{su.log_tail(p)}"
    wd = multihost["workdir"]
    assert su.committed_steps(wd)[-1] == MH_STEPS
    ref_wd = multihost["ref"].wait()
    got, _ = su.restore_host(wd, MH_STEPS)
    ref, _ = su.restore_host(ref_wd, MH_STEPS)
    assert int(got["step"]) == MH_STEPS
    cfg = su.tiny_ae_config()
    lr = cfg.train.base_lr * cfg.train.batch_size
    su.assert_adam_trained_alike(got["params"], ref["params"], got["opt_state"], ref["opt_state"], lr, MH_STEPS)
    su.assert_adam_trained_alike(got["disc_params"], ref["disc_params"], got["disc_opt_state"],
                                 ref["disc_opt_state"], lr, MH_STEPS)
    assert su.max_abs_diff(got["disc_state"], ref["disc_state"]) < 1e-4
    # Per-step training losses logged by process 0 vs the single-process run.
    got_loss = su.logged_metric(procs[0], "loss")
    ref_loss = su.logged_metric(multihost["ref"].proc, "loss")
    assert sorted(got_loss) == list(range(1, MH_STEPS + 1))
    np.testing.assert_allclose([got_loss[k] for k in sorted(got_loss)], [ref_loss[k] for k in sorted(got_loss)],
                               rtol=2e-5)
    # Both processes wrote their shards through Orbax.
    state_dir = os.path.join(wd, "checkpoints", str(MH_STEPS), "state")
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir))


# --- 2 processes: scale_by_std from the global batch, as one process computes it ---

def test_two_process_scale_by_std_uses_the_global_batch(tmp_path):
    fs_dir = str(tmp_path / "s1")
    su.write_stage1_workdir(fs_dir, su.tiny_ae_config())
    tiny_ldm = os.path.join(su.REPO, "tests", "tiny_config.py") + ":ldm"
    port, wd, procs = su.free_port(), str(tmp_path / "ldm"), []
    for pid in range(2):
        overrides = {"first_stage.workdir": fs_dir, "first_stage.scale_by_std": True, "train.num_steps": 1,
                     "distributed.enabled": True, "distributed.coordinator_address": f"127.0.0.1:{port}",
                     "distributed.num_processes": 2, "distributed.process_id": pid}
        procs.append(su.start_train(tiny_ldm, wd, overrides, 4, log_path=f"{wd}.{pid}.log",
                                    extra_env={"JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}))
    for p in procs:
        assert su.wait(p, 600) == 0, su.log_tail(p)
    got = [float(su.logged_scale(p)) for p in procs]
    # The same factor in one process from the whole of batch 0 (a posterior sample with the run's key).
    from ldm_jax.training.train_ldm import scale_key

    cfg = su.tiny_ldm_config(fs_dir, **{"first_stage.scale_by_std": True})
    fs = W.load_first_stage(fs_dir)
    images = make_dataset(cfg.data, "train", cfg.train.batch_size, cfg.seed).batch_at(0)["image"]
    want = L.first_batch_scale(fs, images, scale_key(cfg))
    assert got[0] == got[1] == pytest.approx(want, rel=1e-4)
    half = L.first_batch_scale(fs, images[:4], scale_key(cfg))  # what process 0 alone would have computed
    assert abs(half - want) > 1e-3 * want
    state, _ = su.restore_host(wd, 1)
    assert float(state["scale_factor"]) == pytest.approx(want, rel=1e-4)
