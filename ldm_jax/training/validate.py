"""Config checks that run before anything compiles: counts, intervals, rates and sizes, and what a resume may not
change. Each failure is one line naming the field (a ValueError)."""

from __future__ import annotations

import json
import math
from typing import Any

import ml_collections

# (section, field, minimum): integers that must be >= minimum.
_COUNTS = (
    ("train", "batch_size", 1), ("train", "num_steps", 1), ("train", "log_every", 1), ("train", "ckpt_every", 1),
    ("train", "max_to_keep", 1), ("train", "keep_every", 0), ("train", "grid_every", 0), ("train", "grad_accum", 1),
    ("train", "max_nonfinite_steps", 0), ("train", "preemption_sync_every", 1), ("train", "warmup_steps", 0),
    ("eval", "batch_size", 1), ("eval", "num_examples", 1), ("data", "resolution", 1), ("data", "prefetch", 0),
    ("data", "num_workers", 0),
)
# Fields of the saved config that a resume must keep, unless train.allow_resume_changes is set: they change
# what the restored optimizer state and data position mean.
_RESUME_FIXED = (("train", "batch_size"), ("train", "scale_lr"), ("train", "grad_accum"), ("train", "base_lr"),
                 ("data", "name"), ("data", "path"), ("data", "num_examples"), ("seed", None))


def check_train_config(config: ml_collections.ConfigDict) -> None:
    for section, field, minimum in _COUNTS:
        cfg = config.get(section)
        if cfg is None or field not in cfg:
            continue
        value = cfg[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{section}.{field} must be an integer >= {minimum}, got {value!r}")
    lr = config.train.base_lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"train.base_lr must be a finite number > 0, got {lr!r}")
    tc = config.train
    if "ema_decay" in tc and not (isinstance(tc.ema_decay, (int, float)) and 0 <= tc.ema_decay <= 1):
        raise ValueError(f"train.ema_decay must be in [0, 1], got {tc.ema_decay!r}")
    if "weight_decay" in tc and not (isinstance(tc.weight_decay, (int, float)) and tc.weight_decay >= 0):
        raise ValueError(f"train.weight_decay must be >= 0, got {tc.weight_decay!r}")

def _get(tree: dict, section: str, field: str | None) -> Any:
    node = tree.get(section)
    return node if field is None else (node or {}).get(field)


def check_resume(meta: dict, config: ml_collections.ConfigDict, ckpt_dir: str) -> None:
    """A checkpoint written for another model, batch size, lr scaling or data set is refused in one line."""
    saved = meta.get("config") or {}
    current = json.loads(json.dumps(config.to_dict()))  # tuples -> lists, as stored
    if "model" in saved and saved["model"] != current["model"]:
        diff = sorted(k for k in set(saved["model"]) | set(current["model"])
                      if saved["model"].get(k) != current["model"].get(k))
        raise ValueError(f"checkpoint {ckpt_dir} was written for a different model config (model.{diff} differ)")
    if config.train.allow_resume_changes:
        return
    for section, field in _RESUME_FIXED:
        if section not in saved or (field is not None and field not in saved[section]):
            continue  # older checkpoints
        old, new = _get(saved, section, field), _get(current, section, field)
        if old != new:
            name = section if field is None else f"{section}.{field}"
            raise ValueError(f"{name}={new!r} but the checkpoint in {ckpt_dir} was trained with {old!r}; resume "
                             f"with the same value, or set train.allow_resume_changes=True to continue anyway")
