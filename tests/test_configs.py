"""Every config file loads through config_flags, builds its model abstractly (jax.eval_shape, no compile) and
carries the paper's / reference code's key numbers."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from ldm_jax.models.autoencoder import build_autoencoder
from ldm_jax.models.latent_diffusion import build_latent_diffusion
from ldm_jax.training.common import scaled_lr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE1 = ("kl_f4", "kl_f8", "kl_f16", "vq_f4", "vq_f8", "vq_f16")
STAGE2 = ("ldm_f4", "ldm_kl8", "cin_ldm_vq_f8", "txt2img_kl8", "sr_bsr", "inpainting", "semantic")
DEMOS = ("demo_autoencoder", "demo_ldm", "demo_txt2img", "demo_inpainting", "demo_sr")
OTHERS = ("demo_pairs", "finetune_sd")  # tested below and in test_finetune.py / the pairs run


def load(name: str):
    """Loads configs/<name>.py the way train.py does (config_flags), on a private flag registry."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv)
    fv(["prog", f"--config={os.path.join(ROOT, 'configs', name + '.py')}"])
    return fv.config


def n_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def stage1_of(cfg):
    """The stage-1 config a stage-2 config's first_stage.workdir names (runs/vq_f4_noattn -> vq_f4, no mid attn)."""
    name = os.path.basename(cfg.first_stage.workdir)
    s1 = load(name.replace("_noattn", ""))
    if name.endswith("_noattn"):
        s1.model.mid_attn = False
    return s1


def test_every_config_file_is_covered():
    files = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))}
    assert files == set(STAGE1) | set(STAGE2) | set(DEMOS) | set(OTHERS)


def test_demo_pairs_and_finetune_configs():
    c = load("demo_pairs")
    assert (c.data.name, c.data.resolution, c.data.width, c.data.random_flip) == ("fashion_mnist_pairs", 32, 64, False)
    assert c.condition.type == "text" and c.sampling.pair_eval_samples == 10
    # The layout must come from the caption: at t = T the network sees pure noise, and sampling starts there.
    from ldm_jax.diffusion.samplers import ddim_timesteps
    from ldm_jax.workdir import make_schedule

    d = c.diffusion
    assert d.zero_terminal_snr and d.parameterization == "v" and d.snr_gamma == 0.0
    assert float(make_schedule(c).alphas_cumprod[-1]) == 0.0
    assert c.sampling.spacing == "trailing"
    assert ddim_timesteps(d.num_timesteps, c.sampling.steps, "trailing").max() == d.num_timesteps - 1
    c.model.latent_channels = 4
    _abstract_init_demo(c, latent_hw=(8, 16))
    f = load("finetune_sd")
    assert f.init_from == "" and not f.model.train_text_encoder and f.train.base_lr == 1e-5 and not f.train.scale_lr
    assert f.condition.p_uncond == 0.1 and f.model.dtype == "bfloat16"


@pytest.mark.parametrize("name", STAGE1)
def test_stage1_builds_abstractly(name):
    c = load(name)
    model = build_autoencoder(c.model)
    r = c.data.resolution
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), jnp.zeros((1, r, r, 3)))
    f = model.downsample_factor
    z = jax.eval_shape(lambda v, x: model.apply(v, x, method="encode_latent"), shapes, jnp.zeros((1, r, r, 3)))
    assert z.shape == (1, r // f, r // f, c.model.embed_dim)
    if c.model.type == "kl":
        assert c.loss.kl_weight == 1e-6 and c.loss.disc_start == 50001 and c.loss.disc_weight == 0.5
    else:
        assert c.model.beta == 0.25
    if name == "kl_f8":  # the reference / Stable Diffusion kl-f8 autoencoder has 83.65M parameters
        assert n_params(shapes["params"]) == pytest.approx(83.65e6, rel=1e-3)


STAGE1_NUMBERS = {  # factor, channels, codebook, ch_mult, attention resolutions
    "kl_f4": (4, 3, None, (1, 2, 4), ()),
    "kl_f8": (8, 4, None, (1, 2, 4, 4), ()),
    "kl_f16": (16, 16, None, (1, 1, 2, 2, 4), (16,)),
    "vq_f4": (4, 3, 8192, (1, 2, 4), ()),
    "vq_f8": (8, 4, 16384, (1, 2, 2, 4), (32,)),
    "vq_f16": (16, 8, 16384, (1, 1, 2, 2, 4), (16,)),
}


@pytest.mark.parametrize("name", STAGE1)
def test_stage1_paper_numbers(name):
    c = load(name)
    f, ch, codes, mult, attn = STAGE1_NUMBERS[name]
    assert 2 ** (len(c.model.ch_mult) - 1) == f
    assert c.model.embed_dim == c.model.z_channels == ch
    assert tuple(c.model.ch_mult) == mult and tuple(c.model.attn_resolutions) == attn
    assert c.model.ch == 128 and c.model.num_res_blocks == 2 and c.model.type == name[:2]
    if codes:
        assert c.model.n_embed == codes
    assert c.loss.disc_n_layers == (2 if name in ("vq_f8", "vq_f16") else 3)


def _abstract_init(cfg):
    s1 = stage1_of(cfg)
    f = 2 ** (len(s1.model.ch_mult) - 1)
    lc = s1.model.embed_dim
    assert cfg.model.latent_channels == lc, "model.latent_channels disagrees with the named first stage"
    model = build_latent_diffusion(cfg.model, lc)  # also checks unet in/out channels against the latents
    side = cfg.data.resolution // f
    ctype = cfg.condition.type
    cond = {}
    if ctype == "class":
        cond["label"] = jnp.zeros((1,), jnp.int32)
    elif ctype == "text":
        cond["tokens"] = jnp.zeros((1, cfg.model.text_max_len), jnp.int32)
    elif ctype == "lowres":
        low = cfg.data.resolution // cfg.condition.sr_factor
        cond["concat"] = jnp.zeros((1, low, low, cfg.data.channels))
    elif ctype == "inpaint":
        cond["concat"] = jnp.zeros((1, side, side, lc + 1))
    elif ctype == "semantic":
        r = cfg.data.resolution
        cond["concat"] = jnp.zeros((1, r, r, cfg.model.concat_in_channels))
    x = jnp.zeros((1, side, side, lc))
    t = jnp.zeros((1,), jnp.int32)
    # init traces the forward pass once: shapes and channel counts are checked without compiling anything.
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, cond))
    return shapes["params"], side


@pytest.mark.parametrize("name", STAGE2)
def test_stage2_builds_abstractly(name):
    cfg = load(name)
    params, side = _abstract_init(cfg)
    n = n_params(params)
    u = cfg.model.unet
    if name == "ldm_f4":  # paper Table 13: CelebA-HQ LDM-VQ-4, 274M parameters
        assert n == pytest.approx(274e6, rel=0.01)
    elif name == "ldm_kl8":  # paper Table 13: LSUN-Churches LDM-KL-8, 294M parameters
        assert n == pytest.approx(294e6, rel=0.01)
    elif name == "txt2img_kl8":  # paper: LDM-KL-8-G 1.45B (UNet + 32-layer transformer)
        assert n == pytest.approx(1.45e9, rel=0.03)
        assert n_params(params["cond_encoder"]) == pytest.approx(543e6, rel=0.01)
    elif name == "semantic":
        assert params["rescaler"]["channel_mapper"]["kernel"].shape == (1, 1, 182, 3)
    assert side == {"ldm_kl8": 32, "txt2img_kl8": 32, "cin_ldm_vq_f8": 32}.get(name, 64)
    assert u.in_channels == cfg.model.latent_channels + (cfg.model.concat_channels if cfg.model.conditioning_key
                                                         in ("concat", "hybrid") else 0)


def test_stage2_paper_numbers():
    c = load("ldm_f4")
    u = c.model.unet
    assert (u.model_channels, tuple(u.channel_mult), tuple(u.attention_resolutions), u.num_head_channels) == (
        224, (1, 2, 3, 4), (8, 4, 2), 32)
    assert (c.train.batch_size, c.train.base_lr, c.diffusion.linear_start, c.diffusion.linear_end) == (
        48, 2e-6, 0.0015, 0.0195)
    assert scaled_lr(c.train) == pytest.approx(9.6e-5)  # the paper's CelebA-HQ learning rate
    assert c.condition.type == "none" and c.model.conditioning_key is None

    c = load("ldm_kl8")
    u = c.model.unet
    assert (u.model_channels, tuple(u.channel_mult), tuple(u.attention_resolutions), u.num_heads) == (
        192, (1, 2, 2, 4, 4), (1, 2, 4, 8), 8)
    assert c.first_stage.scale_by_std and c.diffusion.loss_type == "l1"
    assert (c.train.batch_size, scaled_lr(c.train), c.diffusion.linear_end) == (96, 5e-5, 0.0155)

    c = load("cin_ldm_vq_f8")
    assert (c.model.conditioning_key, c.model.cond_stage, c.model.n_classes, c.model.context_dim) == (
        "crossattn", "class", 1001, 512)

    c = load("txt2img_kl8")
    u = c.model.unet
    assert (u.model_channels, tuple(u.channel_mult), tuple(u.attention_resolutions), u.num_heads) == (
        320, (1, 2, 4, 4), (4, 2, 1), 8)
    assert (c.model.context_dim, c.model.text_layers, c.model.text_max_len) == (1280, 32, 77)
    assert (c.first_stage.scale_factor, c.diffusion.linear_start, c.diffusion.linear_end) == (0.18215, 0.00085, 0.012)

    c = load("inpainting")
    assert c.model.unet.in_channels == 7 and c.condition.type == "inpaint" and c.diffusion.loss_type == "l1"
    c = load("sr_bsr")
    assert c.model.unet.in_channels == 6 and c.condition.sr_factor == 4 and c.diffusion.linear_end == 0.0155
    c = load("semantic")
    assert (c.model.concat_in_channels, c.model.concat_channels, c.model.concat_rescale_stages) == (182, 3, 2)


@pytest.mark.parametrize("name", DEMOS)
def test_demo_configs_load(name):
    c = load(name)
    assert c.data.name == "fashion_mnist" and c.data.resolution == 32
    if c.stage == "ldm":
        c.model.latent_channels = 4  # the demo autoencoder's
        _abstract_init_demo(c)


def _abstract_init_demo(cfg, latent_hw=(8, 8)):
    model = build_latent_diffusion(cfg.model, 4)
    cond = {}
    if cfg.condition.type == "class":
        cond["label"] = jnp.zeros((1,), jnp.int32)
    if cfg.condition.type == "text":
        cfg.model.vocab_size = cfg.model.vocab_size or 64  # set from the trained tokenizer at run time
        model = build_latent_diffusion(cfg.model, 4)
        cond["tokens"] = jnp.zeros((1, cfg.model.text_max_len), jnp.int32)
    if cfg.model.conditioning_key == "concat":
        cond["concat"] = jnp.zeros((1, *latent_hw, cfg.model.concat_channels))
    x = jnp.zeros((1, *latent_hw, 4))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, jnp.zeros((1,), jnp.int32), cond))
    assert n_params(shapes["params"]) < 3e6  # sized for the 2-core CPU
