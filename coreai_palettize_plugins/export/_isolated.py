"""Run a step in a forked child process, so an abort inside native code (LLVM's
``LLVM ERROR: IO failure on output stream: No space left on device`` from coreai-torch) fails
that step with an error instead of killing the training process.

A fork, not a spawned interpreter: the child needs the live export copy of the model, and a
prepared model cannot be pickled (coreai-opt's parametrizations). Linux only (``os.fork`` with
``PR_SET_PDEATHSIG``, so the child never outlives a killed parent); elsewhere the step runs in
process.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["ChildProcessDied", "StepFailed", "describe", "isolation_available", "run_isolated"]


class ChildProcessDied(RuntimeError):
    """The child process died (a signal or a hard exit) without reporting a result."""


class StepFailed(RuntimeError):
    """The step raised in the child: the message is its ``Type: first line``."""


def describe(error: BaseException) -> str:
    """One line for a failure of ``run_isolated`` (or of the step, run in process)."""
    from ..core._utils import one_line

    return str(error) if isinstance(error, StepFailed) else one_line(error)


def isolation_available() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "fork")


def _die_with_parent(parent: int) -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


class _Collected(logging.Handler):
    """The plugin's log records of the child, sent back to be logged in the parent (its handlers:
    caplog, the user's logging config), not printed by the child."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, record.levelno, record.getMessage()))


def _collect_package_logs() -> _Collected:
    package = logging.getLogger(__name__.split(".")[0])
    collected = _Collected()
    package.handlers, package.propagate = [collected], False
    return collected


def run_isolated(step: Callable[[], Any], *, what: str) -> Any:
    """``step()`` (returning JSON-serialisable data) in a forked child; its exception is raised
    here as ``StepFailed(<one line>)``, its death as ``ChildProcessDied`` naming the signal and
    the last line it printed. The child's stderr is replayed on this process's stderr."""
    from ..core._utils import one_line
    from ._files import close_inherited_locks

    if not isolation_available():
        return step()
    sys.stdout.flush()
    sys.stderr.flush()
    err_r, err_w = os.pipe()
    res_r, res_w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            _die_with_parent(parent)
            close_inherited_locks()
            os.close(err_r)
            os.close(res_r)
            os.dup2(err_w, 2)
            import torch

            torch.set_num_threads(1)  # GNU OpenMP's pool does not survive a fork
            logs = _collect_package_logs()
            try:
                payload = {"ok": True, "value": step()}
            except BaseException as e:
                payload = {"ok": False, "error": one_line(e)}
            payload["logs"] = logs.records
            with os.fdopen(res_w, "w") as f:
                f.write(json.dumps(payload))
            code = 0
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os._exit(code)
    os.close(err_w)
    os.close(res_w)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(err_r, 65536),
                                                                  b"")), daemon=True)
    reader.start()
    try:
        with os.fdopen(res_r) as f:
            raw = f.read()
        _, status = os.waitpid(pid, 0)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        raise
    finally:
        reader.join(timeout=5)
        os.close(err_r)
    stderr = b"".join(chunks).decode(errors="replace")
    if stderr:
        sys.stderr.write(stderr)
        sys.stderr.flush()
    if raw:
        payload = json.loads(raw)
        for name, level, message in payload.get("logs", []):  # as if logged here
            logging.getLogger(name).log(level, "%s", message)
        if payload["ok"]:
            return payload["value"]
        raise StepFailed(payload["error"])
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    how = (f"signal {signal.Signals(-os.waitstatus_to_exitcode(status)).name}"
           if os.WIFSIGNALED(status) else f"exit code {os.waitstatus_to_exitcode(status)}")
    raise ChildProcessDied(f"{what} aborted the process it ran in ({how})"
                           + (f": {last}" if last else ""))
