"""CLIP text encoder weights (transformers `CLIPTextModel` keys, as in SD v1's `cond_stage_model.transformer.` and
diffusers' `text_encoder/`) -> ldm_jax.models.clip.CLIPTextTransformer params."""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

from ldm_jax.convert.core import ConversionError, Path, Report, Rule, StateDict, fill_params, leaf_rule, same
from ldm_jax.models.clip import CLIPTextTransformer, clip_kwargs

IGNORED_SUFFIXES = ("embeddings.position_ids",)  # an index buffer older transformers saved


def normalize_keys(state: StateDict) -> StateDict:
    """Drop the `text_model.` level (present in saved files, absent from transformers 5's module tree)."""
    return {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in state.items()}


def config_from_transformers(cfg: dict[str, Any]) -> dict[str, Any]:
    """`model.clip` fields from a transformers CLIPTextConfig (config.json of `text_encoder/`)."""
    arch = (cfg.get("architectures") or ["CLIPTextModel"])[0]
    if arch not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        raise ValueError(f"text_encoder config: architecture {arch!r} is not supported (CLIPTextModel)")
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"text_encoder config: hidden_act {act!r} is not supported (quick_gelu, gelu)")
    return dict(vocab_size=int(cfg.get("vocab_size", 49408)), width=int(cfg.get("hidden_size", 512)),
                layers=int(cfg.get("num_hidden_layers", 12)), heads=int(cfg.get("num_attention_heads", 8)),
                mlp_dim=int(cfg.get("intermediate_size", 2048)), max_len=int(cfg.get("max_position_embeddings", 77)),
                act=act, eps=float(cfg.get("layer_norm_eps", 1e-5)))


def config_from_state(state: StateDict) -> dict[str, Any]:
    """`model.clip` fields from weight shapes (heads = width / 64, as every OpenAI CLIP text tower)."""
    try:
        vocab, width = state["embeddings.token_embedding.weight"].shape
        layers = len({m[1] for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
        return dict(vocab_size=int(vocab), width=int(width), layers=layers, heads=max(1, int(width) // 64),
                    mlp_dim=int(state["encoder.layers.0.mlp.fc1.weight"].shape[0]),
                    max_len=int(state["embeddings.position_embedding.weight"].shape[0]), act="quick_gelu", eps=1e-5)
    except KeyError as e:
        raise ConversionError(f"text encoder: key {e} not found: not a CLIPTextModel state dict") from e


def rule(path: Path) -> Rule | None:
    """Our path -> transformers key (without `text_model.`)."""
    if path == ("token_embedding", "embedding"):
        return same("embeddings.token_embedding.weight")
    if path == ("position_embedding",):
        return same("embeddings.position_embedding.weight")
    names = [f"encoder.layers.{m[1]}" if (m := re.match(r"^layers_(\d+)$", p)) else p for p in path[:-1]]
    return leaf_rule(".".join(names), path[-1])


def convert_clip(state: StateDict, fields: dict[str, Any], report: Report | None = None) -> dict:
    """Our CLIPTextTransformer params from a CLIPTextModel state dict."""
    state = normalize_keys(state)
    model = CLIPTextTransformer(**clip_kwargs(fields))
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    return fill_params("text encoder", abstract, state, rule, lambda k: k.endswith(IGNORED_SUFFIXES), report)
