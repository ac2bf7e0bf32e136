"""Numerical parity with the PyTorch reference implementations, through ldm_jax.convert.

Randomly initialised diffusers / transformers modules (every parameter random, norms included) of tiny
configurations are converted to our params; outputs must agree to 1e-4 (float32) at two input sizes:
AutoencoderKL (posterior mean / logvar, decode), VQModel (latents, codes, decode), an SD-v1-layout
UNet2DConditionModel (cross-attention at the first two of three levels, 8 heads, context 48 instead of SD's 768,
2 res blocks per level) and CLIPTextModel (width 48, 2 layers, 77 tokens). The CompVis key names are checked
against diffusers' own CompVis -> diffusers converter, and the CLI round trip writes workdirs that load.
"""

import gzip
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need PyTorch (pip install torch==2.13.0)")
diffusers = pytest.importorskip("diffusers", reason="parity tests need diffusers (pip install diffusers)")
transformers = pytest.importorskip("transformers", reason="parity tests need transformers")

from flax.traverse_util import flatten_dict  # noqa: E402

from ldm_jax.convert import autoencoder as cae  # noqa: E402
from ldm_jax.convert import clip as cclip  # noqa: E402
from ldm_jax.convert import unet as cunet  # noqa: E402
from ldm_jax.convert.core import ConversionError, fill_params  # noqa: E402
from ldm_jax.data.clip_tokenizer import _bytes_to_unicode, vocab_from_bpe  # noqa: E402
from ldm_jax.models.autoencoder import build_autoencoder  # noqa: E402
from ldm_jax.models.clip import CLIPTextTransformer, clip_kwargs  # noqa: E402

TOL = 1e-4
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
CTX = 48  # context / CLIP width (SD v1: 768)
SPECIALS = ["hi</w>", "<|startoftext|>", "<|endoftext|>"]
VOCAB = 512 + len(SPECIALS)  # byte-level characters, their word-final forms, one merge, the two special tokens


def fast_jit(fn):
    """jax.jit compiled with cheap CPU options, once per input shape."""
    cache = {}

    def call(*args):
        key = str(jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), args))
        if key not in cache:
            cache[key] = jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)
        return cache[key](*args)

    return call


def randomize(module, seed):
    """Random values for every parameter: norms' weights ~ 1 ± 0.2 and biases ~ N(0, 0.1²), so that swapped or
    transposed tensors cannot pass; other weights keep their (random) default init."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + (0.2 if name.endswith("weight") else 0.1)
                        * torch.randn_like(p))
    return module.eval()


def state_of(module) -> dict:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def nhwc(t) -> np.ndarray:
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def max_diff(ours, ref) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64))))


@pytest.fixture(scope="module")
def kl():
    vae = randomize(diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32), 0)
    fields = cae.config_from_diffusers(dict(vae.config))
    fields.pop("scale_factor")
    params = cae.convert_autoencoder(state_of(vae), fields, "diffusers")
    model = build_autoencoder(cae.model_config(fields))
    enc = fast_jit(lambda p, x: (lambda post: (post.mean, post.logvar))(model.apply({"params": p}, x, method="encode")))
    dec = fast_jit(lambda p, z: model.apply({"params": p}, z, method="decode"))
    return vae, fields, params, enc, dec


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 3, 24, 40)])
def test_autoencoder_kl_matches_diffusers(kl, shape):
    vae, _, params, enc, dec = kl
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mean).sample
    mean, logvar = enc(params, jnp.asarray(nhwc(x)))
    assert max_diff(mean, nhwc(post.mean)) <= TOL
    assert max_diff(logvar, nhwc(post.logvar)) <= TOL
    assert max_diff(dec(params, jnp.asarray(nhwc(post.mean))), nhwc(rec)) <= TOL
    assert float(np.std(nhwc(rec))) > 0.1  # a non-trivial output


@pytest.fixture(scope="module")
def vq():
    model = randomize(diffusers.VQModel(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=3, num_vq_embeddings=32, vq_embed_dim=3,
        norm_num_groups=4), 2)
    with torch.no_grad():
        model.quantize.embedding.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(3))
    fields = cae.config_from_diffusers(dict(model.config))
    fields.pop("scale_factor")
    params = cae.convert_autoencoder(state_of(model), fields, "diffusers")
    ours = build_autoencoder(cae.model_config(fields))

    def run(p, x):
        h = ours.apply({"params": p}, x, method="encode")
        _, _, info = ours.apply({"params": p}, h, method=lambda m, h: m.quantize(h))
        return h, info["indices"], ours.apply({"params": p}, h, method="decode_latent")

    return model, params, fast_jit(run)


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 3, 12, 20)])
def test_vqmodel_matches_diffusers(vq, shape):
    model, params, run = vq
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        h = model.encode(x).latents
        _, _, (_, _, codes) = model.quantize(h)
        rec = model.decode(h).sample
    latents, ours_codes, ours_rec = run(params, jnp.asarray(nhwc(x)))
    assert max_diff(latents, nhwc(h)) <= TOL
    # Codes must agree exactly; guard against a near-tie that float noise could flip.
    d = np.sort(((nhwc(h).reshape(-1, 1, 3) - params["quantize"]["embedding"][None]) ** 2).sum(-1), axis=1)
    assert float(np.min(d[:, 1] - d[:, 0])) > 1e-4
    assert np.array_equal(np.asarray(ours_codes).reshape(-1), codes.numpy().reshape(-1))
    assert len(np.unique(codes.numpy())) > 3
    assert max_diff(ours_rec, nhwc(rec)) <= TOL


def sd_unet(seed: int, channels=(32, 64, 64), groups: int = 32):
    return randomize(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CTX,
        attention_head_dim=8, norm_num_groups=groups), seed)


@pytest.fixture(scope="module")
def unet():
    model = sd_unet(5)
    fields = cunet.config_from_diffusers(dict(model.config))
    assert fields["num_heads"] == 8 and fields["attention_resolutions"] == [1, 2]
    params = cunet.convert_unet(state_of(model), fields, "diffusers")
    ours = cunet.build_unet(fields)
    return model, fields, params, fast_jit(lambda p, x, t, c: ours.apply({"params": p}, x, t, c))


@pytest.mark.parametrize("shape,ctx_len", [((2, 4, 16, 16), 77), ((1, 4, 8, 24), 7)])
def test_sd_unet_matches_diffusers(unet, shape, ctx_len):
    model, _, params, run = unet
    g = torch.Generator().manual_seed(6)
    x, ctx = torch.randn(*shape, generator=g), torch.randn(shape[0], ctx_len, CTX, generator=g)
    t = torch.tensor([981, 3][: shape[0]])
    with torch.no_grad():
        ref = model(x, t, encoder_hidden_states=ctx).sample
    out = run(params, jnp.asarray(nhwc(x)), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()))
    assert max_diff(out, nhwc(ref)) <= TOL
    assert float(np.std(nhwc(ref))) > 0.1


@pytest.fixture(scope="module")
def clip():
    cfg = transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=CTX, intermediate_size=2 * CTX,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                      bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)
    model = randomize(transformers.CLIPTextModel(cfg), 7)
    fields = cclip.config_from_transformers(cfg.to_dict())
    params = cclip.convert_clip(state_of(model), fields)
    ours = CLIPTextTransformer(**clip_kwargs(fields))
    return model, fields, params, fast_jit(lambda p, ids: ours.apply({"params": p}, ids))


@pytest.mark.parametrize("shape", [(2, 77), (3, 9)])
def test_clip_text_encoder_matches_transformers(clip, shape):
    model, _, params, run = clip
    ids = torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = model(ids).last_hidden_state.numpy()
    assert max_diff(run(params, jnp.asarray(ids.numpy())), ref) <= TOL


def to_compvis(params: dict, rule, prefix: str) -> dict:
    """Our params -> a CompVis-layout state dict, using only the key NAMES our rules give (layouts inverted here:
    every 4-D kernel was an OIHW Conv2d, every 2-D one a Linear)."""
    out = {}
    for path, v in flatten_dict(params).items():
        key = rule(path).keys[0]
        if path[-1] == "kernel":
            v = np.transpose(v, (3, 2, 0, 1)) if v.ndim == 4 else v.T
        out[prefix + key] = torch.from_numpy(np.ascontiguousarray(v))
    return out


def test_compvis_names_agree_with_diffusers_converter(kl, unet):
    """Our CompVis names, read by diffusers' CompVis -> diffusers converter, give back the very diffusers tensors,
    and our CompVis path reads them back into the same params."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    vae, fields, params, _, _ = kl
    sd = to_compvis(params, cae.compvis_rule, "first_stage_model.")
    back = convert_ldm_vae_checkpoint(sd, dict(vae.config))
    # diffusers' converter only knows SD's VAE (attention in the middle block only): it passes our down/up-block
    # attention keys (taming's `down.{i}.attn.{j}.q` ...) through unconverted; the rest must match exactly.
    untouched = {k for k in back if ".attn." in k and ".mid." not in k}
    expected = {k: v for k, v in vae.state_dict().items() if not re.search(r"(down|up)_blocks\.\d+\.attentions", k)}
    assert untouched and len(untouched) == len(vae.state_dict()) - len(expected)
    assert set(back) - untouched == set(expected)
    for k, v in expected.items():
        np.testing.assert_array_equal(np.asarray(back[k]).reshape(v.shape), v.numpy(), err_msg=k)
    plain = {k[len("first_stage_model."):]: v.numpy() for k, v in sd.items()}
    again = cae.convert_autoencoder(plain, fields, "compvis")
    jax.tree.map(np.testing.assert_array_equal, again, params)

    model, ufields, uparams, _ = unet
    sd = to_compvis(uparams, cunet.compvis_rule({}, True), "model.diffusion_model.")
    back = convert_ldm_unet_checkpoint(sd, dict(model.config))
    assert set(back) == set(model.state_dict())
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(np.asarray(back[k]), v.numpy(), err_msg=k)
    plain = {k[len("model.diffusion_model."):]: v.numpy() for k, v in sd.items()}
    inferred = cunet.config_from_compvis(plain, num_heads=8)
    assert {k: inferred[k] for k in ("channel_mult", "attention_resolutions", "num_res_blocks", "_context_dim")} == {
        "channel_mult": [1, 2, 2], "attention_resolutions": [1, 2], "num_res_blocks": 2, "_context_dim": CTX}
    jax.tree.map(np.testing.assert_array_equal, cunet.convert_unet(plain, inferred, "compvis"), uparams)


def test_openaimodel_legacy_qkv_attention():
    """openaimodel's AttentionBlock (QKVAttentionLegacy: q, k, v interleaved per head) against a numpy reference."""
    from ldm_jax.models.unet import AttentionBlock

    rng = np.random.default_rng(0)
    c, heads, n = 64, 4, 6
    w = {"norm.weight": 1 + 0.2 * rng.standard_normal(c), "norm.bias": 0.1 * rng.standard_normal(c),
         "qkv.weight": rng.standard_normal((3 * c, c, 1)) / 8, "qkv.bias": 0.1 * rng.standard_normal(3 * c),
         "proj_out.weight": rng.standard_normal((c, c, 1)) / 8, "proj_out.bias": 0.1 * rng.standard_normal(c)}
    x = rng.standard_normal((1, c, n))  # (B, C, T) as in openaimodel
    g = x.reshape(1, 32, -1)
    h = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)).reshape(x.shape)
    h = h * w["norm.weight"][:, None] + w["norm.bias"][:, None]
    qkv = (w["qkv.weight"][..., 0] @ h[0] + w["qkv.bias"][:, None]).reshape(heads, 3 * c // heads, n)
    q, k, v = np.split(qkv, 3, axis=1)  # legacy order: per head [q, k, v]
    a = np.einsum("hct,hcs->hts", q, k) / np.sqrt(c // heads)
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("hts,hcs->hct", a, v).reshape(c, n)
    ref = x[0] + w["proj_out.weight"][..., 0] @ o + w["proj_out.bias"][:, None]

    block = AttentionBlock(c, heads)
    abstract = jax.eval_shape(block.init, jax.random.key(0), jnp.zeros((1, 1, n, c)))["params"]
    rule = cunet.compvis_rule({"middle_block.1": heads}, True)
    params = fill_params("attn", abstract, {"middle_block.1." + k: v for k, v in w.items()},
                               lambda p: rule(("middle_block_1",) + p))
    out = block.apply({"params": params}, jnp.asarray(x[0].T[None, None]))
    assert max_diff(np.asarray(out)[0, 0].T, ref) <= TOL


def write_tokenizer(folder: str) -> None:
    """A tiny CLIP BPE tokenizer in diffusers' layout (vocab.json + merges.txt)."""
    os.makedirs(folder, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [ch + "</w>" for ch in chars] + SPECIALS
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({w: i for i, w in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\nh i</w>\n")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory, kl, unet, clip):
    """A diffusers Stable-Diffusion-layout folder of the random modules above."""
    root = str(tmp_path_factory.mktemp("sd_tiny"))
    kl[0].save_pretrained(os.path.join(root, "vae"))
    unet[0].save_pretrained(os.path.join(root, "unet"))
    clip[0].save_pretrained(os.path.join(root, "text_encoder"))
    write_tokenizer(os.path.join(root, "tokenizer"))
    diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").save_pretrained(
        os.path.join(root, "scheduler"))
    index = {"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"],
             "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
             "safety_checker": [None, None]}
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump(index, f)
    return root


def test_cli_round_trip_loads_and_matches(sd_folder, tmp_path, kl, unet, clip):
    """Folder -> CLI -> workdirs -> LoadedLDM (what sample.py uses): same architecture, same weights, and its
    tokenizer + CLIP + UNet chain reproduces diffusers' text_encoder -> unet."""
    from ldm_jax.convert.__main__ import main
    from ldm_jax.inference import LoadedLDM

    out = str(tmp_path / "converted")
    assert main([sd_folder, "--out", out]) == 0
    ldm = LoadedLDM.load(os.path.join(out, "ldm"))
    assert ldm.config.condition.tokenizer == "clip" and ldm.scale_factor == pytest.approx(0.18215)
    assert ldm.config.diffusion.linear_start == pytest.approx(0.00085) and ldm.resolution == 32
    want = {k: (tuple(v) if isinstance(v, list) else v) for k, v in unet[1].items() if not k.startswith("_")}
    assert {k: ldm.model.unet_kwargs[k] for k in want} == want and ldm.model.clip == clip_kwargs(clip[1])
    jax.tree.map(np.testing.assert_array_equal, ldm.params, {"unet": unet[2], "cond_encoder": clip[2]})
    jax.tree.map(np.testing.assert_array_equal, ldm.first_stage.variables["params"], kl[2])
    tokens = ldm.tokens(["hi", ""])
    assert tokens.shape == (2, 77)
    np.testing.assert_array_equal(tokens[:, :4], [[VOCAB - 2, VOCAB - 3, VOCAB - 1, VOCAB - 1],
                                                  [VOCAB - 2, VOCAB - 1, VOCAB - 1, VOCAB - 1]])
    g = torch.Generator().manual_seed(9)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([500, 20])
    with torch.no_grad():
        ref = unet[0](x, t, encoder_hidden_states=clip[0](torch.from_numpy(tokens.astype(np.int64)))[0]).sample
    ctx = clip[3](ldm.params["cond_encoder"], jnp.asarray(tokens))  # the compiled functions of the tests above
    eps = unet[3](ldm.params["unet"], jnp.asarray(nhwc(x)), jnp.asarray(t.numpy()), ctx)
    assert max_diff(eps, nhwc(ref)) <= TOL
    assert main([sd_folder, "--out", out]) == 2  # refuses to overwrite


def test_truncated_checkpoint_names_missing_keys(sd_folder, tmp_path, capsys):
    import shutil

    from safetensors.numpy import load_file, save_file

    from ldm_jax.convert.__main__ import main
    from ldm_jax.convert.sources import from_diffusers

    broken = str(tmp_path / "broken")
    shutil.copytree(sd_folder, broken)
    path = os.path.join(broken, "unet", "diffusion_pytorch_model.safetensors")
    state = load_file(path)
    gone = sorted(k for k in state if k.startswith("mid_block.attentions.0.transformer_blocks.0.attn2."))
    save_file({k: v for k, v in state.items() if k not in gone} | {"stray.weight": np.zeros(2, np.float32)}, path)
    with pytest.raises(ConversionError) as err:
        from_diffusers(broken)
    lines = str(err.value).splitlines()
    assert lines[0].startswith("unet: conversion incomplete") and "missing source keys" in lines[0]
    assert all(any(k in line for line in lines[1:]) for k in gone) and any("stray.weight" in x for x in lines[1:])
    assert main([broken, "--out", str(tmp_path / "o")]) == 2
    assert "missing source keys" in capsys.readouterr().err


def test_compvis_single_file(tmp_path, clip):
    """An SD-v1-style .ckpt (first stage, UNet + EMA copy, CLIP, schedule buffers) converts completely: EMA weights
    by default, SD's 8 heads and 0.18215 scale assumed, schedule read from `betas`; a stray key is refused."""
    from ldm_jax.convert.sources import from_compvis
    from ldm_jax.diffusion.schedules import make_beta_schedule

    vae = randomize(diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1,
                                            down_block_types=("DownEncoderBlock2D",) * 2,
                                            up_block_types=("UpDecoderBlock2D",) * 2), 10)
    fields = cae.config_from_diffusers(dict(vae.config))
    fields.pop("scale_factor")
    ae_params = cae.convert_autoencoder(state_of(vae), fields, "diffusers")
    un = sd_unet(11)
    ufields = cunet.config_from_diffusers(dict(un.config))
    uparams = cunet.convert_unet(state_of(un), ufields, "diffusers")
    sd = to_compvis(ae_params, cae.compvis_rule, "first_stage_model.")
    unet_sd = to_compvis(uparams, cunet.compvis_rule({}, True), "model.diffusion_model.")
    sd.update(unet_sd)
    sd.update({"model_ema." + k[len("model."):].replace(".", ""): 0.5 * v for k, v in unet_sd.items()})
    sd.update({f"cond_stage_model.transformer.text_model.{k}": v for k, v in clip[0].state_dict().items()})
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    betas = make_beta_schedule("linear", 1000, 0.00085, 0.012)
    sd.update(betas=torch.from_numpy(betas), alphas_cumprod=torch.from_numpy(np.cumprod(1 - betas)),
              **{"model_ema.num_updates": torch.tensor(3)})
    path = str(tmp_path / "sd.ckpt")
    torch.save({"state_dict": sd, "global_step": 7}, path)
    tok = str(tmp_path / "tok")
    write_tokenizer(tok)
    conv = from_compvis(path, tokenizer=tok)
    assert conv.step == 7 and conv.ldm.scale_factor == 0.18215 and conv.ldm.unet["num_heads"] == 8
    assert conv.ldm.diffusion["schedule"] == "linear" and conv.ldm.diffusion["linear_end"] == pytest.approx(0.012)
    jax.tree.map(np.testing.assert_array_equal, conv.ae_params, ae_params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, 0.5 * b, rtol=1e-6), conv.ldm.params["unet"], uparams)
    jax.tree.map(np.testing.assert_array_equal, conv.ldm.params["cond_encoder"], clip[2])
    assert any("non-EMA" in reason for reason in conv.report.ignored)
    torch.save({"state_dict": {**sd, "model.stray": torch.zeros(1)}}, path)
    with pytest.raises(ConversionError, match="model.stray"):
        from_compvis(path, tokenizer=tok)
    import argparse

    from ldm_jax.convert.core import load_state_dict

    torch.save({"state_dict": {"w": torch.zeros(1)}, "callback": argparse.Namespace(a=1)}, path)
    with pytest.raises(ValueError, match="not loaded for safety"):  # weights_only: no arbitrary unpickling
        load_state_dict(path)


def test_clip_vocabulary_from_bpe_file(tmp_path):
    """open_clip's construction: bytes, their word-final forms, the merges, then the two special tokens."""
    path = str(tmp_path / "bpe.txt.gz")
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\nh i</w>\nt h\nth e</w>\n")
    vocab, merges = vocab_from_bpe(path, n_merges=3)
    assert merges == [("h", "i</w>"), ("t", "h"), ("th", "e</w>")]
    assert [vocab[w] for w in ("hi</w>", "th", "the</w>", "<|startoftext|>", "<|endoftext|>")] == [512, 513, 514,
                                                                                                       515, 516]
    from ldm_jax.data.clip_tokenizer import default_bpe_path, load_clip_tokenizer

    tok = load_clip_tokenizer(path)
    assert tok("the hi")["input_ids"] == [515, 514, 512, 516]
    real = default_bpe_path()
    if real is not None:  # the open-clip-torch wheel: SD v1's tokenizer ids
        assert load_clip_tokenizer(real)("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
