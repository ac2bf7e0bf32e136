"""Train a stage-1 autoencoder or a stage-2 latent diffusion model, as the config's `stage` says.

python train.py --config configs/demo_autoencoder.py --workdir runs/ae [--config.train.num_steps=100]
"""

from ldm_jax.xla_flags import set_default_xla_flags

set_default_xla_flags()  # before anything imports jax

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, grids and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    config = _CONFIG.value
    logging.set_verbosity(logging.INFO)
    # Orbax logs every file it writes at INFO: keep its warnings, drop the chatter.
    logging.get_absl_handler().addFilter(lambda r: "orbax" not in r.pathname or r.levelno >= 30)
    if config.stage == "autoencoder":
        from ldm_jax.training.train_autoencoder import train_and_evaluate
    elif config.stage == "ldm":
        from ldm_jax.training.train_ldm import train_and_evaluate
    else:
        raise ValueError(f"config.stage must be 'autoencoder' or 'ldm', got {config.stage!r}")
    train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
