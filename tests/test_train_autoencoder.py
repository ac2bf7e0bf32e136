"""The full stage-1 objective (L1 + LPIPS + KL/VQ + PatchGAN with adaptive weight) trains: losses fall."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.config_defaults import autoencoder_config
from ldm_jax.data.pipeline import make_dataset
from ldm_jax.models.lpips_weights import load_lpips_params
from ldm_jax.training import autoencoder as ae


def tiny_config(type_):
    c = autoencoder_config(type_)
    c.model.update(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=16, in_channels=3,
                   embed_dim=3, z_channels=3, norm_groups=8, mid_attn=False)
    if type_ == "vq":
        c.model.n_embed = 64
    c.loss.update(perceptual_weight=1.0, disc_start=0, disc_n_layers=1, disc_ndf=16)
    c.data.update(name="photos", resolution=16, channels=3, preprocess="random_crop", num_crops=64)
    c.train.update(batch_size=8, base_lr=1e-4)
    return c


@pytest.mark.parametrize("type_", ["kl", "vq"])
def test_full_objective_lowers_reconstruction_loss(type_):
    c = tiny_config(type_)
    model, disc, tx_g, tx_d = ae.build_models(c)
    state = ae.init_state(c, model, disc, tx_g, tx_d, jax.random.key(0), (16, 16, 3))
    step = jax.jit(ae.make_train_step(c, model, disc, tx_g, tx_d, use_disc=True))
    lpips = load_lpips_params()
    batch = {"image": jnp.asarray(make_dataset(c.data, "train", 8, 0).batch_at(0)["image"])}
    first = None
    for _ in range(25):
        state, m = step(state, batch, lpips)
        first = first or {k: float(v) for k, v in m.items()}
    last = {k: float(v) for k, v in m.items()}
    assert last["finite"] == 1.0 and int(state.skipped) == 0
    assert last["rec_l1"] < 0.8 * first["rec_l1"]
    assert last["nll_loss"] < first["nll_loss"]
    assert 0.0 <= last["d_weight"] <= 1e4 * c.loss.disc_weight
    # The discriminator and (VQ) codebook are really trained.
    assert np.isfinite(last["d_loss"]) and last["logits_real"] != first["logits_real"]
    if type_ == "vq":
        assert last["codebook_usage"] > 0
