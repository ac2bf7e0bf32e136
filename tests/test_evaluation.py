"""Tests for ldm_jax.evaluation: image metrics, Fréchet/KID/precision-recall, InceptionV3, the classifier."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from skimage import data as skdata
from skimage.metrics import structural_similarity

from ldm_jax.evaluation import classifier as cls
from ldm_jax.evaluation.frechet import (
    FeatureStats,
    frechet_distance,
    kernel_inception_distance,
    precision_recall,
)
from ldm_jax.evaluation.image_metrics import psnr, ssim
from ldm_jax.evaluation.inception import (
    InceptionV3FID,
    load_inception_params,
    resize_for_inception,
)

# ---------------------------------------------------------------- image metrics


def test_psnr_matches_numpy_formula():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(0, [[[[0.01]]], [[[0.1]]], [[[0.3]]]], x.shape), -1, 1).astype(np.float32)
    mse = ((x.astype(np.float64) - y) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(psnr(x, y)), 10 * np.log10(4.0 / mse), rtol=1e-5)
    assert np.isinf(np.asarray(psnr(x, x))).all()


def _to_pm1(img: np.ndarray) -> np.ndarray:
    img = img.astype(np.float64) / 255.0 * 2 - 1
    return img[..., None] if img.ndim == 2 else img


@pytest.fixture(scope="module")
def ssim_jit():
    return jax.jit(ssim)


@pytest.mark.parametrize("source", ["random", "astronaut", "camera", "coffee"])
def test_ssim_matches_skimage(ssim_jit, source):
    rng = np.random.default_rng(1)
    if source == "random":
        x = rng.uniform(-1, 1, (2, 24, 20, 3))
        y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1)
    else:
        img = _to_pm1(getattr(skdata, source)())[100:164, 150:214]
        x = np.stack([img, img[::-1, ::-1]])
        # A distorted copy: blur-ish shift plus noise, so SSIM lands well inside (0, 1).
        y = np.clip(0.7 * x + 0.3 * np.roll(x, 2, axis=2) + rng.normal(0, 0.05, x.shape), -1, 1)
    ours = np.asarray(ssim_jit(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)))
    ref = [structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=2, channel_axis=-1) for a, b in zip(x, y, strict=True)]
    np.testing.assert_allclose(ours, ref, atol=1e-3)
    assert 0.05 < min(ref) and max(ref) < 0.99  # the comparison is not a trivial all-ones case
    np.testing.assert_allclose(np.asarray(ssim_jit(jnp.asarray(x, jnp.float32), jnp.asarray(x, jnp.float32))),
                               1.0, atol=1e-5)


def test_image_metric_errors():
    with pytest.raises(ValueError, match="equal shapes"):
        psnr(jnp.zeros((1, 16, 16, 1)), jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(jnp.zeros((1, 8, 8, 1)), jnp.zeros((1, 8, 8, 1)))

# ---------------------------------------------------------------- Fréchet distance and feature stats


def _closed_form_fd(mu1, s1, mu2, s2):
    # tr((S1 S2)^½) = tr((S1^½ S2 S1^½)^½), via symmetric eigendecompositions (independent of sqrtm).
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.maximum(w, 0))) @ v.T
    inner = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_sqrt = np.sum(np.sqrt(np.maximum(inner, 0)))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_frechet_distance_exact_parameters():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_closed_form_fd(mu1, s1, mu2, s2), rel=1e-8)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8
    # Singular (zero) covariances: only the mean term is left, and the result stays finite.
    zero = np.zeros((6, 6))
    assert frechet_distance(mu1, zero, mu2, zero) == pytest.approx(np.sum((mu1 - mu2) ** 2))


def test_frechet_distance_of_sampled_gaussians():
    rng = np.random.default_rng(1)
    n = 200_000
    d1, d2 = np.array([1.0, 2.0, 3.0, 0.5]), np.array([2.0, 1.0, 0.5, 0.5])
    mu1, mu2 = np.zeros(4), np.array([1.0, -0.5, 0.0, 2.0])
    x1 = mu1 + rng.normal(size=(n, 4)) * np.sqrt(d1)
    x2 = mu2 + rng.normal(size=(n, 4)) * np.sqrt(d2)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))
    st1, st2 = FeatureStats(4), FeatureStats(4)
    st1.update(x1)
    st2.update(x2)
    got = frechet_distance(*st1.mean_cov(), *st2.mean_cov())
    assert got == pytest.approx(expected, abs=0.03)
    assert abs(frechet_distance(*st1.mean_cov(), *st1.mean_cov())) < 1e-6


def test_feature_stats_streaming_and_merge():
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, size=(1000, 7)) @ rng.normal(size=(7, 7))
    st = FeatureStats(7)
    for chunk in np.array_split(x, 13):
        st.update(jnp.asarray(chunk, jnp.float32) if len(chunk) % 2 else chunk)
    mu, cov = st.mean_cov()
    x32 = np.where((np.arange(1000) // 77)[:, None] % 2 == 0, x.astype(np.float32), x)  # mirror the casts
    np.testing.assert_allclose(mu, x32.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(cov, np.cov(x32, rowvar=False), rtol=1e-6, atol=1e-6)
    a, b = FeatureStats(7), FeatureStats(7)
    a.update(x[:300])
    b.update(x[300:])
    merged = a.merge(b)
    np.testing.assert_allclose(merged.mean_cov()[0], x.mean(0), rtol=1e-10)
    np.testing.assert_allclose(merged.mean_cov()[1], np.cov(x, rowvar=False), rtol=1e-9)
    assert merged.count == 1000
    with pytest.raises(ValueError, match=r"shape \(N, 7\)"):
        st.update(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats(3).mean_cov()


def test_feature_stats_reservoir_is_uniform_and_mergeable():
    values = np.arange(1000, dtype=np.float64)[:, None]
    means, from_b = [], []
    for seed in range(200):
        st = FeatureStats(1, max_reservoir=50, seed=seed)
        for chunk in np.array_split(values, 7):
            st.update(chunk)
        res = st.reservoir[:, 0]
        assert res.shape == (50,) and len(np.unique(res)) == 50
        means.append(res.mean())
        a, b = FeatureStats(1, 50, seed=2 * seed + 1000), FeatureStats(1, 50, seed=2 * seed + 1001)
        a.update(values[:900])
        b.update(values[900:])
        merged = FeatureStats.from_state_dict(a.state_dict()).merge(b)
        from_b.append(np.mean(merged.reservoir[:, 0] >= 900))
    assert abs(np.mean(means) - 499.5) < 15  # std of this mean is ~2.9
    assert 0.08 < np.mean(from_b) < 0.12  # b holds 10% of the union
    assert merged.count == 1000 and merged.reservoir.shape == (50, 1)

# ---------------------------------------------------------------- KID


def _brute_force_mmd2(x, y):
    d = x.shape[1]
    k = lambda a, b: (np.dot(a, b) / d + 1.0) ** 3
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / (m * m)


def test_kid_matches_brute_force_on_tiny_set():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(6, 3)), rng.normal(0.3, 1.2, size=(6, 3))
    mean, std = kernel_inception_distance(x, y, num_subsets=3, subset_size=6)
    assert mean == pytest.approx(_brute_force_mmd2(x, y), rel=1e-10)
    assert std is None  # every "subset" would be the whole set: no spread to measure
    _, std = kernel_inception_distance(x, y[:5], num_subsets=20, subset_size=6)
    assert std > 1e-6  # subsets of the larger set differ: a real spread


def test_kid_same_vs_shifted_distribution():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(1000, 16))
    same = rng.normal(size=(1000, 16))
    shifted = rng.normal(size=(1000, 16)) + 0.5
    m_same, s_same = kernel_inception_distance(real, same, num_subsets=50, subset_size=200)
    m_shift, s_shift = kernel_inception_distance(real, shifted, num_subsets=50, subset_size=200)
    assert abs(m_same) < 3 * s_same
    assert m_shift > 10 * s_shift and m_shift > 20 * abs(m_same)

# ---------------------------------------------------------------- precision / recall


def test_precision_recall_cases():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(300, 8))
    assert precision_recall(real, real.copy(), k=3, batch_size=64) == (1.0, 1.0)
    p_far, r_far = precision_recall(real, real + 100.0, k=3)
    assert p_far == 0.0 and r_far == 0.0
    centers = np.eye(8)[:5] * 30.0
    modes = rng.integers(0, 5, size=500)
    mixture = centers[modes] + rng.normal(size=(500, 8))
    collapsed = centers[0] + rng.normal(size=(500, 8))
    p, r = precision_recall(mixture, collapsed, k=3, batch_size=100)
    # ~100 real points cover their mode's 8-D Gaussian only ~85% with 3-NN balls, hence not ~1.
    assert p > 0.8 and r < 0.3
    healthy = centers[rng.integers(0, 5, size=500)] + rng.normal(size=(500, 8))
    p_ok, r_ok = precision_recall(mixture, healthy, k=3, batch_size=100)
    assert p_ok > 0.8 and r_ok > 0.8
    with pytest.raises(ValueError, match="k=0"):
        precision_recall(real, real, k=0)

# ---------------------------------------------------------------- InceptionV3 (FID variant)


@pytest.fixture(scope="module")
def inception_run():
    model = InceptionV3FID(capture=("Mixed_5d", "Mixed_6e", "Mixed_7c"))
    x = jnp.asarray(np.random.default_rng(6).uniform(-1, 1, (1, 32, 32, 1)), jnp.float32)
    rng = jax.random.PRNGKey(0)
    # Unoptimised XLA backend: halves this 24M-param network's compile time, and it runs only once.
    compiled = jax.jit(model.init_with_output).lower(rng, x).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    return compiled(rng, x)


def test_inception_shapes_and_param_count(inception_run):
    out, variables = inception_run
    assert out["Mixed_5d"].shape == (1, 35, 35, 288)
    assert out["Mixed_6e"].shape == (1, 17, 17, 768)
    assert out["Mixed_7c"].shape == (1, 8, 8, 2048)
    assert out["pool"].shape == (1, 2048) and out["logits"].shape == (1, 1008)
    np.testing.assert_allclose(out["pool"], out["Mixed_7c"].mean(axis=(1, 2)), rtol=1e-5)
    assert np.isfinite(np.asarray(out["pool"])).all() and float(np.std(out["pool"])) > 0
    # torchvision's inception_v3 has 27,161,264 params; minus AuxLogits (3,326,696) plus 8 more classes
    # (1008-way fc: 8 * 2049) gives the FID network's count.
    n_params = sum(v.size for v in jax.tree_util.tree_leaves(variables["params"]))
    assert n_params == 27_161_264 - 3_326_696 + 8 * 2049


def _to_torch_state(variables: dict) -> dict:
    """Inverse of the loader's mapping, written independently: flax variables -> torch state-dict arrays."""
    state = {}
    for path, v in jax.tree_util.tree_leaves_with_path(variables):
        coll, *mods, leaf = [p.key for p in path]
        v = np.asarray(v)
        name = ".".join(mods)
        if coll == "batch_stats":
            state[f"{name}.running_{leaf}"] = v
        elif leaf == "kernel" and mods[-1] == "conv":
            state[f"{name}.weight"] = v.transpose(3, 2, 0, 1)
        elif leaf == "kernel":
            state[f"{name}.weight"] = v.T
        else:
            state[f"{name}.{'weight' if leaf == 'scale' else 'bias'}"] = v
        if mods[-1] == "bn" and leaf == "mean":
            state[f"{name}.num_batches_tracked"] = np.asarray(0, np.int64)
    return state


def test_inception_loader_round_trip(inception_run, tmp_path):
    _, variables = inception_run
    state = _to_torch_state(variables)
    assert "Mixed_6e.branch7x7dbl_5.conv.weight" in state and state["fc.weight"].shape == (1008, 2048)
    path = str(tmp_path / "inception.npz")
    np.savez(path, **state)
    loaded = load_inception_params(path)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           loaded, variables)
    del state["Mixed_7c.branch_pool.bn.running_var"]
    np.savez(path, **state)
    with pytest.raises(ValueError, match="missing"):
        load_inception_params(path)


def test_inception_missing_weights_says_fid_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_JAX_INCEPTION", str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="true FID is unavailable.*pt_inception-2015-12-05"):
        load_inception_params()


def _torch_bilinear(x: np.ndarray, out: int) -> np.ndarray:
    """F.interpolate(mode='bilinear', align_corners=False) on (H, W), written out in numpy."""
    def weights(n_in):
        src = np.maximum((np.arange(out) + 0.5) * n_in / out - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0
    r0, r1, ry = weights(x.shape[0])
    c0, c1, cx = weights(x.shape[1])
    rows = x[r0] * (1 - ry)[:, None] + x[r1] * ry[:, None]
    return rows[:, c0] * (1 - cx) + rows[:, c1] * cx


@pytest.mark.parametrize("size", [32, 400])
def test_inception_resize_matches_torch_bilinear(size):
    img = np.random.default_rng(7).uniform(-1, 1, (1, size, size, 1)).astype(np.float32)
    got = np.asarray(resize_for_inception(jnp.asarray(img)))
    assert got.shape == (1, 299, 299, 3)
    ref = _torch_bilinear(img[0, :, :, 0].astype(np.float64), 299)
    # float32 sample positions differ from torch's by ~1e-5 px, so allow a little more when downsampling.
    np.testing.assert_allclose(got[0, :, :, 2], ref, atol=1e-5 if size < 299 else 2e-4)

# ---------------------------------------------------------------- Fashion-MNIST classifier


def test_classifier_few_steps_lower_loss():
    import optax

    from ldm_jax.data.fashion_mnist import load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    x, y = cls.to_model_input(images[:256]), labels[:256]
    assert x.shape == (256, 32, 32, 1) and x.min() == -1.0 and x.max() <= 1.0
    assert (x[:, :2] == -1).all() and (x[:, :, -2:] == -1).all()
    model = cls.FashionMNISTClassifier()
    params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
    tx = cls.make_optimizer(30)
    step = cls.make_train_step(model, tx)
    loss_of = jax.jit(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, x)[1], y).mean())
    before = float(loss_of(params))
    opt_state = tx.init(params)
    for i in range(30):
        sl = slice((i % 4) * 64, (i % 4 + 1) * 64)
        params, opt_state, _ = step(params, opt_state, x[sl], y[sl])
    after = float(loss_of(params))
    assert after < 0.7 * before


def test_classifier_save_load_round_trip(tmp_path, monkeypatch):
    model = cls.FashionMNISTClassifier()
    x = jnp.asarray(np.random.default_rng(8).uniform(-1, 1, (3, 32, 32, 1)), jnp.float32)
    params = model.init(jax.random.PRNGKey(1), x)["params"]
    path = str(tmp_path / "sub" / "clf.npz")
    cls.save_params(params, path, {"test_accuracy": 0.5})
    assert json.load(open(str(tmp_path / "sub" / "clf.json")))["test_accuracy"] == 0.5
    assert [f for f in os.listdir(tmp_path / "sub") if f.startswith(".tmp_")] == []
    loaded = cls.load_params(path)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           loaded, jax.device_get(params))
    feats_fn, logits_fn = cls.load_classifier(path)
    ref_feats, ref_logits = model.apply({"params": params}, x)
    np.testing.assert_array_equal(np.asarray(feats_fn(x)), np.asarray(ref_feats))
    np.testing.assert_array_equal(np.asarray(logits_fn(x)), np.asarray(ref_logits))
    assert feats_fn(x).shape == (3, cls.FEATURE_DIM)
    with pytest.raises(ValueError, match="32, 32, 1"):
        feats_fn(jnp.zeros((1, 28, 28, 1)))
    # get_or_train reuses an existing file instead of training.
    monkeypatch.setenv("LDM_JAX_CLASSIFIER", path)
    monkeypatch.setattr(cls, "train_classifier", lambda *a, **k: pytest.fail("must not retrain"))
    assert cls.default_classifier_path() == path
    cls.get_or_train_classifier()
    with pytest.raises(FileNotFoundError, match="classifier --train"):
        cls.load_params(str(tmp_path / "missing.npz"))
    np.savez(str(tmp_path / "bad.npz"), **{"Dense_0/kernel": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="do not match"):
        cls.load_params(str(tmp_path / "bad.npz"))


def test_scipy_sqrtm_signature_still_supported():
    # frechet_distance calls sqrtm(A) without the deprecated `disp`; guard against API drift.
    out = scipy.linalg.sqrtm(np.diag([4.0, 9.0]))
    np.testing.assert_allclose(np.real(out), np.diag([2.0, 3.0]))
