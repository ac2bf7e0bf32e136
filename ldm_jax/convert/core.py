"""Conversion machinery: load PyTorch state dicts safely, fill a Flax param tree from them, account for every key.

A converter walks OUR (abstract) param tree; for each leaf a model-specific `rule_for(path)` names the source keys
and the transform (OIHW conv -> HWIO, Linear (out, in) -> (in, out), norm weight -> scale, ...). Every source key
must be consumed or explicitly ignored, every param filled, every shape equal; otherwise `ConversionError` with a
one-line summary and the list.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

Path = tuple[str, ...]
StateDict = dict[str, np.ndarray]


class ConversionError(ValueError):
    """A conversion that would leave source keys unused or our params unfilled; str = summary line + the list."""


@dataclass(frozen=True)
class Rule:
    """Source keys of one param leaf and fn(arrays, target_shape) -> the leaf."""

    keys: tuple[str, ...]
    fn: Callable[[list[np.ndarray], tuple[int, ...]], np.ndarray]


def to_kernel(src: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """PyTorch weight -> Flax kernel: conv (O, I, kh, kw) -> (kh, kw, I, O); Linear / 1×1 conv / conv1d
    (O, I[, 1[, 1]]) -> Dense (I, O) or 1×1 Conv (1, 1, I, O)."""
    if len(shape) == 4 and src.ndim == 4 and shape[:2] != (1, 1):
        return np.transpose(src, (2, 3, 1, 0))
    if src.ndim > 2 and any(s != 1 for s in src.shape[2:]):
        raise ConversionError(f"cannot use a {src.shape} convolution weight for a {shape} kernel")
    mat = src.reshape(src.shape[0], -1).T  # (I, O)
    return mat.reshape((1,) * (len(shape) - 2) + mat.shape) if len(shape) == 4 else mat


def kernel(key: str) -> Rule:
    return Rule((key,), lambda a, shape: to_kernel(a[0], shape))


def same(key: str) -> Rule:
    """Bias, norm weight (-> scale), embedding table: copied as is."""
    return Rule((key,), lambda a, shape: a[0])


def leaf_rule(prefix: str, leaf: str) -> Rule | None:
    """The ordinary leaves of a Conv / Dense / norm / Embed module named `prefix` in the source."""
    if leaf == "kernel":
        return kernel(f"{prefix}.weight")
    if leaf == "bias":
        return same(f"{prefix}.bias")
    if leaf in ("scale", "embedding"):
        return same(f"{prefix}.weight")
    return None


@dataclass
class Report:
    """What one conversion consumed and deliberately left aside (for the CLI's summary and meta.json)."""

    converted: dict[str, int] = field(default_factory=dict)  # component -> number of source keys used
    ignored: dict[str, list[str]] = field(default_factory=dict)  # reason -> keys

    def ignore(self, reason: str, keys: Iterable[str]) -> None:
        keys = sorted(keys)
        if keys:
            self.ignored.setdefault(reason, []).extend(keys)

    def summary(self) -> dict[str, Any]:
        return {"converted": self.converted,
                "ignored": {reason: {"count": len(k), "examples": k[:5]} for reason, k in self.ignored.items()}}


def _fail(name: str, problems: dict[str, list[str]]) -> None:
    problems = {k: v for k, v in problems.items() if v}
    if not problems:
        return
    head = ", ".join(f"{len(v)} {k}" for k, v in problems.items())
    lines = [f"  {k}: {item}" for k, v in problems.items() for item in v]
    raise ConversionError(f"{name}: conversion incomplete ({head})\n" + "\n".join(lines))


def fill_params(name: str, abstract: Mapping, source: Mapping[str, np.ndarray],
                rule_for: Callable[[Path], Rule | None], ignore: Callable[[str], bool] = lambda k: False,
                report: Report | None = None) -> dict:
    """Our params (float32 numpy) from `source`; raises ConversionError listing unused source keys, unfilled
    params, missing source keys and shape mismatches (all of them, at once)."""
    flat = flatten_dict(dict(abstract))
    out, used = {}, set()
    problems: dict[str, list[str]] = {"unused source keys": [], "unfilled params": [], "missing source keys": [],
                                      "shape mismatches": []}
    for path, leaf in flat.items():
        shape = tuple(leaf.shape)
        rule = rule_for(path)
        if rule is None:
            problems["unfilled params"].append(f"{'/'.join(path)} {shape} (no mapping)")
            continue
        absent = [k for k in rule.keys if k not in source]
        if absent:
            problems["missing source keys"] += [f"{k} (for {'/'.join(path)} {shape})" for k in absent]
            problems["unfilled params"].append(f"{'/'.join(path)} {shape}")
            continue
        used.update(rule.keys)
        try:
            value = np.asarray(rule.fn([np.asarray(source[k], np.float32) for k in rule.keys], shape), np.float32)
        except (ConversionError, ValueError) as e:
            problems["shape mismatches"].append(f"{'/'.join(path)} {shape} <- {', '.join(rule.keys)}: {e}")
            continue
        if value.shape != shape:
            srcs = ", ".join(f"{k} {tuple(np.shape(source[k]))}" for k in rule.keys)
            problems["shape mismatches"].append(f"{'/'.join(path)} {shape} <- {srcs} gives {value.shape}")
            continue
        out[path] = value
    problems["unused source keys"] = sorted(k for k in source if k not in used and not ignore(k))
    _fail(name, problems)
    if report is not None:
        report.converted[name] = len(used)
        report.ignore(f"{name}: ignored", (k for k in source if k not in used))
    return unflatten_dict(out)


def strip_prefix(state: Mapping[str, np.ndarray], prefix: str) -> StateDict:
    """The entries under `prefix` with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ---- reading files (never unpickling arbitrary objects) ----

def load_state_dict(path: str) -> StateDict:
    """float32 numpy arrays from .safetensors, or from a PyTorch .ckpt/.pt/.bin via torch.load(weights_only=True)
    (tensors and plain containers only). A Lightning checkpoint's 'state_dict' is unwrapped; the step is kept
    under the key '__global_step__' when present."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            try:
                return {k: _as_float32(v) for k, v in load_file(path).items()}
            except (TypeError, ValueError):  # bfloat16 tensors: numpy cannot hold them, torch can
                from safetensors.torch import load_file as load_torch

                return {k: _torch_to_numpy(v) for k, v in load_torch(path).items()}
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable .safetensors file ({str(e).splitlines()[0]}); the file is "
                             f"damaged or truncated") from e
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} needs PyTorch (pip install torch), or convert it to .safetensors") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses arbitrary objects: we never unpickle those
        first = str(e).splitlines()[0] if str(e) else ""
        if "Unsupported global" not in str(e) and "weights_only" in first:
            # Not a refused object but bytes torch cannot parse: torch's hint (weights_only=False) would be unsafe
            # and useless here.
            raise ValueError(f"{path}: not a readable PyTorch checkpoint (damaged, truncated or another format)") from e
        raise ValueError(f"{path}: holds non-tensor Python objects that are not loaded for safety "
                         f"({first}); use the .safetensors release of this checkpoint") from e
    except (RuntimeError, EOFError) as e:  # zip/pickle framing torch cannot read
        raise ValueError(f"{path}: not a readable PyTorch checkpoint (damaged, truncated or another format)") from e
    step = obj.get("global_step") if isinstance(obj, dict) else None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    out = {k: _torch_to_numpy(v) for k, v in obj.items() if hasattr(v, "detach")}
    if step is not None:
        out["__global_step__"] = np.asarray(int(step))
    return out


def _as_float32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) else x


def _torch_to_numpy(t: Any) -> np.ndarray:
    t = t.detach().cpu()
    return t.float().numpy() if t.is_floating_point() else t.numpy()


def load_component(folder: str) -> tuple[dict[str, Any], StateDict]:
    """(config.json, weights) of a diffusers/transformers component folder: model.safetensors or
    diffusion_pytorch_model.safetensors (or a sharded *.safetensors.index.json, or .bin via weights_only)."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{folder}: no config.json (not a diffusers/transformers component folder)")
    with open(cfg_path) as f:
        config = json.load(f)
    names = sorted(os.listdir(folder))
    for base in ("diffusion_pytorch_model", "model"):
        if f"{base}.safetensors.index.json" in names:
            with open(os.path.join(folder, f"{base}.safetensors.index.json")) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state: StateDict = {}
            for shard in shards:
                state.update(load_state_dict(os.path.join(folder, shard)))
            return config, state
        for ext in (".safetensors", ".bin"):
            if base + ext in names:
                return config, load_state_dict(os.path.join(folder, base + ext))
    variants = [n for n in names if n.endswith(".safetensors")]
    if len(variants) == 1:  # e.g. diffusion_pytorch_model.fp16.safetensors
        return config, load_state_dict(os.path.join(folder, variants[0]))
    raise FileNotFoundError(f"{folder}: no weights (expected diffusion_pytorch_model.safetensors or "
                            f"model.safetensors; found {names})")
