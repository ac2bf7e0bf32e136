"""The diffusion UNet from CompVis openaimodel keys (`model.diffusion_model.`) or a diffusers `unet/` folder.

Architecture differences and how they are expressed:
- SD v2's `use_linear_in_transformer` / diffusers' `use_linear_projection`: a Linear over channels at every pixel is
  a 1×1 conv, so those weights load into our 1×1 proj_in/proj_out kernels; no config field is needed.
- diffusers' per-level `attention_head_dim` (SD v1: 8 heads everywhere -> num_heads 8; SD v2: [5, 10, 20, 20]
  heads = 64 channels each -> num_head_channels 64). Other mixes are refused.
- openaimodel's AttentionBlock (non-transformer LDMs) keeps q, k, v interleaved per head in its qkv conv unless
  `use_new_attention_order`; those rows are reordered into our [q | k | v] layout. diffusers' UNet2DModel has
  separate to_q/to_k/to_v, concatenated.
- Not representable (refused with the field named): a timestep embedding other than [cos, sin] with shift 0,
  resblock_updown, per-level num_res_blocks, class/addition embeddings other than a class table (ours: 'adm').
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.convert.core import ConversionError, Path, Report, Rule, StateDict, fill_params, leaf_rule, to_kernel
from ldm_jax.models.unet import UNetModel

_RES_COMPVIS = {"in_norm": "in_layers.0", "in_conv": "in_layers.2", "emb_proj": "emb_layers.1",
                "out_norm": "out_layers.0", "out_conv": "out_layers.3", "skip": "skip_connection"}
_RES_DIFFUSERS = {"in_norm": "norm1", "in_conv": "conv1", "emb_proj": "time_emb_proj", "out_norm": "norm2",
                  "out_conv": "conv2", "skip": "conv_shortcut"}
_TOP_COMPVIS = {"time_embed_0": "time_embed.0", "time_embed_2": "time_embed.2", "out_norm": "out.0",
                "out_conv": "out.2", "label_emb": "label_emb"}
_TOP_DIFFUSERS = {"time_embed_0": "time_embedding.linear_1", "time_embed_2": "time_embedding.linear_2",
                  "out_norm": "conv_norm_out", "out_conv": "conv_out", "label_emb": "class_embedding",
                  "input_blocks_0_0": "conv_in"}
_BLOCK = re.compile(r"^(input_blocks|output_blocks|middle_block)_(\d+)(?:_(\d+))?$")
_ATTN_PARTS = ("norm", "qkv", "proj_in", "proj_out")


def _inner(rest: list[str], res_names: dict[str, str]) -> list[str]:
    """Module names inside a block: ResBlock parts, GroupNorm32's inner 'norm', transformer names."""
    if len(rest) >= 2 and rest[-1] == "norm" and rest[-2] in ("in_norm", "out_norm", "norm"):
        rest = rest[:-1]  # GroupNorm32 wraps an nn.GroupNorm named "norm"
    out = []
    for i, m in enumerate(rest):
        if i == 0 and m in res_names:
            m = res_names[m]
        elif t := re.match(r"^transformer_blocks_(\d+)$", m):
            m = f"transformer_blocks.{t[1]}"
        elif m == "to_out":
            m = "to_out.0"
        elif m == "geglu":
            m = "net.0"
        elif m == "out" and out and out[-1] == "ff":
            m = "net.2"
        out.append(m)
    return out


def _qkv_rule(prefix: str, heads: int, legacy: bool, bias: bool) -> Rule:
    """openaimodel's qkv conv1d (3C, C, 1): per-head [q, k, v] rows when legacy -> our Dense (C, 3C) [q | k | v]."""
    key = f"{prefix}.qkv.{'bias' if bias else 'weight'}"

    def fn(a: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        w = a[0]
        if legacy:
            w = w.reshape((heads, 3, w.shape[0] // (3 * heads)) + w.shape[1:]).swapaxes(0, 1).reshape(w.shape)
        return w if bias else to_kernel(w, shape)

    return Rule((key,), fn)


def _split_qkv_rule(prefix: str, names: tuple[str, str, str], bias: bool) -> Rule:
    keys = tuple(f"{prefix}.{n}.{'bias' if bias else 'weight'}" for n in names)

    def fn(a: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        return np.concatenate(a) if bias else np.concatenate([to_kernel(w, (shape[0], w.shape[0])) for w in a], 1)

    return Rule(keys, fn)


def compvis_rule(heads_of: dict[str, int], legacy_qkv: bool):
    """Our path -> openaimodel key. heads_of: number of heads per block prefix with a plain AttentionBlock."""
    def rule(path: Path) -> Rule | None:
        top, rest, leaf = path[0], list(path[1:-1]), path[-1]
        if top in _TOP_COMPVIS:
            return leaf_rule(_TOP_COMPVIS[top], leaf)
        b = _BLOCK.match(top)
        if b is None:
            return None
        prefix = f"{b[1]}.{b[2]}" + (f".{b[3]}" if b[3] is not None else "")
        if rest == ["qkv"]:
            return _qkv_rule(prefix, heads_of[prefix], legacy_qkv, leaf == "bias")
        return leaf_rule(".".join([prefix] + _inner(rest, _RES_COMPVIS)), leaf)

    return rule


def diffusers_rule(num_res_blocks: int, state: StateDict):
    """Our path -> diffusers key (down_blocks / mid_block / up_blocks)."""
    n1 = num_res_blocks + 1

    def block_prefix(kind: str, i: int, j: int | None, first: str) -> str:
        if kind == "middle_block":
            return ["mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"][i]
        if kind == "input_blocks":
            level, k = divmod(i - 1, n1)
            if k == num_res_blocks:
                return f"down_blocks.{level}.downsamplers.0"
            return f"down_blocks.{level}.{'resnets' if j == 0 else 'attentions'}.{k}"
        up, k = divmod(i, n1)
        if j == 0:
            return f"up_blocks.{up}.resnets.{k}"
        if first == "conv":
            return f"up_blocks.{up}.upsamplers.0"
        return f"up_blocks.{up}.attentions.{k}"

    def rule(path: Path) -> Rule | None:
        top, rest, leaf = path[0], list(path[1:-1]), path[-1]
        if top in _TOP_DIFFUSERS:
            return leaf_rule(_TOP_DIFFUSERS[top], leaf)
        b = _BLOCK.match(top)
        if b is None:
            return None
        j = None if b[3] is None else int(b[3])
        prefix = block_prefix(b[1], int(b[2]), j, rest[0] if rest else "")
        if rest == ["op"]:
            return leaf_rule(f"{prefix}.conv", leaf)
        if rest == ["qkv"]:  # UNet2DModel attention: separate projections
            legacy = f"{prefix}.to_q.weight" not in state
            return _split_qkv_rule(prefix, ("query", "key", "value") if legacy else ("to_q", "to_k", "to_v"),
                                   leaf == "bias")
        plain_attention = any(f"{prefix}.{n}.weight" in state for n in ("group_norm", "proj_attn", "to_out.0"))
        if plain_attention and rest[0] in ("norm", "proj_out"):
            legacy = f"{prefix}.proj_attn.weight" in state
            name = {"norm": "group_norm", "proj_out": "proj_attn" if legacy else "to_out.0"}[rest[0]]
            return leaf_rule(f"{prefix}.{name}", leaf)
        return leaf_rule(".".join([prefix] + _inner(rest, _RES_DIFFUSERS)), leaf)

    return rule


_DIFFUSERS_FIXED = (("flip_sin_to_cos", True), ("freq_shift", 0), ("center_input_sample", False),
                    ("time_embedding_type", "positional"), ("class_embed_type", None), ("addition_embed_type", None),
                    ("encoder_hid_dim", None), ("conv_in_kernel", 3), ("conv_out_kernel", 3),
                    ("downsample_padding", 1), ("mid_block_scale_factor", 1), ("resnet_out_scale_factor", 1.0),
                    ("only_cross_attention", False), ("dual_cross_attention", False), ("time_embedding_dim", None),
                    ("timestep_post_act", None), ("time_cond_proj_dim", None), ("norm_num_groups", 32),
                    ("norm_eps", 1e-5), ("act_fn", "silu"), ("cross_attention_norm", None),
                    ("attention_type", "default"),
                    ("class_embeddings_concat", False), ("downsample_type", "conv"), ("upsample_type", "conv"),
                    ("add_attention", True), ("attn_norm_num_groups", None), ("resnet_skip_time_act", False),
                    ("mid_block_only_cross_attention", None), ("time_embedding_act_fn", None))


def _heads_fields(chs: list[int], heads: list[int]) -> dict[str, int]:
    """num_heads if every attention has the same head count, else num_head_channels if the same head width."""
    if len(set(heads)) == 1:
        return dict(num_heads=heads[0], num_head_channels=-1)
    widths = {c // h for c, h in zip(chs, heads, strict=True)}
    if len(widths) == 1 and all(c % h == 0 for c, h in zip(chs, heads, strict=True)):
        return dict(num_heads=-1, num_head_channels=widths.pop())
    raise ValueError(f"unet config: attention heads {heads} for channels {chs} are neither a constant count nor a "
                     "constant width")


def config_from_diffusers(cfg: dict[str, Any]) -> dict[str, Any]:
    """Our `model.unet` fields + context_dim / num_classes ('_context_dim', '_num_classes') for a diffusers
    UNet2DConditionModel or UNet2DModel config.json."""
    cls = cfg.get("_class_name") or ("UNet2DConditionModel" if "cross_attention_dim" in cfg else "UNet2DModel")
    if cls not in ("UNet2DConditionModel", "UNet2DModel"):
        raise ValueError(f"unet config: _class_name {cls!r} is not supported (UNet2DConditionModel, UNet2DModel)")
    for name, want in _DIFFUSERS_FIXED:
        if name in cfg and cfg[name] != want and not (name == "attn_norm_num_groups" and cfg[name] == 32):
            raise ValueError(f"unet config: {name}={cfg[name]!r} is not supported (needs {want!r})")
    blocks = list(cfg["block_out_channels"])
    mc = blocks[0]
    nrb = cfg.get("layers_per_block", 2)
    if not isinstance(nrb, int) or any(b % mc for b in blocks):
        raise ValueError(f"unet config: layers_per_block {nrb} / block_out_channels {blocks} not supported")
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    plain = {"DownBlock2D", "UpBlock2D"}
    kinds = {t for t in down + up if t not in plain}
    allowed = {"CrossAttnDownBlock2D", "CrossAttnUpBlock2D"} if cls == "UNet2DConditionModel" else {
        "AttnDownBlock2D", "AttnUpBlock2D"}
    if not kinds <= allowed or len(down) != len(up):
        raise ValueError(f"unet config: block types {down} / {up} not supported")
    attn = [i for i, t in enumerate(down) if t not in plain]
    if attn != [i for i in range(len(up)) if up[len(up) - 1 - i] not in plain]:
        raise ValueError(f"unet config: attention in {down} and {up} is not symmetric")
    crossattn = cls == "UNet2DConditionModel"
    if crossattn and cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"unet config: mid_block_type {cfg.get('mid_block_type')!r} not supported")
    att_chs = [blocks[i] for i in attn] + [blocks[-1]]
    if crossattn:
        h = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)  # diffusers' legacy naming
        h = list(h) if isinstance(h, (list, tuple)) else [h] * len(blocks)
        heads = _heads_fields(att_chs, [h[i] for i in attn] + [h[-1]])
        depth = cfg.get("transformer_layers_per_block", 1)
        depth = list(depth) if isinstance(depth, (list, tuple)) else [depth]
        if len(set(depth)) != 1 or cfg.get("reverse_transformer_layers_per_block") is not None:
            raise ValueError(f"unet config: transformer_layers_per_block {depth} must be one value")
        context = cfg.get("cross_attention_dim", 1280)
        if not isinstance(context, int):
            raise ValueError(f"unet config: cross_attention_dim {context} must be one value")
    else:
        d = cfg.get("attention_head_dim", 8)
        heads = dict(num_heads=1, num_head_channels=-1) if d is None else dict(num_heads=-1, num_head_channels=d)
        depth, context = [1], None
    shift = cfg.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        raise ValueError(f"unet config: resnet_time_scale_shift {shift!r} not supported")
    return dict(in_channels=int(cfg.get("in_channels", 4)), out_channels=int(cfg.get("out_channels", 4)),
                model_channels=mc, channel_mult=[b // mc for b in blocks], num_res_blocks=nrb,
                attention_resolutions=[2**i for i in attn], **heads, use_scale_shift_norm=shift == "scale_shift",
                resblock_updown=False, transformer_depth=int(depth[0]), _context_dim=context,
                _num_classes=cfg.get("num_class_embeds"), _sample_size=cfg.get("sample_size"))


def config_from_compvis(state: StateDict, params: dict[str, Any] | None = None, num_heads: int | None = None,
                        num_head_channels: int | None = None) -> dict[str, Any]:
    """Our `model.unet` fields (+ '_context_dim', '_num_classes', '_legacy_qkv') from openaimodel keys, or from
    the yaml's unet_config.params when given. Head counts cannot be read from weights: yaml or arguments."""
    p = dict(params or {})
    if p:
        if p.get("resblock_updown") or not p.get("conv_resample", True) or p.get("dims", 2) != 2:
            raise ValueError("unet_config: resblock_updown / conv_resample=False / dims != 2 are not supported")
        if p.get("num_heads_upsample", -1) not in (-1, p.get("num_heads", -1)):
            raise ValueError("unet_config: num_heads_upsample != num_heads is not supported")
        nrb = p["num_res_blocks"]
        out = dict(in_channels=p["in_channels"], out_channels=p["out_channels"], model_channels=p["model_channels"],
                   channel_mult=list(p["channel_mult"]), num_res_blocks=nrb,
                   attention_resolutions=list(p["attention_resolutions"]),
                   num_heads=p.get("num_heads", -1), num_head_channels=p.get("num_head_channels", -1),
                   use_scale_shift_norm=bool(p.get("use_scale_shift_norm", False)), resblock_updown=False,
                   transformer_depth=int(p.get("transformer_depth", 1)),
                   _context_dim=p.get("context_dim") if p.get("use_spatial_transformer") else None,
                   _num_classes=p.get("num_classes"), _legacy_qkv=not p.get("use_new_attention_order", False))
    else:
        try:
            mc, in_ch = state["input_blocks.0.0.weight"].shape[:2]
            n_in = len({k.split(".")[1] for k in state if k.startswith("input_blocks.")})
            ops = sorted(int(k.split(".")[1]) for k in state if re.match(r"input_blocks\.\d+\.0\.op\.weight$", k))
            nrb = ops[0] - 1 if ops else n_in - 1
            levels = len(ops) + 1
            if n_in != levels * (nrb + 1):
                raise ConversionError("unet: cannot infer the layout (resblock_updown?): pass --original-config")
            first = [1 + lv * (nrb + 1) for lv in range(levels)]
            mult = [state[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] // mc for i in first]
            attn = [2**lv for lv, i in enumerate(first) if any(k.startswith(f"input_blocks.{i}.1.") for k in state)]
            depth = len({k.split(".")[3] for k in state if k.startswith("middle_block.1.transformer_blocks.")})
            ctx = state.get("middle_block.1.transformer_blocks.0.attn2.to_k.weight")
            emb = state["input_blocks.1.0.emb_layers.1.weight"].shape[0]
            label = state.get("label_emb.weight")
        except KeyError as e:
            raise ConversionError(f"unet: key {e} not found: not an openaimodel UNet state dict") from e
        if num_heads is None and num_head_channels is None:
            raise ConversionError("unet: the number of attention heads is not stored in the weights: pass "
                                  "--num-heads or --num-head-channels, or --original-config")
        out = dict(in_channels=int(in_ch), out_channels=int(state["out.2.weight"].shape[0]), model_channels=int(mc),
                   channel_mult=mult, num_res_blocks=nrb, attention_resolutions=attn,
                   num_heads=num_heads or -1, num_head_channels=num_head_channels or -1,
                   use_scale_shift_norm=emb == 2 * mult[0] * mc, resblock_updown=False,
                   transformer_depth=max(depth, 1), _context_dim=None if ctx is None else int(ctx.shape[1]),
                   _num_classes=None if label is None else int(label.shape[0]), _legacy_qkv=True)
    return out


def _heads_per_attention(fields: dict[str, Any]) -> dict[str, int]:
    """openaimodel key prefix of every AttentionBlock -> its number of heads (for the legacy qkv reorder)."""
    mc, mult, nrb = fields["model_channels"], fields["channel_mult"], fields["num_res_blocks"]

    def heads(ch: int) -> int:
        return fields["num_heads"] if fields["num_head_channels"] == -1 else ch // fields["num_head_channels"]

    out, i = {}, 1
    for lv, m in enumerate(mult):
        for _ in range(nrb):
            out[f"input_blocks.{i}.1"] = heads(m * mc)
            i += 1
        i += 1 if lv < len(mult) - 1 else 0
    out["middle_block.1"] = heads(mult[-1] * mc)
    k = 0
    for lv in reversed(range(len(mult))):
        for _ in range(nrb + 1):
            out[f"output_blocks.{k}.1"] = heads(mult[lv] * mc)
            k += 1
    return out


def build_unet(fields: dict[str, Any]) -> UNetModel:
    """Our UNetModel for `fields` (the '_'-prefixed extras say context_dim / num_classes)."""
    kw = {k: v for k, v in fields.items() if not k.startswith("_")}
    return UNetModel(**{**kw, "channel_mult": tuple(kw["channel_mult"]),
                        "attention_resolutions": tuple(kw["attention_resolutions"])},
                     use_spatial_transformer=fields.get("_context_dim") is not None,
                     context_dim=fields.get("_context_dim"), num_classes=fields.get("_num_classes"))


def convert_unet(state: StateDict, fields: dict[str, Any], fmt: str, report: Report | None = None,
                 ignore=lambda k: False) -> dict:
    """Our UNet params for `fields` from a CompVis (prefix removed) or diffusers UNet state dict."""
    model = build_unet(fields)
    f = 2 ** (len(fields["channel_mult"]) - 1)
    args = [jnp.zeros((1, f, f, fields["in_channels"])), jnp.zeros((1,), jnp.int32)]
    ctx = fields.get("_context_dim")
    kwargs = {"context": None if ctx is None else jnp.zeros((1, 1, ctx))}
    if fields.get("_num_classes") is not None:
        kwargs["y"] = jnp.zeros((1,), jnp.int32)
    abstract = jax.eval_shape(lambda k: model.init(k, *args, **kwargs), jax.random.key(0))["params"]
    if fmt == "compvis":
        rule = compvis_rule(_heads_per_attention(fields), fields.get("_legacy_qkv", True))
    else:
        rule = diffusers_rule(fields["num_res_blocks"], state)
    return fill_params("unet", abstract, state, rule, ignore, report)
