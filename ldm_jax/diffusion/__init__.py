"""Pure-function diffusion core: noise schedules, Gaussian diffusion maths, samplers."""

from ldm_jax.diffusion.gaussian import (
    LOSS_TYPES,
    PARAMETERIZATIONS,
    diffusion_loss,
    eps_from_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    q_posterior,
    q_sample,
    target_for,
    to_x0_eps,
    v_from_x0_eps,
    x0_from_v,
)
from ldm_jax.diffusion.samplers import (
    SAMPLERS,
    classifier_free_guidance,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    get_sampler,
    plms_sample,
)
from ldm_jax.diffusion.schedules import SCHEDULE_KINDS, DiffusionSchedule, extract, make_beta_schedule

__all__ = [
    "LOSS_TYPES", "PARAMETERIZATIONS", "SAMPLERS", "SCHEDULE_KINDS", "DiffusionSchedule",
    "classifier_free_guidance", "ddim_sample", "ddim_timesteps", "ddpm_sample", "diffusion_loss",
    "eps_from_v", "extract", "get_sampler", "make_beta_schedule", "plms_sample", "predict_eps_from_x0",
    "predict_x0_from_eps", "q_posterior", "q_sample", "target_for", "to_x0_eps", "v_from_x0_eps", "x0_from_v",
]
