"""InceptionV3, FID variant (pytorch-fid's FIDInceptionA/C/E blocks), in Flax linen, plus its weight loader.

Submodule names follow torchvision's / pytorch-fid's state-dict keys, so `Mixed_5b.branch1x1.conv.weight`
maps to params['Mixed_5b']['branch1x1']['conv']['kernel'] (transposed OIHW -> HWIO).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
MISSING_WEIGHTS = (
    "true FID is unavailable: InceptionV3 FID weights not found{where}; supply pytorch-fid's "
    + FID_WEIGHTS_FILE + " (or .npz/.safetensors with the same keys) via inception_path / LDM_JAX_INCEPTION"
)
INPUT_SIZE = 299

_P = tuple[tuple[int, int], tuple[int, int]]


def _pad(ph: int, pw: int) -> _P:
    return ((ph, ph), (pw, pw))


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, running statistics) + ReLU, as torchvision's BasicConv2d."""

    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: _P | str = "VALID"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(self.features, self.kernel, strides=self.strides, padding=self.padding, use_bias=False,
                    name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    # FID blocks pool with count_include_pad=False (the TF graph's behaviour).
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=_pad(1, 1), count_include_pad=False)


class FIDInceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv2d(64, (5, 5), padding=_pad(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv2d(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        bp = nn.max_pool(x, (3, 3), strides=(2, 2))
        return jnp.concatenate([b3, bd, bp], axis=-1)


class FIDInceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=_pad(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=_pad(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=_pad(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=_pad(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=_pad(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=_pad(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv2d(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=_pad(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=_pad(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        bp = nn.max_pool(x, (3, 3), strides=(2, 2))
        return jnp.concatenate([b3, b7, bp], axis=-1)


class FIDInceptionE(nn.Module):
    """Block E; Mixed_7b average-pools (no padding counted), Mixed_7c max-pools (a quirk of the TF graph)."""

    pool: str = "avg"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=_pad(0, 1), name="branch3x3_2a")(b3),
            BasicConv2d(384, (3, 1), padding=_pad(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=_pad(0, 1), name="branch3x3dbl_3a")(bd),
            BasicConv2d(384, (3, 1), padding=_pad(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.pool == "avg":
            pooled = _avg_pool_3x3(x)
        else:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=_pad(1, 1))
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_for_inception(images: jax.Array) -> jax.Array:
    """[-1, 1] NHWC images (1 or 3 channels) -> (N, 299, 299, 3), bilinear, no antialias (F.interpolate)."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"inception input must be NHWC with 1 or 3 channels, got shape {images.shape}")
    x = images.astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    # pytorch-fid maps [0,1] -> [-1,1] after resizing; bilinear resizing is affine-equivariant, so resizing
    # our [-1,1] images directly is the same thing. antialias=False matches align_corners=False interpolate.
    return jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "bilinear", antialias=False)


class InceptionV3FID(nn.Module):
    """FID InceptionV3: {'pool': (N, 2048) features, 'logits': (N, 1008)} plus blocks named in `capture`."""

    capture: Sequence[str] = ()

    @nn.compact
    def __call__(self, images: jax.Array, resize: bool = True) -> dict[str, jax.Array]:
        x = resize_for_inception(images) if resize else images
        out: dict[str, jax.Array] = {}

        def keep(name: str, y: jax.Array) -> jax.Array:
            if name in self.capture:
                out[name] = y
            return y

        x = keep("Conv2d_1a_3x3", BasicConv2d(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x))
        x = keep("Conv2d_2a_3x3", BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x))
        x = keep("Conv2d_2b_3x3", BasicConv2d(64, (3, 3), padding=_pad(1, 1), name="Conv2d_2b_3x3")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2))
        x = keep("Conv2d_3b_1x1", BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x))
        x = keep("Conv2d_4a_3x3", BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2))
        for name, pf in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = keep(name, FIDInceptionA(pf, name=name)(x))
        x = keep("Mixed_6a", InceptionB(name="Mixed_6a")(x))
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = keep(name, FIDInceptionC(c7, name=name)(x))
        x = keep("Mixed_7a", InceptionD(name="Mixed_7a")(x))
        x = keep("Mixed_7b", FIDInceptionE("avg", name="Mixed_7b")(x))
        x = keep("Mixed_7c", FIDInceptionE("max", name="Mixed_7c")(x))
        out["pool"] = jnp.mean(x, axis=(1, 2))
        out["logits"] = nn.Dense(1008, name="fc")(out["pool"])
        return out


def _convert_torch_state(state: Mapping[str, np.ndarray]) -> dict:
    """torch state-dict keys/layouts -> flax {'params', 'batch_stats'} nested dicts."""
    params: dict = {}
    stats: dict = {}

    def put(tree: dict, path: list[str], value: np.ndarray) -> None:
        for p in path[:-1]:
            tree = tree.setdefault(p, {})
        tree[path[-1]] = np.asarray(value, np.float32)

    for key, val in state.items():
        *mod, leaf = key.split(".")
        val = np.asarray(val)
        if leaf == "num_batches_tracked" or (mod and mod[0] == "AuxLogits"):
            continue  # unused by the FID network
        if mod and mod[-1] == "conv" and leaf == "weight":
            put(params, mod + ["kernel"], val.transpose(2, 3, 1, 0))
        elif mod and mod[-1] == "bn":
            target = {"weight": (params, "scale"), "bias": (params, "bias"),
                      "running_mean": (stats, "mean"), "running_var": (stats, "var")}.get(leaf)
            if target is None:
                raise ValueError(f"inception weights: unexpected key {key!r}")
            put(target[0], mod + [target[1]], val)
        elif mod == ["fc"]:
            put(params, ["fc", "kernel" if leaf == "weight" else "bias"], val.T if leaf == "weight" else val)
        else:
            raise ValueError(f"inception weights: unexpected key {key!r}")
    return {"params": params, "batch_stats": stats}


def _read_state(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return load_file(path)
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {path} needs torch (pip install torch), or convert it to .npz") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def default_inception_path() -> str:
    """LDM_JAX_INCEPTION if set, else ~/.cache/ldm_jax/pt_inception-2015-12-05-6726825d.pth."""
    return os.environ.get("LDM_JAX_INCEPTION") or os.path.join(
        os.path.expanduser("~"), ".cache", "ldm_jax", FID_WEIGHTS_FILE)


def load_inception_params(path: str | None = None) -> dict:
    """FID InceptionV3 variables {'params', 'batch_stats'} from pytorch-fid's .pth (or .npz/.safetensors)."""
    path = path or default_inception_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(MISSING_WEIGHTS.format(where=f" at {path}"))
    variables = _convert_torch_state(_read_state(path))
    # Shape check against the module so a wrong file fails here, not deep inside a jit.
    dummy = jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3))
    ref = jax.eval_shape(lambda r, x: InceptionV3FID().init(r, x, resize=False), jax.random.PRNGKey(0), dummy)
    ref_flat = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(ref)}
    got_flat = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(variables)}
    if ref_flat != got_flat:
        missing = sorted(set(ref_flat) - set(got_flat))[:3]
        wrong = sorted(k for k in set(ref_flat) & set(got_flat) if ref_flat[k] != got_flat[k])[:3]
        raise ValueError(f"inception weights {path}: missing {missing}, wrong shapes {wrong}")
    return jax.tree_util.tree_map(jnp.asarray, variables)


def inception_features_fn(variables: dict):
    """Returns a jitted fn: [-1, 1] NHWC images -> (N, 2048) pool features."""
    model = InceptionV3FID()
    # Variables go in as an argument: closing over 24M params would bake them into the HLO as constants.
    apply = jax.jit(lambda v, images: model.apply(v, images)["pool"])
    return lambda images: apply(variables, images)
