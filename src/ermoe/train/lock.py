"""One writer per run directory: an exclusive lock file ``RUN/.lock`` holding the writer's pid, host and process
start time.

The lock is created atomically (a hard link of a complete temporary file, so a reader never sees a half-written
one). A lock left by a process that is gone (killed, crashed) is detected on the same host and taken over with a
warning; one held by a live process, or by a process on another host (which this host cannot check), is an error
that says who holds it and how to clear it by hand.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import warnings
from pathlib import Path

LOCK_FILE = ".lock"


class RunLockedError(RuntimeError):
    """Another process is writing this run directory."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), which tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start_time: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True  # no /proc to ask: a process with this pid exists
    if state == "Z":  # killed, not yet reaped
        return False
    return start_time is None or _start_time(pid) == start_time


class RunLock:
    """``with RunLock(run_dir): ...`` holds the run directory's lock for the block."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self.held = False

    def holder(self) -> dict | None:
        """The lock file's content, None if there is no lock; an unreadable lock reads as ``{}``."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "RunLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": _start_time(os.getpid())}
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".lock.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    self.held = True
                    return self
                except FileExistsError:
                    self._take_over_if_stale()
            raise RunLockedError(f"could not take the lock {self.path}: other processes keep taking it")
        finally:
            os.unlink(tmp)

    def _take_over_if_stale(self) -> None:
        holder = self.holder()
        if holder is None:
            return  # released meanwhile: try again
        pid, host = holder.get("pid"), holder.get("host")
        if isinstance(pid, int) and host == socket.gethostname() and _alive(pid, holder.get("start_time")):
            raise RunLockedError(f"run {self.root} is being written by process {pid} on this host (lock "
                                 f"{self.path}); wait for it to finish, or stop it first")
        if isinstance(pid, int) and host != socket.gethostname():
            raise RunLockedError(f"run {self.root} is locked by process {pid} on host {host!r}, which this host "
                                 f"cannot check; if that run is gone, delete {self.path}")
        warnings.warn(f"taking over the lock of run {self.root} from process {pid} on {host!r}, which is gone "
                      "(killed or crashed)", stacklevel=3)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        if self.held:
            self.held = False
            holder = self.holder()
            if holder and holder.get("pid") == os.getpid():
                os.unlink(self.path)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
