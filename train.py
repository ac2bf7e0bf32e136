"""Train a stage-1 autoencoder or a stage-2 latent diffusion model, as the config's `stage` says.

python train.py --config configs/demo_autoencoder.py --workdir runs/ae [--config.train.num_steps=100]

A user error (bad config file or field, bad data path, a workdir in use or unusable) is one line on stderr and
exit status 2, before anything compiles; --verbose or LDM_JAX_DEBUG=1 shows its traceback. Internal errors keep
theirs.
"""

import os
import socket
import sys

from ldm_jax.xla_flags import set_default_xla_flags

set_default_xla_flags()  # before anything imports jax

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, grids and metrics.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of user errors too.")
flags.mark_flags_as_required(["config", "workdir"])


def _debug() -> bool:
    if os.environ.get("LDM_JAX_DEBUG", "") not in ("", "0"):
        return True
    # Before (or when) parsing fails, the flag's value is not known: look for it on the command line.
    return _VERBOSE.value if flags.FLAGS.is_parsed() else "--verbose" in sys.argv


def _fail(message: str) -> None:
    print(f"train.py: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a bad --config file or override reported in one line."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - flags.Error, and whatever a config file or override raises
        if _debug():
            raise
        cause = e.__cause__ or e.__context__ or e
        text = str(cause).strip("'\"").replace("\\n", " ").replace("\\'", "'")
        _fail(text if text else str(e))


def _user_errors() -> tuple[type[BaseException], ...]:
    from ldm_jax.training.workdir_lock import WorkdirLockedError

    return (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError,
            WorkdirLockedError)


def main(argv):
    del argv
    try:
        config = _CONFIG.value  # a lazy proxy: touching a field loads the file
        stage = config.stage
    except Exception as e:  # noqa: BLE001 - whatever a missing or broken config file raises
        if _debug():
            raise
        path = flags.FLAGS["config"].config_filename
        if not os.path.isfile(path.split(":")[0]):
            _fail(f"--config {path}: no such file")
        if path.split(":")[0].endswith(".json"):
            _fail(f"--config {path}: a workdir's config.json is a record, not a config file; to fine-tune that "
                  "workdir: --config configs/finetune_sd.py --config.init_from=DIR (docs/pretrained.md)")
        _fail(f"--config {path}: {type(e).__name__}: {str(e).splitlines()[-1].strip()}")
    logging.set_verbosity(logging.INFO)
    # Orbax logs every file it writes at INFO: keep its warnings, drop the chatter.
    logging.get_absl_handler().addFilter(lambda r: "orbax" not in r.pathname or r.levelno >= 30)
    workdir = _WORKDIR.value
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        _fail(f"--workdir {workdir} exists and is not a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
        # Per process: the processes of a multi-host run probe one shared workdir at the same time.
        probe = os.path.join(workdir, f".write_test.{socket.gethostname()}.{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        _fail(f"--workdir {workdir} is not writable ({e.strerror})")
    if stage == "autoencoder":
        from ldm_jax.training.train_autoencoder import train_and_evaluate
    elif stage == "ldm":
        from ldm_jax.training.train_ldm import train_and_evaluate
    else:
        _fail(f"config.stage must be 'autoencoder' or 'ldm', got {stage!r}")
    try:
        train_and_evaluate(config, workdir)
    except _user_errors() as e:
        if _debug() or len(str(e).splitlines()) > 1:  # multi-line messages come from deep inside: keep those
            raise
        _fail(str(e))


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
