"""UNet, attention and conditioning-encoder tests (tiny configs; one compiled init per config)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.attention import CrossAttention, SpatialTransformer, padded_attention
from ldm_jax.models.unet import ResBlock, UNetModel, skip_parts, timestep_embedding, validate_unet_config

# rbg keys: XLA compiles the many per-parameter threefry samplers of an init several times slower on CPU.
KEY = jax.random.key(0, impl="rbg")
# Tests are compile-bound on a shared 2-core CPU: unoptimised XLA code compiles ~2x faster and runs fine.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_jit(fn, static_argnames=()):
    """jax.jit with cheaper CPU compiler options; compiled once per argument signature."""
    jitted, cache = jax.jit(fn, static_argnames=static_argnames), {}

    def call(*args, **kwargs):
        dyn = {k: v for k, v in kwargs.items() if k not in static_argnames}
        key = str(jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), (args, dyn))) + str(
            sorted((k, kwargs[k]) for k in static_argnames if k in kwargs)
        )
        if key not in cache:
            cache[key] = jitted.lower(*args, **kwargs).compile(compiler_options=FAST_COMPILE)
        return cache[key](*args, **dyn)

    return call


CTX_DIM = 16
ST_CFG = dict(
    in_channels=4,
    out_channels=4,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(2,),
    num_heads=2,
    use_spatial_transformer=True,
    context_dim=CTX_DIM,
)
CLS_CFG = dict(
    in_channels=4,
    out_channels=3,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(1, 2),
    num_head_channels=32,
    num_classes=11,
    use_scale_shift_norm=True,
    resblock_updown=True,
    dropout=0.1,
)
X8 = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 4)), jnp.float32)
T = jnp.array([3, 700])
CTX = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, CTX_DIM)), jnp.float32)
Y = jnp.array([2, 10])


def perturb(params, scale=0.05, seed=0):
    """Add noise to every leaf so zero-initialised layers stop hiding the conditioning paths."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p + scale * rng.normal(size=p.shape).astype(np.float32), params)


def random_params(shapes, seed=0):
    """Random params from eval_shape structs without compiling an init (XLA CPU compiles samplers slowly)."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = jax.tree_util.keystr(path[-1:])
        if "scale" in name:
            return jnp.asarray(1.0 + 0.05 * rng.normal(size=s.shape), jnp.float32)
        std = 1.0 / math.sqrt(math.prod(s.shape[:-1])) if len(s.shape) > 1 else 0.05
        return jnp.asarray(std * rng.normal(size=s.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def n_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def st_unet():
    model = UNetModel(**ST_CFG)
    params = fast_jit(model.init)(KEY, X8, T, CTX)
    return model, params, fast_jit(model.apply)


@pytest.fixture(scope="module")
def cls_unet():
    """Class-conditional config with random (not initial) params: the zero-init check runs on st_unet."""
    model = UNetModel(**CLS_CFG)
    params = random_params(jax.eval_shape(lambda k: model.init(k, X8, T, y=Y), KEY))
    return model, params, fast_jit(model.apply)


def test_initial_output_is_zero_at_two_sizes(st_unet):
    model, params, apply = st_unet
    x16 = jnp.tile(X8, (1, 2, 2, 1))
    for x in (X8, x16):
        out = np.asarray(apply(params, x, T, CTX))
        assert out.shape == x.shape[:3] + (4,) and out.dtype == np.float32
        assert np.all(out == 0.0)
    # perturbed: both sizes run from the same params and give non-trivial outputs
    p = perturb(params)
    assert np.abs(np.asarray(apply(p, x16, T, CTX))).mean() > 1e-3


def test_output_depends_on_timesteps_and_context(st_unet):
    model, params, apply = st_unet
    p = perturb(params)
    base = np.asarray(apply(p, X8, T, CTX))
    np.testing.assert_array_equal(base, np.asarray(apply(p, X8, T, CTX)))
    assert np.abs(base - np.asarray(apply(p, X8, jnp.array([3, 20]), CTX))).max() > 1e-4
    # changing sample 1's context changes sample 1 only (no mixing across the batch)
    ctx2 = CTX.at[1].set(-CTX[1])
    other = np.asarray(apply(p, X8, T, ctx2))
    np.testing.assert_allclose(other[0], base[0], atol=1e-6)
    assert np.abs(other[1] - base[1]).max() > 1e-4


def test_output_depends_on_class_label(cls_unet):
    model, p, apply = cls_unet
    a = np.asarray(apply(p, X8, T, y=Y))
    b = np.asarray(apply(p, X8, T, y=jnp.array([2, 5])))
    assert a.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)
    assert np.abs(a[1] - b[1]).max() > 1e-3
    with pytest.raises(ValueError, match="y"):
        jax.eval_shape(model.apply, p, X8, T)


def test_bfloat16_compute_keeps_float32_params(cls_unet):
    _, p, apply32 = cls_unet
    bf = UNetModel(**CLS_CFG, dtype=jnp.bfloat16)
    shapes = jax.eval_shape(lambda k: bf.init(k, X8, T, y=Y), KEY)
    assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    out = np.asarray(fast_jit(bf.apply)(p, X8, T, y=Y))
    ref = np.asarray(apply32(p, X8, T, y=Y))
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert 0 < rel < 0.05, rel  # bf16 really used (not bit-equal), yet close


def test_resblock_dropout_only_in_train():
    x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 4, 4, 32)), jnp.float32)
    emb = jnp.ones((2, 16))
    rb = ResBlock(32, dropout=0.5)
    p = random_params(jax.eval_shape(rb.init, KEY, x, emb))
    ev1, ev2 = rb.apply(p, x, emb), rb.apply(p, x, emb, False)
    np.testing.assert_array_equal(np.asarray(ev1), np.asarray(ev2))
    tr = rb.apply(p, x, emb, True, rngs={"dropout": jax.random.key(1)})
    assert np.abs(np.asarray(tr - ev1)).max() > 1e-3


def test_timestep_embedding_matches_numpy():
    t = np.array([0, 1, 17, 999], np.float32)
    for dim in (32, 7):
        half = dim // 2
        freqs = np.exp(-np.log(10000.0) * np.arange(half) / half)
        args = t[:, None].astype(np.float64) * freqs[None]
        want = np.concatenate([np.cos(args), np.sin(args)] + ([np.zeros((4, 1))] if dim % 2 else []), axis=1)
        got = np.asarray(timestep_embedding(jnp.asarray(t), dim))
        assert got.shape == (4, dim)
        np.testing.assert_allclose(got, want, atol=2e-4)


def test_cross_attention_matches_numpy():
    x = np.random.default_rng(2).normal(size=(2, 6, 24)).astype(np.float32)
    ctx = np.random.default_rng(3).normal(size=(2, 5, 12)).astype(np.float32)
    heads, dh = 3, 8
    mod = CrossAttention(24, 12, heads=heads, dim_head=dh)
    params = mod.init(KEY, x, ctx)["params"]
    got = np.asarray(mod.apply({"params": params}, x, ctx))
    w = jax.tree.map(np.asarray, params)
    assert set(w["to_q"]) == {"kernel"} and set(w["to_out"]) == {"kernel", "bias"}

    def heads_of(a):
        return a.reshape(a.shape[0], a.shape[1], heads, dh).transpose(0, 2, 1, 3)

    q, k, v = (
        heads_of(x @ w["to_q"]["kernel"]),
        heads_of(ctx @ w["to_k"]["kernel"]),
        heads_of(ctx @ w["to_v"]["kernel"]),
    )
    s = q @ k.transpose(0, 1, 3, 2) * dh**-0.5
    s = np.exp(s - s.max(-1, keepdims=True))
    o = (s / s.sum(-1, keepdims=True)) @ v
    want = o.transpose(0, 2, 1, 3).reshape(2, 6, heads * dh) @ w["to_out"]["kernel"] + w["to_out"]["bias"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # context None -> self-attention with the same weights (here a 24-d context projection)
    self_mod = CrossAttention(24, None, heads=heads, dim_head=dh)
    sp = self_mod.init(KEY, x)["params"]
    assert sp["to_k"]["kernel"].shape == (24, heads * dh)
    with pytest.raises(ValueError, match="context_dim"):
        mod.apply({"params": params}, x, ctx[..., :8])


def test_padded_attention_masks_the_padding():
    # the cuDNN route pads lengths to multiples of 64 and masks; checked here through the XLA implementation
    rng = np.random.default_rng(9)
    q, k, v = (jnp.asarray(rng.normal(size=(2, n, 2, 8)), jnp.float32) for n in (16, 77, 77))
    want = jax.nn.dot_product_attention(q, k, v, scale=0.3)
    got = padded_attention(q, k, v, 0.3, impl="xla")
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_spatial_transformer_is_identity_at_init(st_unet):
    # the UNet's first SpatialTransformer (64 channels, 2 heads of 32), freshly initialised by the fixture
    _, params, _ = st_unet
    st_params = {"params": params["params"]["input_blocks_3_1"]}
    assert st_params["params"]["proj_in"]["kernel"].shape == (1, 1, 64, 64)
    st = SpatialTransformer(64, n_heads=2, d_head=32, context_dim=CTX_DIM)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 4, 4, 64)), jnp.float32)
    apply = fast_jit(st.apply)
    np.testing.assert_array_equal(np.asarray(apply(st_params, x, CTX)), np.asarray(x))
    assert np.abs(np.asarray(apply(perturb(st_params), x, CTX) - x)).max() > 1e-3
    deep = jax.eval_shape(SpatialTransformer(64, 2, 32, depth=3, context_dim=CTX_DIM).init, KEY, x, CTX)
    assert {k for k in deep["params"] if k.startswith("transformer_blocks_")} == {
        f"transformer_blocks_{i}" for i in range(3)
    }


# ---- parameter counts against a hand count of the reference structure (torch layer sizes) ----
def _lin(i, o, bias=True):
    return i * o + (o if bias else 0)


def _conv(i, o, k):
    return k * k * i * o + o


def _res(i, o, emb, scale_shift=False):
    return (
        2 * i
        + _conv(i, o, 3)
        + _lin(emb, (2 if scale_shift else 1) * o)
        + 2 * o
        + _conv(o, o, 3)
        + (_conv(i, o, 1) if i != o else 0)
    )


def _st(c, heads, dh, ctx):
    n = heads * dh
    block = 6 * n + 3 * n * n + _lin(n, n) + n * n + 2 * ctx * n + _lin(n, n) + _lin(n, 8 * n) + _lin(4 * n, n)
    return 2 * c + _conv(c, n, 1) + block + _conv(n, c, 1)


def _attn(c):
    return 2 * c + _lin(c, 3 * c) + _lin(c, c)


def test_param_count_matches_hand_count():
    emb = 128
    time_mlp = _lin(32, emb) + _lin(emb, emb)
    st = _st(64, 2, 32, CTX_DIM)
    want_st = (
        time_mlp
        + _conv(4, 32, 3)
        + _res(32, 32, emb)
        + _conv(32, 32, 3)
        + _res(32, 64, emb)
        + st  # down path
        + _res(64, 64, emb)
        + st
        + _res(64, 64, emb)  # middle
        + _res(128, 64, emb)
        + st
        + _res(96, 64, emb)
        + st
        + _conv(64, 64, 3)  # up, ds 2
        + _res(96, 32, emb)
        + _res(64, 32, emb)  # up, ds 1
        + 2 * 32
        + _conv(32, 4, 3)
    )
    got = jax.eval_shape(UNetModel(**ST_CFG).init, KEY, X8, T, CTX)
    assert n_params(got) == want_st

    r = lambda i, o: _res(i, o, emb, scale_shift=True)
    want_cls = (
        time_mlp
        + 11 * emb
        + _conv(4, 32, 3)
        + r(32, 32)
        + _attn(32)
        + r(32, 32)
        + r(32, 64)
        + _attn(64)  # down (resblock down, no conv)
        + r(64, 64)
        + _attn(64)
        + r(64, 64)
        + r(128, 64)
        + _attn(64)
        + r(96, 64)
        + _attn(64)
        + r(64, 64)  # up (resblock up)
        + r(96, 32)
        + _attn(32)
        + r(64, 32)
        + _attn(32)
        + 2 * 32
        + _conv(32, 3, 3)
    )
    got = jax.eval_shape(lambda k: UNetModel(**CLS_CFG).init(k, X8, T, y=Y), KEY)
    assert n_params(got) == want_cls
    # a single ResBlock module against the formula
    rb = jax.eval_shape(ResBlock(64).init, KEY, jnp.zeros((1, 4, 4, 32)), jnp.zeros((1, 128)))
    assert n_params(rb) == _res(32, 64, 128)


# ---- remat (an even smaller config: one level, ResBlocks + SpatialTransformers only) ----
REMAT_CFG = dict(
    in_channels=4,
    out_channels=4,
    model_channels=32,
    channel_mult=(1,),
    num_res_blocks=1,
    attention_resolutions=(1,),
    num_head_channels=16,
    use_spatial_transformer=True,
    context_dim=CTX_DIM,
)
X4 = X8[:, :4, :4]


@pytest.fixture(scope="module")
def remat_reference():
    model = UNetModel(**REMAT_CFG)
    p = random_params(jax.eval_shape(model.init, KEY, X4, T, CTX), seed=5)
    w = jnp.asarray(np.random.default_rng(6).normal(size=X4.shape), jnp.float32)

    def loss_fn(m):
        return lambda q: jnp.sum(m.apply(q, X4, T, CTX) * w)

    return p, loss_fn, fast_jit(jax.value_and_grad(loss_fn(model)))(p)


def _remat_policies(jaxpr) -> list:
    """Policies of all remat (jax.checkpoint) equations, searching nested jaxprs."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name.startswith(("remat", "checkpoint")):
            found.append(eqn.params.get("policy"))
        for v in eqn.params.values():
            inner = getattr(v, "jaxpr", v)
            if hasattr(inner, "eqns"):
                found += _remat_policies(inner)
    return found


@pytest.mark.parametrize(
    "policy, expected",
    [
        ("full", None),
        ("dots_saveable", jax.checkpoint_policies.dots_saveable),
        ("nothing_saveable", jax.checkpoint_policies.nothing_saveable),
    ],
)
def test_remat_wraps_every_resblock_and_transformer(policy, expected):
    model = UNetModel(**REMAT_CFG, remat_policy=policy)
    p = jax.eval_shape(model.init, KEY, X4, T, CTX)
    found = _remat_policies(jax.make_jaxpr(lambda q: model.apply(q, X4, T, CTX))(p).jaxpr)
    assert len(found) == 6 + 3 and all(f == expected for f in found)  # 6 ResBlocks, 3 SpatialTransformers
    assert _remat_policies(jax.make_jaxpr(lambda q: UNetModel(**REMAT_CFG).apply(q, X4, T, CTX))(p).jaxpr) == []


# nothing_saveable is the same computation as "full" (save nothing), so two compiled comparisons suffice.
@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_policies_match_no_remat(remat_reference, policy):
    p, loss_fn, (loss0, grads0) = remat_reference
    loss, grads = fast_jit(jax.value_and_grad(loss_fn(UNetModel(**REMAT_CFG, remat_policy=policy))))(p)
    np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6)
    assert abs(float(loss0)) > 1e-3
    # same maths; XLA may fuse the recomputation differently, so allow float32 rounding
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads0))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale)


# ---- config errors ----
@pytest.mark.parametrize(
    "change, field",
    [
        (dict(attention_resolutions=(4,)), "attention_resolutions"),
        (dict(attention_resolutions=(3,)), "attention_resolutions"),
        (dict(num_heads=3), "num_heads"),
        (dict(num_heads=-1, num_head_channels=24), "num_head_channels"),
        (dict(num_head_channels=32), "num_heads / num_head_channels"),
        (dict(num_heads=-1), "num_heads / num_head_channels"),
        (dict(context_dim=None), "context_dim"),
        (dict(model_channels=24), "model_channels"),
        (dict(remat_policy="everything"), "remat_policy"),
        (dict(attention_impl="flash"), "attention_impl"),
        (dict(attention_impl="cudnn"), "attention_impl"),  # float32 compute
    ],
)
def test_config_errors(change, field):
    cfg = {**ST_CFG, **change}
    kwargs = {k: v for k, v in cfg.items() if k not in ("in_channels", "out_channels")}
    with pytest.raises(ValueError, match=field) as err:
        validate_unet_config(**kwargs)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=field):  # the same check runs in the module's setup
        jax.eval_shape(UNetModel(**cfg).init, KEY, X8, T, CTX)


def test_call_time_errors(st_unet):
    model, params, _ = st_unet
    with pytest.raises(ValueError, match="context"):
        jax.eval_shape(model.apply, params, X8, T)
    with pytest.raises(ValueError, match="context_dim"):
        jax.eval_shape(model.apply, params, X8, T, CTX[..., :8])
    with pytest.raises(ValueError, match="y"):
        jax.eval_shape(model.apply, params, X8, T, CTX, Y)


def test_shared_x_batch_equals_tiled_inputs(st_unet, cls_unet):
    """Conditions with 2B rows and x with B: the output is the tiled-input output (guided sampling's prefix
    sharing); for a cross-attention UNet the layers before the first cross-attention run on B rows only."""
    model, params, apply = st_unet
    params = perturb(params)
    ctx2 = jnp.concatenate([CTX, -CTX])
    tiled = apply(params, jnp.concatenate([X8, X8]), jnp.concatenate([T, T]), ctx2)
    shared = apply(params, X8, T, ctx2)
    assert shared.shape == (4, 8, 8, 4)
    np.testing.assert_allclose(shared, tiled, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(shared[:2] - shared[2:]).max()) > 1e-3  # the two halves do differ (different contexts)
    jaxpr = str(jax.make_jaxpr(lambda x: model.apply(params, x, T, ctx2))(X8))
    conv_batches = [int(b) for b in re.findall(r"f32\[(\d+),\d+,\d+,\d+\] = conv_general_dilated", jaxpr)]
    # input conv, ResBlock (2 convs), Downsample, ResBlock (2 convs) on B rows; then 2B rows, except the shared
    # skip connections' parts of three output ResBlocks' in_conv and 1x1 skip conv (skip_parts)
    assert conv_batches[:6] == [2] * 6 and conv_batches[6:].count(2) == 6 and set(conv_batches[6:]) == {2, 4}
    # 1x1 convs are dots (fast_ops.pointwise_conv_general_dilated): that ResBlock's skip and the first proj_in
    # run on B rows, every later one on 2B
    pointwise_batches = [int(b) for b in re.findall(r"f32\[(\d+),\d+,\d+,\d+\] = dot_general", jaxpr)]
    assert pointwise_batches[:2] == [2, 2] and set(pointwise_batches[2:]) == {4}
    model, params, apply = cls_unet  # labels: tiled at the time embedding, so from the first ResBlock on
    y2 = jnp.concatenate([Y, jnp.array([0, 0])])
    np.testing.assert_allclose(apply(params, X8, T, y=y2),
                               apply(params, jnp.concatenate([X8, X8]), jnp.concatenate([T, T]), y=y2),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of x's batch 2"):
        model.apply(params, X8, T, y=jnp.array([1, 2, 3]))


def test_resblock_on_skip_parts_equals_resblock_on_the_concatenation():
    """skip_parts(h, skip) with a skip of fewer rows: the split moves to h's last GroupNorm group, and ResBlock
    gives the output of the tiled concatenation with the same params (also the same init) and 1x1 skip conv."""
    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.normal(size=(4, 6, 6, 40)), jnp.float32)
    skip = jnp.asarray(rng.normal(size=(2, 6, 6, 56)), jnp.float32)
    whole = jnp.concatenate([h, jnp.concatenate([skip, skip])], axis=-1)
    parts = skip_parts(h, skip)  # 96 channels in groups of 3: h's last group takes 2 skip channels
    assert isinstance(parts, tuple) and [p.shape for p in parts] == [(4, 6, 6, 42), (2, 6, 6, 54)]
    np.testing.assert_array_equal(skip_parts(h, jnp.concatenate([skip, skip])), whole)  # same rows: a concat
    emb = jnp.asarray(rng.normal(size=(4, 16)), jnp.float32)
    block = ResBlock(64)
    p_whole = block.init(jax.random.key(0), whole, emb)
    p_parts = block.init(jax.random.key(0), parts, emb)
    assert jax.tree.map(jnp.shape, p_whole) == jax.tree.map(jnp.shape, p_parts)
    np.testing.assert_array_equal(p_whole["params"]["skip"]["kernel"], p_parts["params"]["skip"]["kernel"])
    p = perturb(p_whole)  # out_conv is zero-initialised
    np.testing.assert_allclose(block.apply(p, parts, emb), block.apply(p, whole, emb), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="only supported without up/down"):
        ResBlock(64, up=True).init(jax.random.key(0), parts, emb)
