"""Process lifetime: who runs a run, whether that process is still alive, and engine processes that die with
the process that started them.

- A run records its process identity (pid, host, process start time) when it starts; `factory status` shows a
  run whose process is gone (or whose pid now belongs to another process) as `interrupted`, not `running`.
- vLLM starts its engine core as a child process (multiprocessing, `vllm.v1.engine.utils.CoreEngineProcManager`,
  target `EngineCoreProc.run_engine_core`). A parent killed with SIGKILL cannot stop it, and it used to outlive the
  run. `engine_core_dies_with_parent()` wraps that target while the engine starts, so the child first asks the
  kernel to SIGKILL it when its parent dies (Linux `prctl(PR_SET_PDEATHSIG)`), then runs vLLM's code unchanged.
  Works for both start methods (spawn imports this module in the child; fork inherits the wrapper).

Stdlib only (plus psutil where present): the engine child imports this module before vLLM.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import sys
import threading

PR_SET_PDEATHSIG = 1


def process_started(pid: int) -> float | None:
    """The start time of process `pid` (seconds since the epoch, as psutil gives it), or None if it is gone."""
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except ImportError:  # pragma: no cover - psutil comes with factory's dependencies
        return 0.0 if _pid_exists(pid) else None
    except Exception:  # NoSuchProcess, AccessDenied, ZombieProcess
        return None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_identity() -> dict:
    """This process, as recorded in `runs` (pid, hostname, process_started)."""
    return {"pid": os.getpid(), "hostname": socket.gethostname(), "process_started": process_started(os.getpid())}


def process_alive(pid: int | None, hostname: str | None, started: float | None) -> bool | None:
    """Whether the process recorded as (pid, hostname, started) still runs: None when it cannot be told here
    (no pid recorded, or another host). A pid now used by a newer process (pid reuse) counts as gone."""
    if pid is None or hostname is None:
        return None
    if hostname != socket.gethostname():
        return None
    now_started = process_started(int(pid))
    if now_started is None:
        return False
    if started is None or not now_started:
        return True
    return abs(now_started - float(started)) < 1.0


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux); exit at once if it already has."""
    if not sys.platform.startswith("linux") or os.getpid() == parent_pid:
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


_ORIGINAL_RUN_ENGINE_CORE = None  # set in the parent while the patch is on (inherited by a forked child)


def run_engine_core_dying_with_parent(*args, parent_pid: int, **kwargs):
    """vLLM's engine-core entry point, after `die_with_parent`."""
    die_with_parent(parent_pid)
    target = _ORIGINAL_RUN_ENGINE_CORE
    if target is None:  # spawn: a fresh interpreter, vLLM's class is unpatched here
        from vllm.v1.engine.core import EngineCoreProc

        target = EngineCoreProc.run_engine_core
    return target(*args, **kwargs)


@contextlib.contextmanager
def engine_core_dies_with_parent():
    """While vLLM starts its engine (inside `LLM(...)`), make its engine-core process die with this one.

    Only on Linux and on the main thread: PR_SET_PDEATHSIG fires when the *thread* that started the child ends,
    so a child started from a short-lived thread would be killed early. Elsewhere this does nothing."""
    global _ORIGINAL_RUN_ENGINE_CORE
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        from vllm.v1.engine.core import EngineCoreProc

        original = EngineCoreProc.__dict__["run_engine_core"]
    except (ImportError, KeyError):  # another vLLM layout: start it as it is
        yield
        return
    _ORIGINAL_RUN_ENGINE_CORE = original.__func__ if isinstance(original, staticmethod) else original
    # A partial is no descriptor: `EngineCoreProc.run_engine_core` returns it as is, and it pickles by reference.
    EngineCoreProc.run_engine_core = functools.partial(run_engine_core_dying_with_parent, parent_pid=os.getpid())
    try:
        yield
    finally:
        EngineCoreProc.run_engine_core = original
        _ORIGINAL_RUN_ENGINE_CORE = None
