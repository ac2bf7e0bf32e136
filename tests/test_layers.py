"""The package's layering (README "Architecture"): every import inside ldm_jax points to a lower layer, so
sampling, evaluation and the converter read workdirs without importing training code."""

from __future__ import annotations

import ast
import pathlib

import ldm_jax

LAYERS = [
    {"models", "data", "xla_flags", "cli"},
    {"diffusion", "losses", "config_defaults", "checkpoint", "conditions"},
    {"workdir", "evaluation"},
    {"training", "inference", "convert", "cache_latents"},
    {"evaluate_workdir"},
]


def _imports(path: pathlib.Path) -> set[str]:
    """Top-level ldm_jax sub-packages/modules a file imports, function-local imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ldm_jax"):
            names = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("ldm_jax")]
        else:
            continue
        found |= {n.split(".")[1] for n in names if n.count(".") >= 1}
    return found


def test_imports_point_down_the_layers():
    rank = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    root = pathlib.Path(ldm_jax.__file__).parent
    upward = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).with_suffix("").parts
        if rel == ("__init__",):
            continue
        unit = rel[0]
        assert unit in rank, f"{path}: add {unit!r} to a layer in tests/test_layers.py (and the README)"
        for target in _imports(path) - {unit}:
            assert target in rank, f"{path} imports unknown ldm_jax.{target}"
            if rank[target] >= rank[unit] and target != unit:
                upward.append(f"{path.relative_to(root)} -> {target}")
    assert not upward, upward
