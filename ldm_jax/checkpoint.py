"""Orbax checkpoints: the train state (sharded arrays) plus a JSON `meta` item (config, data position, extras).

Orbax writes each step into a temporary directory and renames it when complete, so a checkpoint half-written when
the process died is never listed as valid; restores re-shard onto the target shardings (8 → 4 → 1 devices).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

STATE_ITEM = "state"


def _item_metadata_noise(record: logging.LogRecord) -> bool:
    """Drops Orbax's "Metadata file does not exist: …/state/_CHECKPOINT_METADATA": reading the `state` item on its
    own (restore_raw, workdir.restore_ema) looks for that file in the item folder, where a CheckpointManager never
    writes it (it lives one level up, in the step folder, and is read there). Other missing-metadata warnings stay."""
    if not str(record.msg).startswith("Metadata file does not exist"):
        return True
    path = str(record.args[0]) if record.args else ""
    return os.path.basename(os.path.dirname(path)) != STATE_ITEM


logging.getLogger("absl").addFilter(_item_metadata_noise)


class Checkpointer:
    """Saves/restores `state` + `meta` under `WORKDIR/checkpoints/<step>` (async saves)."""

    def __init__(self, workdir: str, max_to_keep: int = 3, keep_every: int | None = None, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            keep_period=keep_every or None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any], force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        return self.manager.save(step, args=args, force=force)

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]] | None:
        """Restores onto `target` (an abstract or concrete state whose leaves carry the wanted shardings)."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        abstract = jax.tree.map(_as_abstract, target)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        return restored["state"], restored["meta"]

    def restore_intact(self, target: Any, check: Callable[[dict], None] | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores the newest checkpoint that reads back whole. When the newest fails to read (truncated array
        file, missing metadata) and an older one restores, the failed ones are moved aside to
        checkpoints.damaged/ with a warning naming their step. When none restores, nothing is moved (the fault
        may be this program's, not the files') and the newest one's error is raised. `check(meta)` (the resume
        compatibility check) raises through."""
        failed: list[tuple[int, Exception]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = self.restore_meta(step)
            except Exception as e:  # noqa: BLE001 - any read failure may mean "damaged"
                failed.append((step, e))
                continue
            if check is not None:
                check(meta)
            try:
                state, meta = self.restore(target, step)
            except Exception as e:  # noqa: BLE001
                failed.append((step, e))
                continue
            for bad, error in failed:
                self._set_aside(bad, error)
            return state, meta
        if failed:
            step, error = failed[0]
            raise ValueError(f"no checkpoint in {self.directory} can be restored; the newest (step {step}) "
                             f"fails with {type(error).__name__}: {_first_line(error)}") from error
        raise FileNotFoundError(f"no checkpoint in {self.directory}")

    def _set_aside(self, step: int, error: Exception) -> None:
        dest = os.path.join(self.directory + ".damaged", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        logging.warning("checkpoint at step %d is damaged (%s: %s); moved to %s, resuming from an older one", step,
                        type(error).__name__, _first_line(error), dest)
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"set_aside_{step}")
        self.manager.reload()


    def restore_meta(self, step: int | None = None) -> dict[str, Any] | None:
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_raw(self, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores without a target, every array whole on this process's first device, e.g. to load a frozen
        stage-1 model. Works whatever topology wrote the checkpoint (Orbax refuses a target-less restore of
        arrays saved on other devices, e.g. by a multi-host run)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        handler = ocp.StandardCheckpointHandler()
        tree = handler.metadata(epath.Path(self.directory) / str(step) / "state")
        handler.close()
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              getattr(tree, "tree", tree))
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        )
        return restored["state"], restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _as_abstract(x: Any) -> Any:
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else ""
