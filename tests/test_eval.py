"""eval.py / ldm_jax.evaluate_workdir on tiny workdirs (JSON keys, finite numbers, one-line errors), the
evaluation pipelines against independent numpy computations, and notebooks/explore.ipynb run headlessly."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import workdir as W
from ldm_jax.checkpoint import Checkpointer
from ldm_jax.config_defaults import autoencoder_config, ldm_config
from ldm_jax.data.pipeline import default_data_config, make_dataset
from ldm_jax.evaluation import classifier as cls
from ldm_jax.evaluation import evaluate as E
from ldm_jax.evaluation.frechet import FeatureStats, frechet_distance
from ldm_jax.models.autoencoder import build_autoencoder
from ldm_jax.training import ldm as L
from ldm_jax.workdir import save_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES, BATCH = 32, 8  # 32x32x1: what the Fashion-MNIST judge reads


def fast_init(init_fn, *args):
    """Flax params with init_fn's structure, drawn in numpy: compiling a network's init costs a minute on a
    loaded CPU. Kernels ~ N(0, 1/fan_in), norm scales 1, everything else 0 (biases, embeddings' mean)."""
    shapes = jax.eval_shape(init_fn, jax.random.key(0), *args)
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if "scale" in name:
            return np.ones(leaf.shape, leaf.dtype)
        if "kernel" in name or "embedding" in name:
            fan_in = int(np.prod(leaf.shape[:-1])) or 1
            return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)
        return np.zeros(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module", autouse=True)
def judge(tmp_path_factory):
    """A randomly initialised judge saved where LDM_JAX_CLASSIFIER points: evaluation never trains one here."""
    path = str(tmp_path_factory.mktemp("cls") / "judge.npz")
    params = fast_init(cls.FashionMNISTClassifier().init, jnp.zeros((1, *cls.IMAGE_SHAPE)))["params"]
    cls.save_params(params, path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LDM_JAX_CLASSIFIER", path)
        yield path


@pytest.fixture(scope="module")
def ae_dir(tmp_path_factory):
    """A tiny (untrained) KL-f4 stage-1 workdir as the stage-1 loop writes it: 32x32x1 -> 8x8x3."""
    d = str(tmp_path_factory.mktemp("ae"))
    c = autoencoder_config("kl")
    c.model.update(embed_dim=3, z_channels=3, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=RES,
                   in_channels=1, norm_groups=4, mid_attn=False)
    c.data.update(name="fashion_mnist", resolution=RES, channels=1, preprocess="pad", random_flip=False, prefetch=0)
    variables = fast_init(build_autoencoder(c.model).init, jnp.zeros((1, RES, RES, 1)))
    ckpt = Checkpointer(d, async_save=False)
    ckpt.save(1, {"params": {"model": variables["params"]}}, {"config": c.to_dict()}, force=True)
    ckpt.close()
    save_config(c, d)
    return d


@pytest.fixture(scope="module")
def ldm_dir(ae_dir, tmp_path_factory):
    """A class-conditional stage-2 workdir in the train loop's format (config.json + Orbax checkpoint of the
    LDMState). Freshly initialised, not trained: compiling a train step costs minutes on a loaded 2-core CPU,
    and nothing here depends on sample quality (test_ldm.py covers training)."""
    c = ldm_config()
    c.first_stage.update(workdir=ae_dir, scale_factor=0.8, sample_posterior=False)
    c.data.update(name="fashion_mnist", resolution=RES, channels=1, preprocess="pad", random_flip=False, prefetch=0)
    c.condition.update(type="class", p_uncond=0.2)
    c.model.update(conditioning_key="crossattn", cond_stage="class", n_classes=11, context_dim=32)
    c.model.unet.update(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1,), num_res_blocks=1,
                        attention_resolutions=(1,), num_head_channels=32)
    c.train.update(batch_size=BATCH, base_lr=1e-3, scale_lr=False, ema_decay=0.9, warmup_steps=0)
    c.sampling.update(steps=3, guidance=2.0)
    fs = W.load_first_stage(ae_dir)
    model, tx = W.build_model(c, fs), L.make_optimizer(c)
    params = fast_init(model.init, jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32),
                       {"label": jnp.zeros((1,), jnp.int32)})["params"]
    state = L.LDMState(step=jnp.asarray(2, jnp.int32), params=params, ema_params=params, opt_state=tx.init(params),
                       scale_factor=jnp.asarray(0.8, jnp.float32), skipped=jnp.zeros((), jnp.int32))
    d = str(tmp_path_factory.mktemp("ldm"))
    ckpt = Checkpointer(d, async_save=False)
    ckpt.save(2, state, {"config": c.to_dict(), "data": {"step": 2}}, force=True)
    ckpt.close()
    save_config(c, d)
    return d


def _eval(argv, capsys):
    spec = importlib.util.spec_from_file_location("eval_py", os.path.join(REPO, "eval.py"))
    eval_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_py)
    code = eval_py.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def _finite(result, keys):
    for k in keys:
        assert isinstance(result[k], (int, float)) and np.isfinite(result[k]), (k, result.get(k))


# --------------------------------------------------------------------------- pure pieces


def test_conditional_accuracy_hand_built():
    # 7 samples, classes asked for: 0,0,0,1,1,2,2 (3 classes); the judge says 0,1,0,1,1,0,2.
    labels = np.array([0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 0, 1, 1, 0, 2])
    logits = np.eye(3)[pred] * 5.0 - 1.0
    out = E.conditional_accuracy(logits, labels, num_classes=4)  # class 3 was never asked for
    assert out["per_class_accuracy"] == pytest.approx([2 / 3, 1.0, 0.5, None])
    assert out["conditional_accuracy"] == pytest.approx((2 / 3 + 1.0 + 0.5) / 3)  # each class weighs the same
    assert out["conditional_accuracy_micro"] == pytest.approx(5 / 7)
    np.testing.assert_array_equal(E.balanced_labels(np.arange(12), 10), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1])
    batches = list(E.padded_batches(7, 3))
    assert [v for _, v in batches] == [3, 3, 1] and all(len(i) == 3 for i, _ in batches)


def test_generation_metrics_stream_against_numpy():
    """Streamed statistics of a fake generator equal numpy on the concatenated features; labels i mod K."""
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(23, 2, 2, 1)).astype(np.float32)
    feat = lambda x: np.asarray(x).reshape(len(x), -1) * 2.0 + 1.0  # noqa: E731
    ex = E.FeatureExtractor("toy", 4, feat)
    real = FeatureStats(4, 100)
    real_feats = rng.normal(size=(50, 4))
    real.update(real_feats)
    asked = []

    def generate(idx):
        asked.append(idx.copy())
        return bank[np.minimum(idx, 22)]

    def logits_fn(images):  # the judge sees class = sign of the first pixel
        return np.stack([images[:, 0, 0, 0] < 0, images[:, 0, 0, 0] >= 0], axis=1).astype(np.float32)

    out = E.generation_metrics(generate, 23, 5, real, ex, num_classes=2, logits_fn=logits_fn)
    assert all(len(a) == 5 for a in asked) and len(asked) == 5  # equal-size batches: one compile
    fake = feat(bank)
    want = frechet_distance(real_feats.mean(0), np.cov(real_feats, rowvar=False), fake.mean(0),
                            np.cov(fake, rowvar=False))
    assert out["fd_toy"] == pytest.approx(want, rel=1e-6)
    hit = (bank[:, 0, 0, 0] >= 0).astype(int) == np.arange(23) % 2
    acc = np.mean([hit[np.arange(23) % 2 == c].mean() for c in (0, 1)])
    assert out["conditional_accuracy"] == pytest.approx(acc)
    _finite(out, ["kid_toy", "precision_toy", "recall_toy", "samples_per_s"])


def test_reconstruction_metrics_against_numpy():
    x = np.asarray(make_dataset(default_data_config(), "test", 6, 0, augment=False).batch_at(0)["image"])
    batches = [({"image": x[:4]}, 4), ({"image": np.concatenate([x[4:], x[:2]])}, 2)]  # padded last batch
    lpips_params = None
    if os.path.isfile(os.path.expanduser("~/.cache/ldm_jax/lpips_vgg16.npz")):
        from ldm_jax.models.lpips_weights import load_lpips_params

        lpips_params = load_lpips_params()
    out = E.reconstruction_metrics(lambda p, im: im * p, 0.9, batches, None, lpips_params)
    mse = np.mean((0.1 * x) ** 2, axis=(1, 2, 3))
    assert out["psnr"] == pytest.approx(np.mean(10 * np.log10(4.0 / mse)), rel=1e-5)
    assert out["num_images"] == 6 and 0 < out["ssim"] < 1
    if lpips_params is not None:
        assert 0 < out["lpips"] < 0.5


# --------------------------------------------------------------------------- eval.py on workdirs


def test_eval_autoencoder_json(ae_dir, tmp_path, capsys):
    path = str(tmp_path / "ae.json")
    code, stdout, err = _eval(["--workdir", ae_dir, "--json", path, "--num_samples", "30", "--batch_size", "20",
                               "--lpips_weights", str(tmp_path / "none.npz")], capsys)
    assert code == 0, err
    r = json.load(open(path))
    assert r["stage"] == "autoencoder" and r["model"] == "kl-f4" and r["num_images"] == 30
    _finite(r, ["psnr", "ssim", "rfd_fmnist", "rkid_fmnist", "rprecision_fmnist", "rrecall_fmnist"])
    assert r["lpips"] is None and "LPIPS weights not found" in r["unavailable"]["lpips"]
    assert "lpips unavailable" in stdout


def test_eval_ldm_json(ldm_dir, tmp_path, capsys):
    path = str(tmp_path / "ldm.json")
    code, _, err = _eval(["--workdir", ldm_dir, "--json", path, "--num_samples", "20", "--batch_size", "10",
                          "--num_real", "100", "--guidance", "2.5"], capsys)
    assert code == 0, err
    r = json.load(open(path))
    assert r["stage"] == "ldm" and r["sampler"] == "ddim" and r["steps"] == 3 and r["guidance"] == 2.5
    assert r["num_samples"] == 20 and r["num_real"] == 100 and r["checkpoint_step"] == 2
    _finite(r, ["fd_fmnist", "kid_fmnist", "precision_fmnist", "recall_fmnist", "conditional_accuracy",
                "samples_per_s", "real_classifier_accuracy"])
    assert "fid" not in r and len(r["per_class_accuracy"]) == 10 and r["unavailable"] == {}


def test_eval_inception_without_weights_says_why(ae_dir, tmp_path, capsys):
    path = str(tmp_path / "ae.json")
    code, stdout, err = _eval(["--workdir", ae_dir, "--json", path, "--num_samples", "20", "--batch_size", "20",
                               "--feature", "inception", "--inception_weights", str(tmp_path / "no.pth"),
                               "--lpips_weights", str(tmp_path / "none.npz")], capsys)
    assert code == 0, err
    r = json.load(open(path))
    assert r["rfid"] is None and "true FID is unavailable" in r["unavailable"]["rfid"]
    assert not any(k.endswith("_fmnist") for k in r)  # no silent fallback to another feature space
    _finite(r, ["psnr", "ssim"])


@pytest.mark.parametrize("argv,message", [
    (["--workdir", "/nonexistent/dir"], "no such directory"),
    (["--feature", "clip"], "--feature must be one of fmnist, inception"),
])
def test_eval_bad_input_is_one_line(ae_dir, tmp_path, capsys, argv, message):
    args = ["--workdir", ae_dir, "--json", str(tmp_path / "x.json"), *argv]
    code, _, err = _eval(args, capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "x.json")


# --------------------------------------------------------------------------- the notebook


def test_notebook_executes(ldm_dir, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("LDM_JAX_WORKDIR", ldm_dir)
    monkeypatch.setenv("LDM_JAX_STEPS", "2")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend renders the figures as PNGs
    nb = nbformat.read(os.path.join(REPO, "notebooks", "explore.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": REPO}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # samples, interpolation, inpainting
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "step 2, condition 'class'" in text and "known half" in text
    err = float(text.split("known half: ")[1].split()[0])
    assert np.isfinite(err)
