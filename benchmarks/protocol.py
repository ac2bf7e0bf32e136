"""Orchestrator <-> worker protocol: one JSON object per line (standard library only).

A worker reads requests on stdin and answers on the stdout it was started with; everything a library prints
to stdout inside the worker is diverted to stderr (the worker's log), so it cannot corrupt the protocol.
Requests: {"op": "setup"|"run"|"teardown"|"matmul"|"peak"|"reset_peak"|"call"|"quit", ...}.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import traceback
from typing import Any, Protocol


class Side(Protocol):
    """What a worker implements (ours.py, torch_peer.py, flax_peer.py)."""

    def info(self) -> dict[str, Any]: ...
    def setup(self, case: dict[str, Any]) -> dict[str, Any]: ...
    def run(self, name: str) -> None: ...
    def teardown(self, name: str) -> dict[str, Any] | None: ...
    def matmul(self, n: int, reps: int) -> float: ...


def peak_rss_gib() -> float:
    """This process's peak resident set (VmHWM) since the last reset_peak_rss(), GiB (Linux; -1 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 2**20
    except (OSError, AttributeError):
        return -1.0


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: writing 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def serve(side_factory) -> None:
    """Worker main loop: build the side (reporting import errors as 'absent'), then answer requests."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints go to the log, not into the protocol stream
    sys.stdout = sys.stderr

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    try:
        side = side_factory()
        reply({"ok": True, "info": side.info()})
    except Exception as e:  # a missing or broken peer is reported, never faked
        traceback.print_exc()
        reply({"ok": False, "error": f"{type(e).__name__}: {e}"[:500]})
        return
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "quit":
                reply({"ok": True})
                return
            if op == "setup":
                reset_peak_rss()
                t0 = time.perf_counter()
                res = side.setup(req["case"])
                res["setup_s"] = time.perf_counter() - t0
                reply({"ok": True, **res})
            elif op == "run":
                t0, c0 = time.perf_counter(), time.process_time()
                side.run(req["name"])
                reply({"ok": True, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0})
            elif op == "teardown":
                reply({"ok": True, **(side.teardown(req["name"]) or {})})
            elif op == "matmul":
                reply({"ok": True, "gflops": side.matmul(req["n"], req["reps"])})
            elif op == "peak":
                reply({"ok": True, "peak_rss_gib": peak_rss_gib()})
            elif op == "reset_peak":
                reset_peak_rss()
                reply({"ok": True})
            elif op == "call":  # side-specific extras (weight export / check)
                reply({"ok": True, **getattr(side, req["method"])(**req.get("kwargs", {}))})
            else:
                reply({"ok": False, "error": f"unknown op {op!r}"})
        except Exception as e:
            traceback.print_exc()
            reply({"ok": False, "error": f"{type(e).__name__}: {e}"[:500]})


class Worker:
    """Client end: a worker subprocess (its stderr goes to `log_path`)."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: str, cwd: str | None = None):
        self.name, self.log_path = name, log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     env=env, cwd=cwd, text=True, bufsize=1)
        self.alive = True
        hello = self._read()
        self.ok = bool(hello.get("ok"))
        self.info = hello.get("info", {})
        self.error = hello.get("error")
        if not self.ok:
            self.close()

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            self.alive = False
            return {"ok": False, "error": f"worker exited (code {self.proc.poll()}); log tail: {self.log_tail()}"}
        return json.loads(line)

    def log_tail(self, n: int = 300) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()[-n:].replace("\n", " | ")
        except OSError:
            return ""

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        """Send one request, wait for its answer ({"ok": False, "error": ...} if the worker died)."""
        if not self.alive:
            return {"ok": False, "error": "worker not running"}
        try:
            self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.alive = False
            return {"ok": False, "error": f"worker died; log tail: {self.log_tail()}"}
        return self._read()

    def close(self) -> None:
        if self.alive and self.proc.poll() is None:
            try:
                self.call("quit")
            except Exception:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.alive = False
        self.log.close()


def train_donation(backend: str, argnums: tuple[int, ...] = (0, 1)) -> tuple[int, ...]:
    """donate_argnums for both JAX sides' benchmark train step (params, optimizer state): none on CPU.

    On XLA:CPU donation made this step slower for both sides: an in-place update of a parameter that the forward
    and backward also read makes copy insertion copy every parameter first (257 copies, 90 MB for the bench
    UNet). Not donating: ours 1.02-1.10x, Flax 1.05x faster per round (docs/benchmarks.md item 35). On
    accelerators donation bounds peak memory, so it stays. (ldm_jax's trainer keeps donating: with its
    lax.cond-guarded update its step measured 4-5% faster donated, item 35.)
    """
    return () if backend == "cpu" else tuple(argnums)


def xla_gflop(*stages: Any) -> float | None:
    """GFLOP by XLA's cost analysis of the first stage (jax Lowered/Compiled) that has one. Pass the lowered
    (pre-optimisation) module first: its count is the same on every backend, while a GPU executable's misses
    cuDNN convolutions."""
    for st in stages:
        try:
            cost = st.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            if cost and cost.get("flops"):
                return float(cost["flops"]) / 1e9
        except Exception:
            continue
    return None
