"""Builds notebooks/explore.ipynb (kept as a script so the cells stay reviewable)."""
import os

import nbformat as nbf

cells = []
md = lambda s: cells.append(nbf.v4.new_markdown_cell(s.strip()))
code = lambda s, **kw: cells.append(nbf.v4.new_code_cell(s.strip(), **kw))

md("""
# Exploring a trained latent diffusion model (ldm_jax)

Load a stage-2 workdir (config.json + checkpoints, e.g. from `bash scripts/demo.sh`), then

1. sample a grid for a chosen class / prompt, guidance scale and number of DDIM steps,
2. interpolate between two starting latents (spherical interpolation of the noise, deterministic DDIM),
3. inpaint a masked region: DDIM with the known latents re-noised and blended in at every step
   (`ddim_sample(..., keep_mask=, x0_known=)`, as the reference's masked sampling).

Runs on Colab (the first cell installs the package when it is not importable) and locally. The parameters come
from environment variables so the test suite can run this notebook headlessly against a tiny checkpoint.
""")

code("""
# Colab / fresh machine: install ldm_jax unless it is already importable (skipped locally and in the tests).
import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("ldm_jax") is None:
    REPO_URL = os.environ.get("LDM_JAX_REPO", "")  # the git URL of your copy of this repository
    if not os.path.isdir("ldm_jax_src"):
        if not REPO_URL:
            raise SystemExit("ldm_jax is not installed: set LDM_JAX_REPO to the git URL of your copy of the "
                             "repository (or upload it as ./ldm_jax_src) and run this cell again")
        subprocess.run(["git", "clone", "--depth", "1", REPO_URL, "ldm_jax_src"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "ldm_jax_src"], check=True)
    sys.path.insert(0, os.path.abspath("ldm_jax_src"))
import ldm_jax

# Relative paths (runs/, configs/) are the repository's, wherever the notebook was started from.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(ldm_jax.__file__)))
if os.path.isfile(os.path.join(REPO_ROOT, "train.py")):
    os.chdir(REPO_ROOT)
print("ldm_jax at", REPO_ROOT, "| working directory", os.getcwd())
""")

code("""
# Parameters (environment variables override them).
WORKDIR = os.environ.get("LDM_JAX_WORKDIR", "runs/ldm")   # a trained stage-2 workdir
STEPS = int(os.environ.get("LDM_JAX_STEPS", "50"))        # DDIM steps
GUIDANCE = float(os.environ.get("LDM_JAX_GUIDANCE", "3.0"))  # classifier-free guidance scale (1 = none)
CLASS_LABEL = os.environ.get("LDM_JAX_CLASS")              # class-conditional models (None: the model's last class)
PROMPT = os.environ.get("LDM_JAX_PROMPT", "a photo of a sneaker")  # text-conditional models
SEED = int(os.environ.get("LDM_JAX_SEED", "0"))
N = 10                                                     # samples per row
# No trained model yet (e.g. on Colab)? Set LDM_JAX_TRAIN=1 to train the CPU demo for a few minutes first.
if not os.path.isdir(WORKDIR) and os.environ.get("LDM_JAX_TRAIN") == "1":
    ae_dir = os.path.join(os.path.dirname(WORKDIR) or ".", "ae")
    subprocess.run([sys.executable, "train.py", "--config", "configs/demo_autoencoder.py", "--workdir", ae_dir,
                    "--config.train.num_steps=500"], check=True)
    subprocess.run([sys.executable, "train.py", "--config", "configs/demo_ldm.py", "--workdir", WORKDIR,
                    f"--config.first_stage.workdir={ae_dir}", "--config.train.num_steps=1000"], check=True)
""", metadata={"tags": ["parameters"]})

code("""
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from ldm_jax.inference import SPATIAL_TYPES, LoadedLDM

ldm = LoadedLDM.load(WORKDIR)
cfg, fs = ldm.config, ldm.first_stage
ctype = cfg.condition.type
if ctype == "class":
    from ldm_jax.inference import real_classes

    CLASS_LABEL = real_classes(cfg) - 1 if CLASS_LABEL is None else int(CLASS_LABEL)
print(f"{WORKDIR}: step {ldm.step}, condition {ctype!r}, latents {ldm.latent_shape()} "
      f"(f={fs.factor}, {cfg.first_stage.get('workdir')}), scale_factor {ldm.scale_factor:.4f}, jax on "
      f"{jax.devices()[0].platform}")


def show(rows, titles=None, row_labels=None, size=1.0):
    \"\"\"Rows of [-1, 1] NHWC images as one matplotlib figure.\"\"\"
    rows = [np.asarray(r) for r in rows]
    n = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(n * size, len(rows) * size + 0.3), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n):
            ax = axes[i, j]
            ax.set_xticks([]), ax.set_yticks([])
            if j < len(row):
                img = np.clip((row[j] + 1) / 2, 0, 1)
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            if titles is not None and i == 0 and j < len(titles):
                ax.set_title(titles[j], fontsize=7)
            if row_labels is not None and j == 0:
                ax.set_ylabel(row_labels[i], rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout(pad=0.2)
    plt.show()
""")

md("""
## 1. Samples: the chosen class / prompt, and one per class

`LoadedLDM.sample` compiles one sampling program per setting (sampler, steps, eta, guidance); sample *i* is
a pure function of (seed, *i*), so the same index gives the same image in any batch.
""")

code("""
from ldm_jax.data.fashion_mnist import CLASS_NAMES

opts = dict(sampler="ddim", steps=STEPS, eta=0.0, guidance=GUIDANCE, seed=SEED)
rows, labels = [], []
if ctype == "class":
    rows.append(ldm.sample(range(N), **opts))  # labels cycle over all classes: sample i asks for class i mod K
    labels.append("class i")
    rows.append(ldm.sample(range(N), class_labels=[CLASS_LABEL], **opts))
    labels.append(CLASS_NAMES[CLASS_LABEL] if cfg.data.name == "fashion_mnist" else f"class {CLASS_LABEL}")
elif ctype == "text":
    rows.append(ldm.sample(range(N), prompts=[PROMPT], **opts))
    labels.append(PROMPT[:20])
else:
    rows.append(ldm.sample(range(N), **opts))
    labels.append(ctype)
titles = list(CLASS_NAMES) if ctype == "class" and cfg.data.name == "fashion_mnist" else None
show(rows, titles=titles, row_labels=labels)
""")

md("""
## 2. Interpolating between two starting latents

DDIM with eta = 0 is a deterministic map from the starting noise x_T to an image, so walking x_T along a great
circle (slerp keeps the norm a Gaussian sample would have) walks through images.
""")

code("""
from ldm_jax.data.text import NULL_TEXT
from ldm_jax.diffusion.generate import make_sample_fn
from ldm_jax.conditions import null_condition


def conditions(n, labels=None):
    \"\"\"(cond, uncond) for n samples of this model (class label / prompt / nothing).\"\"\"
    if ctype in SPATIAL_TYPES:
        raise NotImplementedError("interpolation / inpainting cells cover class, text and unconditional models")
    if ctype == "class":
        cond = {"label": jnp.asarray(np.full((n,), CLASS_LABEL) if labels is None else labels, jnp.int32)}
    elif ctype == "text":
        cond = {"tokens": jnp.asarray(np.repeat(ldm.tokens([PROMPT]), n, axis=0))}
    else:
        return {}, None
    null_tokens = jnp.asarray(ldm.tokens([NULL_TEXT])[0]) if ctype == "text" else None
    return cond, null_condition(cfg, cond, null_tokens)


sample = make_sample_fn(lambda p, x, t, c: ldm.model.apply({"params": p}, x, t, c), ldm.sched, "ddim", STEPS,
                        0.0, GUIDANCE if ctype in ("class", "text") else 1.0, cfg.diffusion.parameterization)


@jax.jit
def ddim_from(params, fs_vars, x_T, cond, uncond, key):
    \"\"\"Deterministic DDIM from given starting latents, decoded to images.\"\"\"
    z = sample(params, cond, uncond, key, x_T.shape, x_T=x_T)
    return jnp.clip(fs.decode(fs_vars, z / ldm.scale_factor), -1, 1)


def slerp(a, b, t):
    omega = np.arccos(np.clip(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)), -1, 1))
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


shape = ldm.latent_shape()
ka, kb = jax.random.split(jax.random.key(SEED + 1))
za, zb = (np.asarray(jax.random.normal(k, shape)) for k in (ka, kb))
ts = np.linspace(0, 1, N)
x_T = jnp.asarray(np.stack([slerp(za, zb, t) for t in ts]))
cond, uncond = conditions(N)
interp = ddim_from(ldm.params, fs.variables, x_T, cond, uncond, jax.random.key(SEED))
show([interp], titles=[f"t={t:.2f}" for t in ts])
""")

md("""
## 3. Inpainting a masked region

Encode held-out images, keep the latents of the left half (mask = 1) and let DDIM fill in the right half: at
every step the known half is replaced by the clean latents noised to that step, so the model only has to
make the new half agree with it. (A model trained for inpainting, `configs/inpainting.py`, gets the masked
image as a condition instead; this works with any model.)
""")

code("""
from ldm_jax.data.pipeline import make_dataset

test = make_dataset(cfg.data, "test", N, SEED, augment=False).batch_at(0)
images = jnp.asarray(test["image"])
z0 = fs.encode(fs.variables, images) * ldm.scale_factor  # KL: posterior mode; VQ: pre-quantisation latents
h, w, c = z0.shape[1:]
mask = np.zeros((N, h, w, 1), np.float32)
mask[:, :, : w // 2] = 1.0  # 1 = known (kept), 0 = to generate
labels = test["label"] if ctype == "class" else None
cond, uncond = conditions(N, labels)


@jax.jit
def inpaint(params, fs_vars, z0, mask, cond, uncond, key):
    z = sample(params, cond, uncond, key, z0.shape, keep_mask=mask, x0_known=z0)
    return jnp.clip(fs.decode(fs_vars, z / ldm.scale_factor), -1, 1)


filled = inpaint(ldm.params, fs.variables, z0, jnp.asarray(mask), cond, uncond, jax.random.key(SEED + 2))
pixel_mask = np.repeat(np.repeat(mask, fs.factor, axis=1), fs.factor, axis=2)
masked = np.where(pixel_mask > 0, np.asarray(images), 0.0)  # grey = the region to generate
show([images, masked, filled], row_labels=["original", "known", "inpainted"])
err_known = float(np.mean(np.abs(np.asarray(filled) - np.asarray(images))[..., : images.shape[2] // 2, :]))
print(f"mean |inpainted - original| on the known half: {err_known:.3f} (decoder error only)")
""")

md("""
## Numbers

`python eval.py --workdir WORKDIR --json out.json` reports fd_fmnist / KID / precision-recall and the
conditional accuracy of this model; `studies/` holds the guidance, sampler, first-stage and compression studies.
""")

nb = nbf.v4.new_notebook(cells=cells)
nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
nb.metadata["language_info"] = {"name": "python"}
nb.metadata["colab"] = {"provenance": []}
nb.metadata["accelerator"] = "GPU"
nbf.write(nb, os.path.join(os.path.dirname(os.path.abspath(__file__)), "explore.ipynb"))
print("ok")
