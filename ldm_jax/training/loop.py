"""The one train-loop skeleton both stages run: lock → restore or init → compile → steps (log, hooks, checkpoints,
preemption) → teardown. Each stage's train_and_evaluate builds its models and step and hands them to `Run`.

The loop never waits for the device inside a step: the non-finite guard's flags stay on the device until a log or
checkpoint step reads them (the stop after `train.max_nonfinite_steps` consecutive skips keeps its semantics, checked
there); a multi-process preemption agreement runs every `train.preemption_sync_every` steps; the next batch is
assembled (by the data prefetch thread) and placed on the devices while the current step runs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from ldm_jax.checkpoint import Checkpointer
from ldm_jax.training import common
from ldm_jax.training import mesh as mesh_lib
from ldm_jax.training.validate import check_resume
from ldm_jax.training.workdir_lock import WorkdirLock
from ldm_jax.workdir import save_config


@dataclasses.dataclass
class LoopResult:
    state: Any
    preempted: bool
    last_metrics: dict[str, float]  # means over the last logged window
    skipped_total: int
    loop_s: float = 0.0  # wall time of the steps run, to the final step's completion (final checkpoint excluded)
    loop_steps: int = 0

    @property
    def steps_per_s(self) -> float:
        return self.loop_steps / self.loop_s if self.loop_s > 0 else float("nan")


class Run:
    """Everything a train run holds for its lifetime (use as a context manager): the workdir lock, mesh,
    checkpointer, metric writer and SIGTERM guard; released in every exit path, preemption included."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        common.maybe_initialize_distributed(config)
        self.config, self.workdir, self.tc = config, workdir, config.train
        self.mesh = mesh_lib.make_mesh(config.mesh)
        mesh_lib.check_batch_size(self.tc.batch_size, self.mesh)
        self._lock = WorkdirLock(workdir)
        self.ckpt: Checkpointer | None = None
        self.writer = None
        self.guard: common.PreemptionGuard | None = None

    def __enter__(self) -> Run:
        self._lock.acquire()
        tc = self.tc
        self.ckpt = Checkpointer(self.workdir, tc.max_to_keep, tc.keep_every, tc.async_checkpoint)
        return self

    def __exit__(self, *exc) -> None:
        if self.guard is not None:
            self.guard.restore()
        if self.writer is not None:
            self.writer.flush()
        if self.ckpt is not None:
            self.ckpt.close()
        self._lock.release()

    # --- state ---

    def restore_or_init(self, abstract: Any, init: Callable[[Any], Any], dataset: Any = None) -> Any:
        """The newest intact checkpoint restored into the state's shardings, else `init(state_shardings)`.
        A resume that changes the model, batch size, lr scaling or data set is refused in one line."""
        self.state_sh = mesh_lib.state_shardings(abstract, self.mesh, self.config.mesh.min_shard_size)
        step = self.ckpt.latest_step()
        if step is None:
            state = init(self.state_sh)
        else:
            target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                                  self.state_sh)
            state, meta = self.ckpt.restore_intact(target, check=lambda meta: check_resume(
                meta, self.config, self.ckpt.directory))
            if dataset is not None and "data" in meta and not self.config.train.allow_resume_changes:
                dataset.restore(meta["data"])  # refuses another seed, batch size or data set size
            logging.info("restored checkpoint at step %d", int(state.step))
        save_config(self.config, self.workdir)
        self.writer = common.make_writer(self.workdir)
        return state

    def compile(self, step_fn: Callable, state: Any, example_batch: dict, args: tuple, arg_shardings: tuple,
                name: str) -> Callable:
        rep = mesh_lib.replicated(self.mesh)
        compiled, report = common.compile_step(
            step_fn, (state, example_batch, *args),
            (self.state_sh, mesh_lib.batch_sharding(self.mesh), *arg_shardings), (self.state_sh, rep), name=name)
        self.writer.write_scalars(int(state.step), {f"compile/{k}": v for k, v in report.items()})
        return compiled

    # --- the loop ---

    def train(self, state: Any, batches: Iterator[dict], step_for: Callable[[int, Any], Callable], args: tuple = (),
              data_state: Callable[[int], dict] | None = None,
              hooks: tuple[Callable[[int, Any], None], ...] = ()) -> LoopResult:
        """Runs steps int(state.step) .. train.num_steps - 1. `batches` yields this process's host batch for each
        of those steps in order; `step_for(step, state)` is the compiled step (stage 1 switches at disc_start and
        compiles the second program then, from the live state: the initial one has been donated);
        `hooks(done, state)` run after every step (e.g. periodic grids); `data_state(done)` goes into the
        checkpoint's meta."""
        from clu import periodic_actions

        tc, mesh, ckpt = self.tc, self.mesh, self.ckpt
        progress = periodic_actions.ReportProgress(num_train_steps=tc.num_steps, writer=self.writer,
                                                   every_secs=30)
        self.guard = common.PreemptionGuard(tc.preemption_sync_every)
        nonfinite = common.NonFiniteTracker(tc.max_nonfinite_steps, on_abort=ckpt.wait)
        start = int(state.step)
        last_ckpt = ckpt.latest_step()
        pending: list[tuple[int, dict]] = []  # (step, on-device metrics) since the last log
        checked = 0  # how many of `pending` the non-finite guard has seen
        last_metrics: dict[str, float] = {}

        def check_finite() -> None:
            nonlocal checked
            flags = jax.device_get([m["finite"] for _, m in pending[checked:]])
            for (s, _), finite in zip(pending[checked:], flags, strict=True):
                nonfinite.update(not bool(finite), s, last_ckpt)
            checked = len(pending)

        next_batch = mesh_lib.global_batch(next(batches), mesh) if start < tc.num_steps else None
        t0 = time.perf_counter()
        loop_s, stop = 0.0, False
        for step in range(start, tc.num_steps):
            batch = next_batch
            state, metrics = step_for(step, state)(state, batch, *args)  # dispatched; runs while we go on
            done = step + 1
            if done < tc.num_steps:
                next_batch = mesh_lib.global_batch(next(batches), mesh)
            pending.append((step, metrics))
            progress(done)
            if done % tc.log_every == 0 or done == tc.num_steps:
                check_finite()
                host = jax.device_get([m for _, m in pending])
                last_metrics = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
                last_metrics["skipped_total"] = float(nonfinite.total)
                self.writer.write_scalars(done, {f"train/{k}": v for k, v in last_metrics.items()})
                pending, checked = [], 0
                loop_s = time.perf_counter() - t0  # the metrics read above waited for this step
            for hook in hooks:
                hook(done, state)
            stop = self.guard.should_stop(done)
            if done % tc.ckpt_every == 0 or done == tc.num_steps or stop:
                check_finite()
                meta = {"config": self.config.to_dict(), "data": data_state(done) if data_state else {"step": done}}
                ckpt.save(done, state, meta, force=True)
                last_ckpt = done if not nonfinite.consecutive else last_ckpt  # saved mid-streak: not 'good'
            if stop:
                break
        ckpt.wait()
        getattr(batches, "close", lambda: None)()  # host_batches: stops the prefetch thread or grain workers
        if stop:
            logging.info("preempted: checkpoint saved at step %d", done)
            return LoopResult(state, True, last_metrics, nonfinite.total)
        steps = tc.num_steps - start
        if steps:
            logging.info("train loop: %d steps in %.2f s (%.3g steps/s)", steps, loop_s, steps / max(loop_s, 1e-9))
        return LoopResult(state, False, last_metrics, nonfinite.total, loop_s, steps)

    def finish(self, state: Any, results: dict[str, Any]) -> dict[str, Any]:
        """Writes the run's results to metrics.json and TensorBoard (eval/...)."""
        self.writer.write_scalars(int(state.step), {f"eval/{k}": v for k, v in results.items()
                                                    if isinstance(v, (int, float))})
        common.write_json(os.path.join(self.workdir, "metrics.json"), results)
        return results


def host_batches(dataset: Any, start: int, to_inputs: Callable[[dict], dict] = lambda b: b) -> Iterator[dict]:
    """This process's inputs for steps start, start + 1, ... from a BatchIterator (its prefetch thread computes
    the next batches while the device runs)."""
    dataset.restore(dataset.state() | {"step": start})
    try:
        for batch in dataset:
            yield to_inputs(batch)
    finally:  # Run.train closes this generator: the prefetch thread or worker processes stop with the loop
        dataset.close()
