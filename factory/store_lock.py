"""The store's one-writer rule across processes, and how readers get in while a run writes (see factory/store.py's
module docstring): the writer's lock file, a reader's request to let go of the DuckDB file, and opening the file
with a bounded wait."""

from __future__ import annotations

import fcntl
import os
import re
import socket
import time
from pathlib import Path

import duckdb

READ_WAIT_S = 10.0  # how long a reader (or a writer's first open) waits for the file
REOPEN_WAIT_S = 900.0  # how long a writer that holds the lock waits for readers (a long export) to let go
READER_GRACE_S = 0.15 # after letting go for a reader, the writer waits this long before it opens the file again
WATCH_INTERVAL_S = 0.05  # how often the writer's watcher thread looks for a reader's request


class StoreLockedError(RuntimeError):
    """Another process holds the store for writing."""


def _locked_message(path: Path, who: str) -> str:
    return (f"store {path} is in use by {who}. factory allows one writer per store: wait for that run to finish or "
            f"stop it, or point this command at another store (--set store=...).")


class _WriterLock:
    """The cross-process one-writer rule: an exclusive flock on `<store>.lock`, which holds the holder's pid and
    host. The kernel drops it when the holder dies, however it dies. Counted per process, so one process may open
    the same store twice (as DuckDB allows)."""

    _held: dict[str, list] = {}  # lock path -> [fd, count]

    def __init__(self, store_path: Path):
        self.path = str(store_path.with_name(store_path.name + ".lock"))
        self.store_path = store_path

    def acquire(self) -> None:
        held = self._held.get(self.path)
        if held is not None:
            held[1] += 1
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            os.close(fd)
            who = (f"process {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "")) if holder \
                else "another process"
            raise StoreLockedError(_locked_message(self.store_path, who)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._held[self.path] = [fd, 1]

    def release(self) -> None:
        held = self._held.get(self.path)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del self._held[self.path]
            fcntl.flock(held[0], fcntl.LOCK_UN)
            os.close(held[0])


def _read_request_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock.read")


def _ask_writer(path: Path) -> None:
    """A reader asks the writer to let go of the file (it watches this file's mtime)."""
    req = _read_request_path(path)
    try:
        req.touch()
        os.utime(req)
    except OSError:  # a read-only directory: the writer lets go at its next model call anyway
        pass


CHECKPOINT_THRESHOLD = "256MB"  # see _connect
# DuckDB's buffer pool (cached table blocks, index nodes, join and sort state) may grow to 80% of RAM by default, and
# it keeps every block a run has read: a 1M-prompt run held 1.2 GB of cached table blocks and 0.5 GB of index
# nodes by its end, and its peak RSS passed 4 GB. Every query factory makes reads a page of rows, so the cache buys
# little; above this limit DuckDB evicts cached blocks and spills joins and sorts to `<store>.tmp`.
MEMORY_LIMIT = "1GB"


def _connect(path: Path, read_only: bool, wait_s: float) -> duckdb.DuckDBPyConnection:
    """Open the DuckDB file, waiting up to `wait_s` while another process holds its file lock. A reader asks the
    writer to let go (`_ask_writer`) and retries often, to get in during the writer's grace period."""
    deadline = time.monotonic() + wait_s
    delay = 0.02
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
            con.execute(f"SET memory_limit = '{MEMORY_LIMIT}'")
            if not read_only:
                # DuckDB checkpoints whenever its write-ahead log passes the threshold (16 MB by default), and a
                # checkpoint costs more the larger the tables are: commits of 1,024 rows into a keyed table got
                # slower as it grew (the 5th 100k rows took 2.1x the 1st with the default, 1.6x with 1 GB). A
                # larger log checkpoints ~16x less often; it is checkpointed when the writer lets go for a reader
                # and at close, and replayed at the next open after a crash.
                con.execute(f"SET checkpoint_threshold = '{CHECKPOINT_THRESHOLD}'")
            return con
        except duckdb.IOException as e:
            msg = str(e)
            if "lock" not in msg.lower():
                raise
            if time.monotonic() >= deadline:
                holder = re.search(r"\(PID (\d+)\)", msg)
                raise StoreLockedError(_locked_message(path, f"process {holder.group(1)}" if holder
                                                       else "another process")) from e
            if read_only:
                _ask_writer(path)
                time.sleep(0.02)
            else:
                time.sleep(delay)
                delay = min(delay * 2, 0.25)
