"""Read a whole pretrained model — a CompVis/SD single file or a diffusers folder — into our configs and params.

Every key of the source ends up converted, or in `Report.ignored` under a stated reason (diffusion-schedule
buffers derived from `betas`, the EMA bookkeeping, the unused half of an EMA/non-EMA pair, training losses,
pipeline components that are not part of the model); anything else raises ConversionError listing the keys.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ldm_jax.convert import autoencoder as ae
from ldm_jax.convert import clip as clip_conv
from ldm_jax.convert import unet as unet_conv
from ldm_jax.convert.core import ConversionError, Report, StateDict, load_component, load_state_dict, strip_prefix
from ldm_jax.diffusion.schedules import make_beta_schedule

SD_SCALE_FACTOR = 0.18215
SCHEDULE_BUFFERS = ("alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
                    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
                    "posterior_mean_coef2", "logvar", "lvlb_weights")


@dataclass
class LDMParts:
    """Stage 2 of a converted model: `model` fields, params, schedule, conditioning."""

    unet: dict[str, Any]
    params: dict  # the weights to sample with (EMA when the source has them)
    raw_params: dict | None  # non-EMA weights when the source has both (written with --trainable)
    cond_stage: str = "none"  # none | class | clip
    conditioning_key: str | None = None
    clip: dict[str, Any] | None = None
    n_classes: int = 0
    diffusion: dict[str, Any] = field(default_factory=dict)
    scale_factor: float = 1.0
    resolution: int = 256
    tokenizer: Any = None


@dataclass
class Converted:
    """A converted model: the stage-1 fields + params, optionally stage 2, and what was left aside."""

    autoencoder: dict[str, Any]
    ae_params: dict
    ldm: LDMParts | None
    report: Report
    step: int = 0
    notes: list[str] = field(default_factory=list)


def schedule_from_betas(betas: np.ndarray) -> dict[str, Any]:
    """Our `diffusion` fields reproducing a reference `betas` buffer (linear in sqrt(beta), linear, or cosine)."""
    betas = np.asarray(betas, np.float64)
    n = len(betas)
    for kind, start, end in (("linear", betas[0], betas[-1]), ("sqrt_linear", betas[0], betas[-1]),
                             ("cosine", 1e-4, 2e-2)):
        if np.allclose(make_beta_schedule(kind, n, start, end), betas, rtol=1e-4, atol=1e-7):
            return dict(schedule=kind, num_timesteps=n, linear_start=float(start), linear_end=float(end))
    raise ConversionError("betas: the checkpoint's schedule is not linear, sqrt_linear or cosine "
                          "(pass --original-config)")


def _schedule_from_diffusers(cfg: dict[str, Any]) -> dict[str, Any]:
    kind = cfg.get("beta_schedule", "scaled_linear")
    ours = {"scaled_linear": "linear", "linear": "sqrt_linear", "squaredcos_cap_v2": "cosine"}.get(kind)
    if ours is None or cfg.get("trained_betas") is not None:
        raise ValueError(f"scheduler config: beta_schedule {kind!r} / trained_betas not supported")
    pred = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}.get(cfg.get("prediction_type", "epsilon"))
    if pred is None:
        raise ValueError(f"scheduler config: prediction_type {cfg.get('prediction_type')!r} not supported")
    return dict(schedule=ours, num_timesteps=int(cfg.get("num_train_timesteps", 1000)),
                linear_start=float(cfg.get("beta_start", 0.00085)), linear_end=float(cfg.get("beta_end", 0.012)),
                parameterization=pred)


def _tokenizer(path: str | None) -> Any:
    from ldm_jax.data.clip_tokenizer import load_clip_tokenizer

    return load_clip_tokenizer(path)


# ---------------- CompVis / Stable Diffusion single files ----------------

def _read_yaml(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    import yaml

    with open(path) as f:
        return yaml.safe_load(f).get("model", {}).get("params", {})


def _ema_view(unet_state: StateDict, state: StateDict) -> StateDict | None:
    """The EMA copy of the UNet (LitEma names: 'model_ema.' + 'diffusion_model.<key>' without dots), if complete."""
    out = {}
    for k in unet_state:
        ek = "model_ema.diffusion_model" + k.replace(".", "")
        if ek not in state:
            return None
        out[k] = state[ek]
    return out


def from_compvis(path: str, original_config: str | None = None, num_heads: int | None = None,
                 num_head_channels: int | None = None, weights: str = "ema", tokenizer: str | None = None,
                 scale_factor: float | None = None, resolution: int | None = None,
                 parameterization: str | None = None, trainable: bool = False) -> Converted:
    """A CompVis LDM / Stable Diffusion v1 .ckpt/.safetensors, or a bare first-stage autoencoder checkpoint."""
    state = load_state_dict(path)
    step = int(state.pop("__global_step__", 0))
    y = _read_yaml(original_config)
    report, notes = Report(), []
    if not any(k.startswith("model.diffusion_model.") for k in state):  # a stage-1 checkpoint
        report.ignore("loss.*: training losses (LPIPS, discriminator), not converted",
                      [k for k in state if k.startswith("loss.")])
        ae_state = {k: v for k, v in state.items() if not k.startswith("loss.")}
        fields = ae.config_from_compvis(ae_state, y.get("ddconfig"), y.get("embed_dim"), y.get("n_embed"))
        params = ae.convert_autoencoder(ae_state, fields, "compvis", report)
        return Converted(fields, params, None, report, step, notes)

    claimed = set()

    def take(prefix: str) -> StateDict:
        sub = strip_prefix(state, prefix)
        claimed.update(prefix + k for k in sub)
        return sub

    fs_cfg = y.get("first_stage_config", {}).get("params", {})
    ae_state = take("first_stage_model.")
    report.ignore("first_stage_model.loss.*: training losses, not converted",
                  ["first_stage_model.loss." + k[5:] for k in ae_state if k.startswith("loss.")])
    ae_state = {k: v for k, v in ae_state.items() if not k.startswith("loss.")}
    fields = ae.config_from_compvis(ae_state, fs_cfg.get("ddconfig"), fs_cfg.get("embed_dim"), fs_cfg.get("n_embed"))
    ae_params = ae.convert_autoencoder(ae_state, fields, "compvis", report)

    # conditioning stage
    cond = take("cond_stage_model.")
    cond_cfg = y.get("cond_stage_config") or {}
    cond_target = cond_cfg.get("target", "") if isinstance(cond_cfg, dict) else str(cond_cfg)
    parts = LDMParts(unet={}, params={}, raw_params=None)
    clip_state = clip_conv.normalize_keys(strip_prefix(cond, "transformer."))
    if "embeddings.token_embedding.weight" in clip_state:
        parts.cond_stage, parts.conditioning_key = "clip", "crossattn"
        parts.clip = clip_conv.config_from_state(clip_state)
        cond_params = clip_conv.convert_clip(clip_state, parts.clip, report)
        parts.tokenizer = _tokenizer(tokenizer)
    elif set(cond) == {"embedding.weight"}:
        parts.cond_stage, parts.n_classes = "class", int(cond["embedding.weight"].shape[0])
        parts.conditioning_key = "crossattn"
        cond_params = {"embedding": {"embedding": cond["embedding.weight"].astype(np.float32)}}
        report.converted["class embedder"] = 1
    elif cond:
        raise ConversionError(f"cond_stage_model: this conditioning encoder ({cond_target or 'unknown'}) is not "
                              f"supported (CLIP text, class embedding)\n" + "\n".join(f"  {k}" for k in sorted(cond)))
    else:
        cond_params = None
    key = y.get("conditioning_key", parts.conditioning_key)
    if key not in (None, "crossattn", "adm"):
        raise ConversionError(f"conditioning_key {key!r} is not supported by the converter (crossattn, adm, none)")
    parts.conditioning_key = key

    # UNet (EMA or not)
    unet_state = take("model.diffusion_model.")
    if num_heads is None and num_head_channels is None and parts.cond_stage == "clip" and not y:
        num_heads = 8  # SD v1's layout; SD v2 (OpenCLIP, 64-channel heads) is refused above
        notes.append("unet: 8 attention heads assumed (Stable Diffusion v1); --num-heads/--num-head-channels")
    parts.unet = unet_conv.config_from_compvis(unet_state, y.get("unet_config", {}).get("params"), num_heads,
                                               num_head_channels)
    if parts.unet.get("_num_classes"):  # a class table in the UNet: openaimodel's 'adm'-style conditioning
        parts.conditioning_key, parts.n_classes = "adm", int(parts.unet["_num_classes"])
    ema = _ema_view(unet_state, state)
    ema_keys = {"model_ema.diffusion_model" + k.replace(".", "") for k in unet_state} if ema else set()
    claimed.update(ema_keys)
    use_ema = weights == "ema" and ema is not None
    parts.params = unet_conv.convert_unet(ema if use_ema else unet_state, parts.unet, "compvis", report)
    if ema is not None and trainable:
        parts.raw_params = unet_conv.convert_unet(unet_state if use_ema else ema, parts.unet, "compvis")
    elif ema is not None:
        report.ignore("the non-EMA UNet weights (sampling uses the EMA ones; --trainable keeps both)" if use_ema
                      else "the EMA UNet weights (--weights raw)",
                      ema_keys if not use_ema else ["model.diffusion_model." + k for k in unet_state])
    if cond_params is not None:
        parts.params = {"unet": parts.params, "cond_encoder": cond_params}
        if parts.raw_params is not None:
            parts.raw_params = {"unet": parts.raw_params, "cond_encoder": cond_params}
    else:
        parts.params = {"unet": parts.params}
        parts.raw_params = None if parts.raw_params is None else {"unet": parts.raw_params}

    # schedule, scaling, resolution; then account for every remaining key
    if "betas" in state:
        claimed.add("betas")
        parts.diffusion = schedule_from_betas(state["betas"])
    if y:
        want = dict(schedule=y.get("beta_schedule", "linear"), num_timesteps=int(y.get("timesteps", 1000)),
                    linear_start=float(y.get("linear_start", 1e-4)), linear_end=float(y.get("linear_end", 2e-2)))
        if parts.diffusion and not np.allclose(make_beta_schedule(**{("kind" if k == "schedule" else k): v
                                                                     for k, v in want.items()}),
                                               state["betas"], rtol=1e-4, atol=1e-7):
            raise ConversionError("betas in the checkpoint disagree with the schedule in --original-config")
        parts.diffusion = want
    if not parts.diffusion:
        raise ConversionError("no 'betas' buffer in the checkpoint: pass --original-config")
    parts.diffusion["parameterization"] = parameterization or y.get("parameterization", "eps")
    report.ignore("diffusion-schedule buffers (derived from betas)", [k for k in SCHEDULE_BUFFERS if k in state])
    report.ignore("EMA bookkeeping", [k for k in ("model_ema.num_updates", "model_ema.decay") if k in state])
    claimed.update(k for k in state if k in SCHEDULE_BUFFERS or k in ("model_ema.num_updates", "model_ema.decay"))
    if scale_factor is None and "scale_factor" in state:
        scale_factor = float(state["scale_factor"])
    claimed.add("scale_factor")
    if scale_factor is None:
        scale_factor = float(y["scale_factor"]) if "scale_factor" in y else (
            SD_SCALE_FACTOR if parts.cond_stage == "clip" else 1.0)
        if "scale_factor" not in y:
            notes.append(f"scale_factor {scale_factor} assumed (not in the checkpoint; --scale-factor to set it)")
    parts.scale_factor = scale_factor
    if parts.unet["in_channels"] != fields["embed_dim"]:
        raise ConversionError(f"unet in_channels {parts.unet['in_channels']} != latent channels {fields['embed_dim']}: "
                              "concat-conditioned models (inpainting, super-resolution) are not supported")
    f = 2 ** (len(fields["ch_mult"]) - 1)
    latent = y.get("image_size") or (64 if parts.cond_stage == "clip" else None)
    parts.resolution = int(resolution or (latent * f if latent else 256))
    unused = sorted(k for k in state if k not in claimed)
    if unused:
        raise ConversionError(f"{path}: conversion incomplete ({len(unused)} unused source keys)\n"
                              + "\n".join(f"  unused source keys: {k}" for k in unused))
    return Converted(fields, ae_params, parts, report, step, notes)


# ---------------- diffusers folders ----------------

def _component_dirs(folder: str) -> dict[str, str]:
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        with open(os.path.join(folder, "config.json")) as f:
            cls = json.load(f).get("_class_name", "")
        role = {"AutoencoderKL": "vae", "VQModel": "vae", "UNet2DConditionModel": "unet", "UNet2DModel": "unet"}
        if cls not in role:
            raise ValueError(f"{folder}: a single {cls or 'unknown'} component is not convertible (a VAE/VQModel "
                             "folder, or a pipeline folder with model_index.json)")
        return {role[cls]: folder}
    with open(index) as f:
        entries = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    out = {}
    for name, spec in entries.items():
        if spec is None or (isinstance(spec, list) and spec[-1] is None):
            continue
        role = {"vqvae": "vae"}.get(name, name)
        out[role] = os.path.join(folder, name)
    return out


def from_diffusers(folder: str, tokenizer: str | None = None, scale_factor: float | None = None,
                   resolution: int | None = None) -> Converted:
    """A diffusers pipeline folder (vae|vqvae, unet, text_encoder, tokenizer, scheduler) or one VAE folder."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"diffusers folder not found: {folder}")
    dirs = _component_dirs(folder)
    report, notes = Report(), []
    if "vae" not in dirs:
        raise FileNotFoundError(f"{folder}: no vae/ or vqvae/ component")
    vae_cfg, vae_state = load_component(dirs["vae"])
    fields = ae.config_from_diffusers(vae_cfg)
    vae_scale = fields.pop("scale_factor")
    ae_params = ae.convert_autoencoder(vae_state, fields, "diffusers", report)
    report.ignore("pipeline components that are not part of the model",
                  [n for n in dirs if n not in ("vae", "unet", "text_encoder", "tokenizer", "scheduler")])
    if "unet" not in dirs:
        return Converted(fields, ae_params, None, report, 0, notes)
    unet_cfg, unet_state = load_component(dirs["unet"])
    ufields = unet_conv.config_from_diffusers(unet_cfg)
    parts = LDMParts(unet=ufields, params={}, raw_params=None, scale_factor=scale_factor or vae_scale)
    params = {"unet": unet_conv.convert_unet(unet_state, ufields, "diffusers", report)}
    if ufields["_context_dim"] is not None:
        if "text_encoder" not in dirs:
            raise FileNotFoundError(f"{folder}: a cross-attention UNet needs text_encoder/")
        te_cfg, te_state = load_component(dirs["text_encoder"])
        parts.clip = clip_conv.config_from_transformers(te_cfg)
        report.ignore("text_encoder: the pooled-output projection (not used for the cross-attention context)",
                      [k for k in te_state if k.startswith("text_projection.")])
        te_state = {k: v for k, v in te_state.items() if not k.startswith("text_projection.")}
        params["cond_encoder"] = clip_conv.convert_clip(te_state, parts.clip, report)
        parts.cond_stage, parts.conditioning_key = "clip", "crossattn"
        parts.tokenizer = _tokenizer(tokenizer or dirs.get("tokenizer"))
    elif ufields["_num_classes"] is not None:
        parts.conditioning_key, parts.n_classes = "adm", int(ufields["_num_classes"])
        notes.append("class-conditional UNet: our guidance uses the last class index as the null class")
    if ufields["in_channels"] != fields["embed_dim"]:
        raise ConversionError(f"unet in_channels {ufields['in_channels']} != latent channels {fields['embed_dim']}: "
                              "concat-conditioned models (inpainting, super-resolution) are not supported")
    parts.params = params
    sched = os.path.join(dirs.get("scheduler", ""), "scheduler_config.json")
    if os.path.isfile(sched):
        with open(sched) as f:
            parts.diffusion = _schedule_from_diffusers(json.load(f))
    else:
        parts.diffusion = _schedule_from_diffusers({})
        notes.append("no scheduler/: Stable Diffusion's schedule assumed (scaled_linear 0.00085 -> 0.012, eps)")
    sample = ufields.get("_sample_size")
    sample = int(sample if isinstance(sample, int) else (sample or [64])[0])
    parts.resolution = int(resolution or sample * 2 ** (len(fields["ch_mult"]) - 1))
    return Converted(fields, ae_params, parts, report, 0, notes)
