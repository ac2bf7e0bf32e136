"""Stage-1 autoencoders (AutoencoderKL, VQModel) from CompVis/taming keys or diffusers folders.

CompVis (`first_stage_model.` in an LDM/SD file, or a bare autoencoder .ckpt): our names are the reference's with
`down.{i}.block.{j}` -> `down_{i}_block_{j}` etc. diffusers: `down_blocks.{i}.resnets.{j}`, the decoder's
`up_blocks` in reverse level order, `conv_shortcut` for `nin_shortcut`, `conv_norm_out`, and mid-block attention as
Linear `to_q/to_k/to_v/to_out.0` (older files: `query/key/value/proj_attn`) — the same math as the reference's
1×1 convs, so they load into our 1×1 Conv kernels.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ldm_jax.convert.core import ConversionError, Path, Report, Rule, StateDict, fill_params, leaf_rule, same
from ldm_jax.models.autoencoder import build_autoencoder

NOMINAL_RESOLUTION = 256  # only places attention (attn_resolutions are compared with it), see _attn_resolutions


def _attn_resolutions(levels: list[int], resolution: int) -> list[int]:
    return [resolution >> i for i in levels]


def config_from_diffusers(cfg: dict[str, Any]) -> dict[str, Any]:
    """Our `model` fields (+ 'scale_factor') for a diffusers AutoencoderKL / VQModel config.json."""
    cls = cfg.get("_class_name") or ("VQModel" if "num_vq_embeddings" in cfg else "AutoencoderKL")
    if cls not in ("AutoencoderKL", "VQModel"):
        raise ValueError(f"vae config: _class_name {cls!r} is not supported (AutoencoderKL, VQModel)")
    for name, want in (("act_fn", "silu"), ("norm_type", "group"), ("shift_factor", None),
                       ("latents_mean", None), ("latents_std", None)):
        if cfg.get(name, want) != want:
            raise ValueError(f"vae config: {name}={cfg[name]!r} is not supported (needs {want!r})")
    blocks = list(cfg["block_out_channels"])
    ch = blocks[0]
    if any(b % ch for b in blocks):
        raise ValueError(f"vae config: block_out_channels {blocks} are not multiples of the first")
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    ok_down, ok_up = ("DownEncoderBlock2D", "AttnDownEncoderBlock2D"), ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")
    if any(t not in ok_down for t in down) or any(t not in ok_up for t in up) or len(down) != len(up):
        raise ValueError(f"vae config: block types {down} / {up} are not supported ({ok_down} / {ok_up})")
    attn = [i for i, t in enumerate(down) if t.startswith("Attn")]
    if attn != [i for i in range(len(up)) if up[len(up) - 1 - i].startswith("Attn")]:
        raise ValueError(f"vae config: attention in down blocks {down} and up blocks {up} is not symmetric")
    res = cfg.get("sample_size", NOMINAL_RESOLUTION)
    res = int(res if isinstance(res, int) else res[0])
    kind = "vq" if cls == "VQModel" else "kl"
    z = int(cfg.get("latent_channels", 4))
    out = dict(type=kind, ch=ch, ch_mult=[b // ch for b in blocks], num_res_blocks=int(cfg.get("layers_per_block", 1)),
               attn_resolutions=_attn_resolutions(attn, res), resolution=res,
               in_channels=int(cfg.get("in_channels", 3)), z_channels=z, embed_dim=z,
               mid_attn=bool(cfg.get("mid_block_add_attention", True)), norm_groups=int(cfg.get("norm_num_groups", 32)))
    if int(cfg.get("out_channels", out["in_channels"])) != out["in_channels"]:
        raise ValueError("vae config: out_channels != in_channels is not supported")
    if kind == "vq":
        out.update(embed_dim=int(cfg.get("vq_embed_dim") or z), n_embed=int(cfg["num_vq_embeddings"]),
                   legacy_beta=True)  # diffusers' VectorQuantizer(legacy=True), as taming's
    for flag in ("use_quant_conv", "use_post_quant_conv"):
        if not cfg.get(flag, True):
            out[flag] = False
    out["scale_factor"] = float(cfg.get("scaling_factor", 0.18215))
    return out


def _count(state: StateDict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def config_from_compvis(state: StateDict, ddconfig: dict[str, Any] | None = None,
                        embed_dim: int | None = None, n_embed: int | None = None) -> dict[str, Any]:
    """Our `model` fields from reference keys (shapes), or from the yaml's ddconfig when given."""
    try:
        is_vq = "quantize.embedding.weight" in state
        if ddconfig is not None:
            d = ddconfig
            no_attn = d.get("attn_type", "vanilla") == "none"
            out = dict(type="vq" if is_vq else "kl", ch=int(d["ch"]), ch_mult=list(d["ch_mult"]),
                       num_res_blocks=int(d["num_res_blocks"]),
                       attn_resolutions=[] if no_attn else list(d.get("attn_resolutions", [])),
                       resolution=int(d.get("resolution", NOMINAL_RESOLUTION)), in_channels=int(d["in_channels"]),
                       z_channels=int(d["z_channels"]), mid_attn=not no_attn, norm_groups=32,
                       embed_dim=int(embed_dim if embed_dim is not None else state["quant_conv.weight"].shape[0]))
            if int(d.get("out_ch", out["in_channels"])) != out["in_channels"]:
                raise ValueError("ddconfig: out_ch != in_channels is not supported")
        else:
            ch, in_ch = state["encoder.conv_in.weight"].shape[:2]
            levels = _count(state, r"encoder\.down\.(\d+)\.")
            mult = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)]
            attn = [i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in state]
            out = dict(type="vq" if is_vq else "kl", ch=int(ch), ch_mult=mult,
                       num_res_blocks=_count(state, r"encoder\.down\.0\.block\.(\d+)\."),
                       attn_resolutions=_attn_resolutions(attn, NOMINAL_RESOLUTION), resolution=NOMINAL_RESOLUTION,
                       in_channels=int(in_ch), z_channels=int(state["decoder.conv_in.weight"].shape[1]),
                       mid_attn="encoder.mid.attn_1.q.weight" in state, norm_groups=32,
                       embed_dim=int(state["post_quant_conv.weight"].shape[1]))
        if is_vq:
            out["n_embed"] = int(n_embed or state["quantize.embedding.weight"].shape[0])
            out["legacy_beta"] = True  # taming's VectorQuantizer2(legacy=True) default
    except KeyError as e:
        raise ConversionError(f"first stage: key {e} not found: not a CompVis/taming autoencoder state dict") from e
    return out


_MID = {"mid_block_1": ("mid.block_1", "mid_block.resnets.0"), "mid_block_2": ("mid.block_2", "mid_block.resnets.1"),
        "mid_attn_1": ("mid.attn_1", "mid_block.attentions.0")}
_BLOCK = re.compile(r"^(down|up)_(\d+)_(block|attn)_(\d+)$")
_RESAMPLE = re.compile(r"^(down|up)_(\d+)_(downsample|upsample)$")


def compvis_rule(path: Path) -> Rule | None:
    """Our path -> the reference (taming / ldm model.py) key."""
    if path == ("quantize", "embedding"):
        return same("quantize.embedding.weight")
    names = []
    for m in path[:-1]:
        if b := _BLOCK.match(m):
            m = f"{b[1]}.{b[2]}.{b[3]}.{b[4]}"
        elif r := _RESAMPLE.match(m):
            m = f"{r[1]}.{r[2]}.{r[3]}"
        m = _MID[m][0] if m in _MID else m
        names.append(m)
    return leaf_rule(".".join(names), path[-1])


def diffusers_rule(n_levels: int, state: StateDict):
    """Our path -> the diffusers key (decoder up_blocks in reverse level order)."""
    def rule(path: Path) -> Rule | None:
        if path == ("quantize", "embedding"):
            return same("quantize.embedding.weight")
        names, in_attn = [], False
        for m in path[:-1]:
            if b := _BLOCK.match(m):
                i = int(b[2]) if b[1] == "down" else n_levels - 1 - int(b[2])
                m = f"{b[1]}_blocks.{i}.{'resnets' if b[3] == 'block' else 'attentions'}.{b[4]}"
                in_attn = b[3] == "attn"
            elif r := _RESAMPLE.match(m):
                i = int(r[2]) if r[1] == "down" else n_levels - 1 - int(r[2])
                m = f"{r[1]}_blocks.{i}.{r[1]}samplers.0"
            elif m in _MID:
                in_attn, m = m == "mid_attn_1", _MID[m][1]
            elif in_attn:
                legacy = f"{'.'.join(names)}.to_q.weight" not in state
                m = {"norm": "group_norm", "q": "query" if legacy else "to_q", "k": "key" if legacy else "to_k",
                     "v": "value" if legacy else "to_v", "proj_out": "proj_attn" if legacy else "to_out.0"}[m]
            else:
                m = {"norm_out": "conv_norm_out", "nin_shortcut": "conv_shortcut"}.get(m, m)
            names.append(m)
        return leaf_rule(".".join(names), path[-1])

    return rule


def model_config(fields: dict[str, Any]) -> ml_collections.ConfigDict:
    """A full stage-1 `model` ConfigDict (defaults of config_defaults.autoencoder_config + `fields`)."""
    from ldm_jax.config_defaults import autoencoder_config

    cfg = autoencoder_config(fields["type"]).model
    cfg.update({k: v for k, v in fields.items() if k in cfg})
    for flag in ("use_quant_conv", "use_post_quant_conv"):
        if flag in fields:
            cfg[flag] = fields[flag]
    return cfg


def convert_autoencoder(state: StateDict, fields: dict[str, Any], fmt: str, report: Report | None = None,
                        ignore=lambda k: False) -> dict:
    """Our params for the model `fields` describe, from a CompVis or diffusers state dict (prefix removed)."""
    model = build_autoencoder(model_config(fields))
    f = 2 ** (len(fields["ch_mult"]) - 1)
    x = jnp.zeros((1, 2 * f, 2 * f, fields["in_channels"]), jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    rule = compvis_rule if fmt == "compvis" else diffusers_rule(len(fields["ch_mult"]), state)
    return fill_params("first stage", abstract, state, rule, ignore, report)
