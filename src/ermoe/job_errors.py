"""How the ``ermoe`` command says a named error, alone or as one process of a torchrun job.

Alone, the error goes to stderr. In a job of several processes every rank that fails would print its own, and the
one that explains the failure (a corrupt file on rank 1) ends up among the others' (rank 0's lost connection) and
torchrun's traceback. So there each rank writes its error to the file torchrun gives it (``TORCHELASTIC_ERROR_FILE``,
the format of ``torch.distributed.elastic``'s ``@record``), and torchrun's summary, the last thing the job prints,
shows the first failure's named error as the root cause (and the others' below it); the rank prints one line that
points there. A rank stopped because a peer process went away (gloo's ``Connection reset by peer``) is a named error
too, :class:`PeerLostError`, dated one second later than it happened: torchrun picks the root cause by whole-second
timestamps, and the peer's own failure is the cause.
"""

from __future__ import annotations

import json
import os
import sys
import time

# What gloo and NCCL say when a process of the job is gone while this one waits on it in a collective.
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused",
             "NCCL communicator was aborted", "remote process exited or there was a network error")


class PeerLostError(RuntimeError):
    """Another process of the job stopped (or its connection broke) while this one waited on it."""


def peer_lost(err: BaseException) -> PeerLostError | None:
    """``err`` as a :class:`PeerLostError` if it is a collective's failure because a peer process went away
    (None otherwise)."""
    if isinstance(err, PeerLostError) or not isinstance(err, RuntimeError):
        return err if isinstance(err, PeerLostError) else None
    cause = next((phrase for phrase in PEER_LOST if phrase in str(err)), None)
    if cause is None:
        return None
    rank = os.environ.get("RANK", "?")
    return PeerLostError(f"rank {rank} lost another process of the job ({cause}): that process stopped first, and its "
                         "own error (torchrun's summary, the root cause) says why; a process killed from outside "
                         "(out of memory, a scheduler) shows as a signal there")


def in_job() -> bool:
    """Whether this process is one of several of a torchrun job that gave it an error file."""
    return bool(os.environ.get("TORCHELASTIC_ERROR_FILE")) and int(os.environ.get("WORLD_SIZE", "1")) > 1


def report_error(command: str, message: str, err: BaseException | None = None) -> None:
    """Say the named error ``message`` of ``ermoe command``: on stderr alone; in a job, into torchrun's error file
    (the summary shows it) with one line on stderr pointing there. Falls back to stderr if the file cannot be
    written."""
    text = f"ermoe {command}: error: {message}"
    if in_job():
        rank = os.environ.get("RANK", "?")
        stamp = int(time.time()) + (1 if isinstance(err, PeerLostError) else 0)
        data = {"message": {"message": text, "extraInfo": {"py_callstack": text, "timestamp": str(stamp)}}}
        path = os.environ["TORCHELASTIC_ERROR_FILE"]
        try:
            with open(path, "w") as f:
                json.dump(data, f)
        except OSError:
            pass
        else:
            print(f"ermoe {command}: rank {rank} failed; torchrun's summary, at the end of the job's output, gives "
                  "the first failure's error", file=sys.stderr)
            return
    print(text, file=sys.stderr)


def record_unexpected(err: BaseException) -> None:
    """An error the command does not name, in a job: its traceback into torchrun's error file, as
    ``torch.distributed.elastic``'s ``@record`` writes it, so the summary shows it rather than a bare exit code
    (the caller raises it on)."""
    if in_job():
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(err)
