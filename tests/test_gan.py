"""GAN losses, adaptive weight and the PatchGAN discriminator."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ldm_jax.losses.gan import (
    adaptive_disc_weight,
    adopt_weight,
    d_loss_fn,
    generator_adv_loss,
    hinge_d_loss,
    last_layer_grads,
    vanilla_d_loss,
)
from ldm_jax.models.discriminator import NLayerDiscriminator

REAL = np.array([2.0, 0.5, -1.0], np.float32)
FAKE = np.array([-2.0, 0.3, 1.5], np.float32)

# ----------------------------------------------------------------------------- losses


def test_hinge_by_hand():
    # relu(1 - real) = [0, 0.5, 2] -> mean 5/6; relu(1 + fake) = [0, 1.3, 2.5] -> mean 3.8/3.
    expected = 0.5 * (2.5 / 3 + 3.8 / 3)
    np.testing.assert_allclose(float(hinge_d_loss(REAL, FAKE)), expected, rtol=1e-6)
    assert float(hinge_d_loss(jnp.full(4, 3.0), jnp.full(4, -3.0))) == 0.0  # confident and correct: no loss


def test_vanilla_by_hand():
    sp = lambda t: math.log1p(math.exp(t))
    expected = 0.5 * (sum(sp(-r) for r in REAL) / 3 + sum(sp(f) for f in FAKE) / 3)
    np.testing.assert_allclose(float(vanilla_d_loss(REAL, FAKE)), expected, rtol=1e-6)
    # softplus form stays finite for large logits (no log(sigmoid) underflow)
    assert np.isfinite(float(vanilla_d_loss(jnp.array([-200.0]), jnp.array([200.0]))))


def test_generator_loss_and_lookup():
    np.testing.assert_allclose(float(generator_adv_loss(FAKE)), -(-2.0 + 0.3 + 1.5) / 3, rtol=1e-6)
    assert d_loss_fn("hinge") is hinge_d_loss and d_loss_fn("vanilla") is vanilla_d_loss
    with pytest.raises(ValueError, match="loss.disc_loss") as e:
        d_loss_fn("wasserstein")
    assert "\n" not in str(e.value)


def test_adopt_weight():
    assert float(adopt_weight(0.7, 10, 50)) == 0.0
    assert float(adopt_weight(0.7, 49, 50, value=0.1)) == pytest.approx(0.1)
    assert float(adopt_weight(0.7, 50, 50)) == pytest.approx(0.7)  # on from step == threshold
    f = jax.jit(lambda s: adopt_weight(1.0, s, 5))
    assert [float(f(s)) for s in (0, 4, 5, 100)] == [0.0, 0.0, 1.0, 1.0]


def test_adaptive_weight_linear_decoder():
    """x_hat = z W + b; nll = sum|x - x_hat| / B; g = -mean(x_hat v): grads w.r.t. W by jax and by hand."""
    rng = np.random.RandomState(0)
    bsz, d_in, d_out = 4, 3, 5
    z = rng.randn(bsz, d_in).astype(np.float32)
    x = rng.randn(bsz, d_out).astype(np.float32)
    w = rng.randn(d_in, d_out).astype(np.float32)
    b = rng.randn(d_out).astype(np.float32)
    v = rng.randn(d_out).astype(np.float32)

    nll = lambda k: jnp.sum(jnp.abs(x - (z @ k + b))) / bsz
    g_loss = lambda k: generator_adv_loss((z @ k + b) @ v)
    nll_grad, g_grad = last_layer_grads(nll, jnp.asarray(w)), last_layer_grads(g_loss, jnp.asarray(w))

    # By hand: d/dW sum|x - zW - b| = -z^T sign(x - x_hat); d/dW -mean(x_hat v) = -outer(sum_b z, v) / B.
    x_hat = z.astype(np.float64) @ w + b
    nll_np = -z.T @ np.sign(x - x_hat) / bsz
    g_np = -np.outer(z.sum(0), v) / bsz
    np.testing.assert_allclose(np.asarray(nll_grad), nll_np, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_grad), g_np, rtol=1e-5, atol=1e-6)

    expected = 0.5 * np.linalg.norm(nll_np) / (np.linalg.norm(g_np) + 1e-4)
    got = adaptive_disc_weight(nll_grad, g_grad, 0.5)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    # Pytrees of grads use the global norm over all leaves.
    got_tree = adaptive_disc_weight({"a": nll_grad[:1], "b": nll_grad[1:]}, [g_grad], 0.5)
    np.testing.assert_allclose(float(got_tree), expected, rtol=1e-5)


def test_adaptive_weight_clip_and_stop_gradient():
    zero, big = jnp.zeros((3, 3)), jnp.full((3, 3), 5.0)
    assert float(adaptive_disc_weight(zero, big, 0.5)) == 0.0
    # ||nll|| / (0 + 1e-4) = 15 / 1e-4 = 1.5e5 -> clipped to 1e4 *before* the disc_weight factor.
    np.testing.assert_allclose(float(adaptive_disc_weight(big, zero, 0.5)), 0.5 * 1e4, rtol=1e-6)
    np.testing.assert_allclose(float(adaptive_disc_weight(big, zero, 1.0, max_weight=10.0)), 10.0, rtol=1e-6)
    gn, gg = jax.grad(lambda a, c: adaptive_disc_weight(a, c, 0.5), argnums=(0, 1))(big, big * 2)
    assert float(jnp.abs(gn).max()) == 0.0 and float(jnp.abs(gg).max()) == 0.0


# ----------------------------------------------------------------------------- discriminator


@pytest.mark.parametrize("n_layers,size,out", [(2, 32, 6), (3, 32, 2), (2, 64, 14), (3, 64, 6)])
def test_patch_shape(n_layers, size, out):
    d = NLayerDiscriminator(ndf=8, n_layers=n_layers)
    x = jnp.zeros((2, size, size, 3))
    shapes = jax.eval_shape(lambda: d.init_with_output(jax.random.key(0), x, train=False))
    assert shapes[0].shape == (2, out, out, 1)


@pytest.fixture(scope="module")
def default_d():
    """Default discriminator (ndf 64, n_layers 3, batch norm), its variables and jitted train/eval applies.

    One shared init: compiling the random initialisers dominates this file's run time on CPU.
    """
    d = NLayerDiscriminator()
    variables = jax.jit(lambda k, x: d.init(k, x, train=False))(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))
    x = jax.random.normal(jax.random.key(2), (8, 32, 32, 3))
    train_fn = jax.jit(lambda v, x: d.apply(v, x, train=True, mutable=["batch_stats"]))
    eval_fn = jax.jit(lambda v, x: d.apply(v, x, train=False))
    return d, variables, x, train_fn, eval_fn


def test_init_stats(default_d):
    flat = traverse_util.flatten_dict(default_d[1]["params"], sep="/")
    kernels = {k: np.asarray(v) for k, v in flat.items() if k.endswith("kernel")}
    assert sorted(kernels) == [f"conv{i}/kernel" for i in range(5)]
    assert [kernels[f"conv{i}/kernel"].shape[-1] for i in range(5)] == [64, 128, 256, 512, 1]
    for k, w in kernels.items():
        assert w.shape[:2] == (4, 4)
        if w.size > 1000:
            assert abs(w.std() - 0.02) < 0.002 and abs(w.mean()) < 0.002, k
    # First and last conv have a bias; the batch-normed convs have none.
    biases = sorted(k for k in flat if k.endswith("bias") and k.startswith("conv"))
    assert biases == ["conv0/bias", "conv4/bias"]
    scales = np.concatenate([np.asarray(flat[f"norm{i}/scale"]) for i in (1, 2, 3)])
    assert abs(scales.mean() - 1.0) < 0.003 and abs(scales.std() - 0.02) < 0.004
    assert all(float(jnp.abs(flat[f"norm{i}/bias"]).max()) == 0.0 for i in (1, 2, 3))


def test_norm_variants():
    x = jnp.zeros((2, 32, 32, 3))
    for norm, has_stats in (("batch", True), ("group", False), ("none", False)):
        d = NLayerDiscriminator(ndf=8, n_layers=2, norm=norm)
        v = jax.eval_shape(lambda d=d: d.init(jax.random.key(0), x, train=True))
        assert ("batch_stats" in v) == has_stats
        names = set(traverse_util.flatten_dict(v["params"], sep="/"))
        assert ("conv1/bias" in names) == (norm == "none") and ("norm1/scale" in names) == (norm != "none")
    with pytest.raises(ValueError, match="norm"):
        jax.eval_shape(lambda: NLayerDiscriminator(norm="layer").init(jax.random.key(0), x, train=False))


def test_batch_stats_train_vs_eval(default_d):
    d, variables, x, train_fn, eval_fn = default_d
    out, upd = train_fn(variables, x)
    mean0 = np.asarray(variables["batch_stats"]["norm1"]["mean"])
    mean1 = np.asarray(upd["batch_stats"]["norm1"]["mean"])
    assert np.abs(mean0).max() == 0.0 and np.abs(mean1).max() > 0
    # momentum 0.9 (torch 0.1): new running mean = 0.1 * batch mean of the conv1 output.
    conv1 = jax.jit(lambda v, x: d.apply(
        v, x, train=True, mutable=["batch_stats", "intermediates"],
        capture_intermediates=lambda m, _: m.name == "conv1"))(variables, x)[1]["intermediates"]["conv1"]
    conv1 = conv1["__call__"][0]
    np.testing.assert_allclose(mean1, 0.1 * np.asarray(conv1).mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
    # Train mode normalises with batch statistics: a sample's logits depend on the rest of the batch.
    out_half, _ = train_fn(variables, x[:4])
    assert np.abs(np.asarray(out_half) - np.asarray(out[:4])).max() > 1e-4
    # Eval mode uses running averages and mutates nothing: per-sample results, same on repeated calls.
    e_full, e_half = eval_fn(variables, x), eval_fn(variables, x[:4])
    np.testing.assert_allclose(np.asarray(e_half), np.asarray(e_full[:4]), rtol=1e-5, atol=1e-6)


def test_batch_stats_global_under_sharding(default_d):
    """With the batch sharded over 8 devices, jit computes BatchNorm stats over the global batch."""
    _, variables, x, train_fn, _ = default_d
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    out_s, upd_s = train_fn(variables, xs)
    out, upd = train_fn(variables, x)
    np.testing.assert_allclose(np.asarray(out_s), np.asarray(out), rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(upd_s), jax.tree.leaves(upd), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
