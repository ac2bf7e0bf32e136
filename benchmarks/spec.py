"""What is benchmarked: the cases and their shapes, shared by every side (standard library only).

One architecture per model, expressed once in our terms and mapped to diffusers' config here, so that all sides
build the same network (the same parameter count is checked at run time, and with the torch peer present ours
runs on its converted weights).
"""

from __future__ import annotations

import copy
from typing import Any

# SD-style cross-attention UNet, ~24M parameters (REFERENCE.md's peer measurements use the same one).
UNET_FULL = {
    "model_channels": 96, "channel_mult": [1, 2, 2, 2], "num_res_blocks": 2, "attention_resolutions": [2],
    "num_head_channels": 32, "context_dim": 128, "context_len": 16,
}
UNET_QUICK = {
    "model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [2],
    "num_head_channels": 32, "context_dim": 32, "context_len": 8,
}
# KL autoencoder, f = 4 (128x128x3 <-> 32x32x4: the LDM-4 latent shape of the UNet cases).
AE_FULL = {"ch": 64, "ch_mult": [1, 2, 4], "num_res_blocks": 2, "z_channels": 4, "embed_dim": 4}
AE_QUICK = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "z_channels": 4, "embed_dim": 4}

# Stable-Diffusion noise schedule ("linear" in sqrt(beta) = diffusers' "scaled_linear").
SCHEDULE = {"num_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012}
TRAIN = {"lr": 1e-4, "weight_decay": 0.01}
SIDES = ("ours", "torch", "flax")


def make_cases(quick: bool = False) -> list[dict[str, Any]]:
    """The benchmark cases, in run order. Each is a self-contained dict that every worker understands."""
    unet, ae = (UNET_QUICK, AE_QUICK) if quick else (UNET_FULL, AE_FULL)
    lat, img = (8, 32) if quick else (32, 128)
    peers = list(SIDES)

    def case(name: str, kind: str, about: str, **kw: Any) -> dict[str, Any]:
        c = {"name": name, "kind": kind, "about": about, "sides": list(peers), "schedule": SCHEDULE,
             "train": TRAIN, **kw}
        return copy.deepcopy(c)

    b = 2 if quick else 8
    cases = [
        case("unet_train", "unet_train", "UNet training step: forward, backward, AdamW update",
             unet=unet, batch=b, size=lat, in_channels=4),
        case("ddim_cfg", "ddim", "DDIM 50 steps, eta 0, classifier-free guidance 7.5 (cond+uncond: batch 2B)",
             unet=unet, batch=1, size=lat, in_channels=4, steps=50, guidance=7.5),
        case("ae_encode", "ae_encode", "autoencoder encode (posterior mode)", ae=ae, batch=2 if quick else 4,
             size=img),
        case("ae_decode", "ae_decode", "autoencoder decode", ae=ae, batch=2 if quick else 4, size=img),
    ]
    # The paper's efficiency claim: the same UNet trained on f=4 latents vs on pixels (same batch). In quick
    # mode the LDM-4 step is unet_train's own (same shapes), which saves a compilation.
    ldm_b = 2
    cases.append(case("ldm4_train", "unet_train", f"LDM-4: UNet step on {lat}x{lat}x4 latents",
                      unet=unet, batch=ldm_b, size=lat, in_channels=4))
    if ldm_b == b:
        cases[-1]["same_as"] = "unet_train"
    cases.append(case("ldm1_train", "unet_train", f"LDM-1: the same UNet step on {img}x{img}x3 pixels",
                      unet=unet, batch=ldm_b, size=img, in_channels=3))
    for c in cases[-2:]:
        c["sides"] = ["ours"]
    # Around the step: ldm_jax against its own previous way (benchmarks/pipeline.py; a ratio, no peer).
    cases += [case("data", "pipeline", "input pipeline: grain workers vs one prefetch thread (images/s)"),
              case("latent_cache", "pipeline", "demo stage-2 step: from the latent cache vs encoding in the step"),
              case("loop", "pipeline", "demo stage-2 train loop steps/s over the compiled step back to back")]
    for c in cases[-3:]:
        c["sides"] = ["ours"]
    return cases


def context_shape(case: dict[str, Any], batch: int | None = None) -> tuple[int, int, int]:
    """(B, L, D) of the cross-attention context."""
    u = case["unet"]
    return (case["batch"] if batch is None else batch, u["context_len"], u["context_dim"])


def heads(unet: dict[str, Any]) -> int:
    """Attention heads (the same at every attention level: all levels of these configs have equal width)."""
    widths = {unet["model_channels"] * unet["channel_mult"][i] for i in range(len(unet["channel_mult"]))
              if 2**i in unet["attention_resolutions"]}
    widths.add(unet["model_channels"] * unet["channel_mult"][-1])
    hs = {w // unet["num_head_channels"] for w in widths}
    if len(hs) != 1:
        raise ValueError(f"bench unet config: attention widths {sorted(widths)} give different head counts")
    return hs.pop()


def ours_unet_kwargs(case: dict[str, Any]) -> dict[str, Any]:
    """UNetModel(**kwargs) for a case (dtype / attention_impl are added by the worker)."""
    u = case["unet"]
    return dict(in_channels=case["in_channels"], out_channels=case["in_channels"],
                model_channels=u["model_channels"], channel_mult=tuple(u["channel_mult"]),
                num_res_blocks=u["num_res_blocks"], attention_resolutions=tuple(u["attention_resolutions"]),
                num_head_channels=u["num_head_channels"], use_spatial_transformer=True,
                context_dim=u["context_dim"])


def diffusers_unet_kwargs(case: dict[str, Any]) -> dict[str, Any]:
    """UNet2DConditionModel / FlaxUNet2DConditionModel kwargs for the same network.

    diffusers' `attention_head_dim` is (for legacy reasons) the number of heads; its mid block always has
    cross-attention, as our middle block (ResBlock, SpatialTransformer, ResBlock).
    """
    u = case["unet"]
    n = len(u["channel_mult"])
    att = [2**i in u["attention_resolutions"] for i in range(n)]
    return dict(
        sample_size=case["size"], in_channels=case["in_channels"], out_channels=case["in_channels"],
        block_out_channels=tuple(u["model_channels"] * m for m in u["channel_mult"]),
        layers_per_block=u["num_res_blocks"],
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in att),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(att)),
        cross_attention_dim=u["context_dim"], attention_head_dim=heads(u),
    )


def ours_ae_kwargs(case: dict[str, Any]) -> dict[str, Any]:
    """AutoencoderKL(**kwargs) for a case."""
    a = case["ae"]
    return dict(embed_dim=a["embed_dim"], ch=a["ch"], ch_mult=tuple(a["ch_mult"]),
                num_res_blocks=a["num_res_blocks"], attn_resolutions=(), resolution=case["size"], in_channels=3,
                z_channels=a["z_channels"])


def diffusers_ae_kwargs(case: dict[str, Any]) -> dict[str, Any]:
    """diffusers AutoencoderKL / FlaxAutoencoderKL kwargs for the same network (mid-block attention on)."""
    a = case["ae"]
    n = len(a["ch_mult"])
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(a["ch"] * m for m in a["ch_mult"]),
                layers_per_block=a["num_res_blocks"], latent_channels=a["z_channels"], norm_num_groups=32,
                sample_size=case["size"])


def latent_size(case: dict[str, Any]) -> int:
    """Spatial size of the autoencoder's latents for an ae_* case."""
    return case["size"] // 2 ** (len(case["ae"]["ch_mult"]) - 1)
