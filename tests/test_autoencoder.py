"""Stage-1 models: shapes for every f, KL posterior maths, VQ assignment/gradients, adaptive weight, checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from ldm_jax.checkpoint import Checkpointer
from ldm_jax.losses import autoencoder as ae_losses
from ldm_jax.models.autoencoder import DiagonalGaussian, build_autoencoder
from ldm_jax.models.quantizer import VectorQuantizer


def tiny_cfg(type_="kl", ch_mult=(1, 2), **kw):
    c = dict(type=type_, embed_dim=3, ch=16, ch_mult=ch_mult, num_res_blocks=1, attn_resolutions=(8,),
             resolution=16, in_channels=3, z_channels=3, n_embed=32, norm_groups=8)
    c.update(kw)
    return ConfigDict(c)


@pytest.mark.parametrize("f", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("type_", ["kl", "vq"])
def test_encoder_decoder_shapes_for_every_factor(f, type_):
    mult = (1,) + (2,) * int(np.log2(f))
    model = build_autoencoder(tiny_cfg(type_, mult, resolution=32))
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    z = jax.eval_shape(lambda v, x: model.apply(v, x, method="encode_latent"), variables, x)
    assert z.shape == (2, 32 // f, 32 // f, 3)
    rec = jax.eval_shape(lambda v, z: model.apply(v, z, method="decode_latent"), variables, z)
    assert rec.shape == (2, 32, 32, 3)
    if type_ == "kl":  # double_z: the encoder itself emits 2 × z_channels moments
        enc = variables["params"]["encoder"]["conv_out"]["kernel"]
        assert enc.shape[-1] == 6


def test_attention_only_at_configured_resolutions_and_mid_switch():
    params = jax.eval_shape(build_autoencoder(tiny_cfg()).init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    enc = params["params"]["encoder"]
    assert "down_1_attn_0" in enc and "down_0_attn_0" not in enc  # res 16 → level 0, res 8 → level 1
    assert "mid_attn_1" in enc
    no_attn = jax.eval_shape(build_autoencoder(tiny_cfg(attn_resolutions=(), mid_attn=False)).init,
                             jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    assert not any("attn" in k for k in no_attn["params"]["encoder"])
    assert sum("block" in k for k in params["params"]["decoder"]) == 2 * 2 + 2  # one more per level + mid


def test_diagonal_gaussian_against_closed_form():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    logvar = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    logvar[0, 0, 0, 0] = 50.0  # clamped to 20
    post = DiagonalGaussian.from_moments(jnp.concatenate([mean, logvar], -1))
    lv = np.clip(logvar, -30, 20)
    np.testing.assert_allclose(post.logvar, lv)
    np.testing.assert_allclose(post.mode(), mean)
    expected_kl = 0.5 * np.sum(mean**2 + np.exp(lv) - 1 - lv, axis=(1, 2, 3))
    np.testing.assert_allclose(post.kl(), expected_kl, rtol=1e-5)
    small = DiagonalGaussian(jnp.full((4000, 1, 1, 1), 1.5), jnp.full((4000, 1, 1, 1), np.log(0.25)))
    s = np.asarray(small.sample(jax.random.key(0)))
    assert abs(s.mean() - 1.5) < 0.03 and abs(s.std() - 0.5) < 0.03


def test_vq_assignment_matches_brute_force():
    vq = VectorQuantizer(n_embed=17, embed_dim=5)
    z = jax.random.normal(jax.random.key(1), (3, 4, 4, 5)) * 0.1
    params = vq.init(jax.random.key(0), z)
    zq, _, info = vq.apply(params, z)
    cb = np.asarray(params["params"]["embedding"])
    flat = np.asarray(z).reshape(-1, 5)
    brute = np.argmin(((flat[:, None, :] - cb[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(np.asarray(info["indices"]).reshape(-1), brute)
    np.testing.assert_allclose(np.asarray(zq).reshape(-1, 5), cb[brute], atol=1e-6)
    counts = np.bincount(brute, minlength=17) / len(brute)
    np.testing.assert_allclose(info["perplexity"], np.exp(-np.sum(counts * np.log(counts + 1e-10))), rtol=1e-5)
    np.testing.assert_allclose(info["codebook_usage"], np.mean(counts > 0), rtol=1e-6)
    assert np.all(np.abs(cb) <= 1 / 17)  # uniform(−1/n, 1/n) init


def test_straight_through_gradient_is_identity_and_codebook_gets_only_its_terms():
    vq = VectorQuantizer(n_embed=8, embed_dim=4, beta=0.25)
    z = jax.random.normal(jax.random.key(2), (2, 3, 3, 4)) * 0.2
    params = vq.init(jax.random.key(0), z)
    w = jax.random.normal(jax.random.key(3), z.shape)

    def downstream(p, z):  # a loss on the quantised output only (what the decoder sees)
        zq, _, _ = vq.apply(p, z)
        return jnp.sum(w * zq)

    gp, gz = jax.grad(downstream, argnums=(0, 1))(params, z)
    np.testing.assert_allclose(gz, w, rtol=1e-6)  # straight-through: identity
    assert np.all(np.asarray(gp["params"]["embedding"]) == 0)  # codebook untouched by the decoder's loss

    def qloss(p, z):
        return vq.apply(p, z)[1]

    gp, gz = jax.grad(qloss, argnums=(0, 1))(params, z)
    cb = np.asarray(params["params"]["embedding"])
    flat = np.asarray(z).reshape(-1, 4)
    idx = np.argmin(((flat[:, None] - cb[None]) ** 2).sum(-1), 1)
    n = flat.size
    expect_cb = np.zeros_like(cb)  # d/de mean((e − sg z)²), textbook weight 1 on the codebook term
    np.add.at(expect_cb, idx, 2 * (cb[idx] - flat) / n)
    np.testing.assert_allclose(gp["params"]["embedding"], expect_cb, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gz).reshape(-1, 4), 0.25 * 2 * (flat - cb[idx]) / n, atol=1e-6)


def test_legacy_beta_placement_swaps_the_weights():
    z = jax.random.normal(jax.random.key(4), (1, 2, 2, 4))
    new, legacy = VectorQuantizer(8, 4, 0.25), VectorQuantizer(8, 4, 0.25, legacy_beta=True)
    params = new.init(jax.random.key(0), z)
    gz_new = jax.grad(lambda z: new.apply(params, z)[1])(z)
    gz_leg = jax.grad(lambda z: legacy.apply(params, z)[1])(z)
    np.testing.assert_allclose(gz_leg, gz_new / 0.25, rtol=1e-5)  # legacy: weight 1 on commitment


def test_ema_codebook_update_and_dead_code_restart():
    vq = VectorQuantizer(8, 2, ema_decay=0.9, dead_code_threshold=0.5)
    z = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 4, 2)), jnp.float32)
    v = vq.init(jax.random.key(0), z)
    _, st = vq.apply(v, z, train=True, mutable=["vq_ema"], rngs={"vq": jax.random.key(1)})
    cb0 = np.asarray(v["vq_ema"]["embedding"])
    flat = np.asarray(z).reshape(-1, 2)
    idx = np.argmin(((flat[:, None] - cb0[None]) ** 2).sum(-1), 1)
    counts = np.bincount(idx, minlength=8)
    cs = 0.9 * 1.0 + 0.1 * counts
    dead = cs < 0.5
    new_cs = np.asarray(st["vq_ema"]["cluster_size"])
    np.testing.assert_allclose(new_cs[~dead], cs[~dead], rtol=1e-6)
    np.testing.assert_allclose(new_cs[dead], 1.0)
    restarted = np.asarray(st["vq_ema"]["embedding"])[dead]
    assert all(any(np.allclose(r, f) for f in flat) for r in restarted)  # restarted at encoder outputs
    assert "params" not in v or "embedding" not in v.get("params", {}).get("quantize", {})


def test_adaptive_weight_last_layer_grad_matches_full_backprop():
    model = build_autoencoder(tiny_cfg(ch_mult=(1,), attn_resolutions=(), mid_attn=False, resolution=8))
    x = jax.random.uniform(jax.random.key(5), (2, 8, 8, 3), minval=-1, maxval=1)
    variables = model.init(jax.random.key(0), x)
    out = model.apply(variables, x)
    target = jax.random.normal(jax.random.key(6), x.shape)

    def loss_of_rec(r):
        return jnp.sum(jnp.abs(r - x)) + 0.3 * jnp.sum(r * target)

    def loss_of_kernel(k):
        p = jax.tree.map(lambda a: a, variables["params"])
        p["decoder"]["conv_out"]["kernel"] = k
        return loss_of_rec(model.apply({"params": p}, x)["rec"])

    conv = variables["params"]["decoder"]["conv_out"]
    direct = jax.grad(loss_of_kernel)(conv["kernel"])
    via_vjp = ae_losses.last_layer_grad(out["features"], conv, jax.grad(loss_of_rec)(out["rec"]))
    np.testing.assert_allclose(via_vjp, direct, rtol=1e-4, atol=1e-5)


def test_checkpoint_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    params = {"encoder": {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32)}},
              "codebook": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32), "logvar": jnp.float32(0.25)}
    state = {"params": params, "step": jnp.asarray(7, jnp.int32)}
    ck = Checkpointer(str(tmp_path), async_save=True)
    ck.save(7, state, {"note": "x"})
    ck.wait()
    restored, meta = ck.restore(jax.tree.map(jnp.zeros_like, state))
    ck.close()
    assert meta == {"note": "x"} and int(restored["step"]) == 7
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), state, restored)


def test_bad_model_config_errors():
    with pytest.raises(ValueError, match="model.type"):
        build_autoencoder(tiny_cfg("gan"))
    with pytest.raises(ValueError, match="norm_groups"):
        build_autoencoder(tiny_cfg(ch=12))
    with pytest.raises(ValueError, match="ema_decay"):
        build_autoencoder(tiny_cfg("vq", dead_code_threshold=1.0))
