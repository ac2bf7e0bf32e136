"""Stage-1 training: autoencoder (KL or VQ) + PatchGAN discriminator, one jitted step updating both.

The step before `loss.disc_start` and the step after are two compiled programs (the static `use_disc` flag):
before the start the reference multiplies every adversarial term by 0, so skipping them is exact and cheaper.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ldm_jax.data.transforms import as_float
from ldm_jax.losses import autoencoder as ae_losses
from ldm_jax.losses import gan
from ldm_jax.losses.perceptual import make_lpips_fn
from ldm_jax.models.autoencoder import build_autoencoder
from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.training.common import all_finite, guarded_update, scaled_lr


@flax.struct.dataclass
class AEState:
    step: jax.Array
    params: dict  # {"model": autoencoder params, "logvar": learned scalar (KL loss)}
    model_state: dict  # mutable collections of the autoencoder (e.g. the EMA codebook "vq_ema")
    opt_state: Any
    disc_params: dict
    disc_state: dict  # {"batch_stats": ...}
    disc_opt_state: Any
    skipped: jax.Array  # number of updates skipped because of non-finite values


def build_models(config: ml_collections.ConfigDict):
    """The autoencoder, the discriminator and their two Adam optimizers (betas 0.5, 0.9, as the reference)."""
    if config.train.grad_accum != 1:  # scaled_lr would scale the rate for an accumulation not done
        raise ValueError(f"train.grad_accum={config.train.grad_accum}: stage 1 has no gradient accumulation "
                         "(raise train.batch_size or add devices)")
    model = build_autoencoder(config.model)
    lc = config.loss
    disc = NLayerDiscriminator(ndf=lc.disc_ndf, n_layers=lc.disc_n_layers, norm=lc.disc_norm)
    lr = scaled_lr(config.train)
    tx_g = optax.adam(lr, b1=0.5, b2=0.9)
    tx_d = optax.adam(lr * lc.disc_lr_mult, b1=0.5, b2=0.9)
    return model, disc, tx_g, tx_d


def init_state(config, model, disc, tx_g, tx_d, key: jax.Array, image_shape: tuple[int, ...]) -> AEState:
    k_model, k_disc = jax.random.split(key)
    x = jnp.zeros((1, *image_shape), jnp.float32)
    variables = model.init({"params": k_model}, x)
    model_params = variables.pop("params")
    params = {"model": model_params, "logvar": jnp.asarray(config.loss.logvar_init, jnp.float32)}
    dvars = disc.init(k_disc, x, train=False)
    return AEState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=dict(variables),
        opt_state=tx_g.init(params),
        disc_params=dvars["params"],
        disc_state={"batch_stats": dvars.get("batch_stats", {})},
        disc_opt_state=tx_d.init(dvars["params"]),
        skipped=jnp.zeros((), jnp.int32),
    )


def make_train_step(config, model, disc, tx_g, tx_d, use_disc: bool):
    """Returns step(state, batch, lpips_params) -> (state, metrics). Pure; jit/shard it outside."""
    lc = config.loss
    is_kl = config.model.type == "kl"
    base_key = jax.random.key(config.seed)
    d_loss_fn = gan.d_loss_fn(lc.disc_loss)
    mutable = list(config_model_collections(model))

    def step(state: AEState, batch: dict, lpips_params: Any) -> tuple[AEState, dict]:
        x = as_float(batch["image"])  # uint8 from the pipeline: converted here, on the device
        key = jax.random.fold_in(base_key, state.step)
        k_post, k_vq, k_drop = jax.random.split(key, 3)
        lpips_fn = None
        if lc.perceptual_weight > 0:
            lpips_fn = make_lpips_fn(lpips_params)
        disc_factor = gan.adopt_weight(lc.disc_factor, state.step, lc.disc_start)

        def disc_logits(dparams, dstate, images):
            logits, new = disc.apply({"params": dparams, **dstate}, images, train=True, mutable=["batch_stats"])
            return logits, dict(new)

        def g_loss_fn(params):
            out, new_model_state = model.apply(
                {"params": params["model"], **state.model_state}, x, key=k_post if is_kl else None, train=True,
                mutable=mutable, rngs={"vq": k_vq, "dropout": k_drop},
            )
            rec = out["rec"]

            def nll_of(r):
                rl = ae_losses.reconstruction_loss(x, r, lpips_fn, lc.perceptual_weight)
                return ae_losses.kl_nll(rl, params["logvar"]) if is_kl else ae_losses.vq_nll(rl)

            nll = nll_of(rec)
            m = {"nll_loss": nll, "rec_l1": jnp.mean(jnp.abs(x - rec))}
            if is_kl:
                kl = jnp.mean(out["posterior"].kl())
                loss = nll + lc.kl_weight * kl
                m.update(kl_loss=kl, logvar=params["logvar"])
            else:
                loss = nll + lc.codebook_weight * out["qloss"]
                m.update(q_loss=out["qloss"], perplexity=out["perplexity"], codebook_usage=out["codebook_usage"])
            if use_disc:
                logits_fake, _ = disc_logits(state.disc_params, state.disc_state, rec)
                g_loss = gan.generator_adv_loss(logits_fake)

                def g_of(r):
                    return gan.generator_adv_loss(disc_logits(state.disc_params, state.disc_state, r)[0])

                d_weight = ae_losses.adaptive_weight_from_outputs(
                    nll_of, g_of, rec, out["features"], params["model"]["decoder"]["conv_out"], lc.disc_weight
                )
                loss = loss + d_weight * disc_factor * g_loss
                m.update(g_loss=g_loss, d_weight=d_weight)
            return loss, (m, rec, new_model_state)

        (loss, (metrics, rec, new_model_state)), grads = jax.value_and_grad(g_loss_fn, has_aux=True)(state.params)
        finite = all_finite(loss, grads)
        params, opt_state = guarded_update(tx_g, grads, state.opt_state, state.params, finite)
        model_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), dict(new_model_state), state.model_state)
        metrics["loss"] = loss

        disc_params, disc_state, disc_opt_state = state.disc_params, state.disc_state, state.disc_opt_state
        if use_disc:
            fake = jax.lax.stop_gradient(rec)

            def d_loss_of(dparams):
                real_logits, st = disc_logits(dparams, state.disc_state, x)
                fake_logits, st = disc_logits(dparams, st, fake)
                d_loss = disc_factor * d_loss_fn(real_logits, fake_logits)
                return d_loss, (st, jnp.mean(real_logits), jnp.mean(fake_logits))

            (d_loss, (new_dstate, lr_, lf_)), dgrads = jax.value_and_grad(d_loss_of, has_aux=True)(disc_params)
            d_finite = all_finite(d_loss, dgrads)
            disc_params, disc_opt_state = guarded_update(tx_d, dgrads, disc_opt_state, disc_params, d_finite)
            disc_state = jax.tree.map(lambda n, o: jnp.where(d_finite, n, o), new_dstate, disc_state)
            finite = finite & d_finite
            metrics.update(d_loss=d_loss, logits_real=lr_, logits_fake=lf_)

        new_state = state.replace(
            step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state,
            disc_params=disc_params, disc_state=disc_state, disc_opt_state=disc_opt_state,
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        metrics["finite"] = finite.astype(jnp.float32)
        return new_state, metrics

    return step


def config_model_collections(model) -> tuple[str, ...]:
    """Mutable collections the autoencoder updates in training (the EMA codebook of a VQ model)."""
    return ("vq_ema",) if getattr(model, "ema_decay", None) is not None else ()


def make_eval_step(config, model):
    """Returns eval(params, model_state, images, lpips_params) -> per-image metrics + reconstructions."""
    from ldm_jax.evaluation.image_metrics import psnr, ssim

    is_vq = config.model.type == "vq"

    def evaluate(params, model_state, x, lpips_params):
        out = model.apply({"params": params["model"], **model_state}, x, train=False)
        rec = jnp.clip(out["rec"], -1.0, 1.0)
        res = {"psnr": psnr(x, rec), "ssim": ssim(x, rec), "rec": rec}
        if lpips_params is not None:
            res["lpips"] = make_lpips_fn(lpips_params)(x, rec)
        if is_vq:
            res["code_counts"] = jnp.bincount(out["indices"].reshape(-1), length=config.model.n_embed)
        return res

    return evaluate


def summarize_eval(batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Mean per-image metrics; codebook usage / perplexity over the whole evaluation set."""
    out = {}
    for k in ("psnr", "ssim", "lpips"):
        if k in batches[0]:
            out[k] = float(np.mean(np.concatenate([b[k] for b in batches])))
    if "code_counts" in batches[0]:
        counts = np.sum([b["code_counts"] for b in batches], axis=0).astype(np.float64)
        p = counts / counts.sum()
        out["codebook_usage"] = float(np.mean(counts > 0))
        out["perplexity"] = float(np.exp(-np.sum(p * np.log(p + 1e-10))))
    return out
