"""A run's data fingerprint (``RUN/data_fingerprint.json``): every split's examples as the run resolved them (a
file's path, size and label for data read from files; a digest of each example for data held in memory), written
when the run starts, compared when it resumes or is evaluated: a run never goes on over other data without saying
what changed (docs/runs.md). ``accept=True`` (``--accept-data-change``) goes on anyway and the caller records it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

from .batches import BatchSource

FILE = "data_fingerprint.json"
FORMAT = 1
LISTED = 200_000  # a split's entries are kept (to name what changed) up to this many; beyond, its digest alone
SPLITS = ("train", "val", "test")


class DataChangedError(ValueError):
    """The data a run resolves now is not the data it started with."""


def fingerprint(source: BatchSource) -> dict[str, Any] | None:
    """Every split's entries (:meth:`BatchSource.example_entries`), their number and digest; None for a source
    that lists no entries (warned)."""
    splits = {}
    for split in SPLITS:
        if not source.has_split(split):
            continue
        entries = source.example_entries(split)
        if entries is None:
            warnings.warn(f"{type(source).__name__} lists no examples: the run's data is not fingerprinted, so a "
                          "change of its data is not detected on resume", stacklevel=2)
            return None
        digest = hashlib.sha256("\n".join(entries).encode()).hexdigest()
        splits[split] = {"n": len(entries), "sha256": digest, "entries": entries if len(entries) <= LISTED else None}
    return {"format": FORMAT, "splits": splits}


def differences(then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What changed from ``then`` to ``now``, a line per split (empty: the same data)."""
    out = []
    for split in sorted(set(then["splits"]) | set(now["splits"]), key=SPLITS.index):
        a, b = then["splits"].get(split), now["splits"].get(split)
        if a is None or b is None:
            out.append(f"{split}: {'added' if a is None else 'gone'} ({(b or a)['n']} examples)")
        elif a["sha256"] != b["sha256"]:
            if a["entries"] is None or b["entries"] is None:
                out.append(f"{split}: {a['n']} examples then, {b['n']} now, not the same")
                continue
            old, new = set(a["entries"]), set(b["entries"])
            removed, added = sorted(old - new), sorted(new - old)
            parts = [f"{len(removed)} removed" + (f" (e.g. {', '.join(removed[:3])})" if removed else ""),
                     f"{len(added)} added" + (f" (e.g. {', '.join(added[:3])})" if added else "")]
            if not removed and not added:
                parts = ["the same examples in another order"]
            out.append(f"{split}: " + ", ".join(parts))
    return out


def record(run_dir: Path, source: BatchSource) -> None:
    """Write the fingerprint of ``source`` into the run directory (when it starts, or after an accepted change)."""
    from ..files import atomic_write_text

    found = fingerprint(source)
    if found is not None:
        atomic_write_text(Path(run_dir) / FILE, json.dumps(found))


def check(run_dir: Path, source: BatchSource, accept: bool = False, what: str = "resume", write: bool = True
          ) -> list[str]:
    """Compare ``source`` with the fingerprint the run recorded: the differences (empty when none, or when the run
    recorded none: then today's is recorded, with a warning). Changed data is a :class:`DataChangedError` naming the
    differences unless ``accept``; accepted, the new fingerprint replaces the old (``write``: this process writes the
    run directory) and the caller logs the change."""
    path = Path(run_dir) / FILE
    if not path.exists():
        then = "today's data is recorded as the run's from now on" if write else \
            "its data cannot be checked (its next resume records today's)"
        warnings.warn(f"{run_dir} has no {FILE} (a run started before ermoe kept one): {then}", stacklevel=2)
        if write:
            record(run_dir, source)
        return []
    try:
        then = json.loads(path.read_text())
    except ValueError as err:
        raise DataChangedError(f"{path} is corrupt ({err}): remove it to record today's data as the run's") from None
    now = fingerprint(source)
    if now is None:
        return []
    changed = differences(then, now)
    if changed and not accept:
        raise DataChangedError(
            f"the data changed since the run started ({path}): " + "; ".join(changed) + f". The run's {what} "
            "needs the examples it started with: restore them, or pass --accept-data-change to go on over today's "
            "data (recorded in the run's log; from there on the run is not the one it would have been)")
    if changed and write:
        record(run_dir, source)
    return changed
