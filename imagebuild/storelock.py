"""The backup store's lock, on the model of restic's and borg's: a run that writes new
generations (or reads one out) holds a shared lock, a run that removes anything (pruning
generations and collecting the blobs no generation links) an exclusive one.

A lock is a file under ``locks/`` of the store (on this host or over ssh alike), named
``<kind>.<host>-<pid>.<random>``: taking one writes it, then lists the others; a lock
that conflicts and is alive makes the newcomer remove its own and fail with
``StoreBusy`` (exit 12), naming who holds it. Two runs that start together may both
step back; neither is ever wrong. A lock whose run is gone (this host, pid not alive; or
another host's, older than a day) is stale and removed by whoever finds it. Locks of
this very process never conflict with each other.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from .errors import StoreBusy
from .layerstore import check_layout, run_alive, run_token
from .store import BackupDir
from .untrusted import loads_json

LOCKS = "locks"
Kind = Literal["shared", "exclusive"]


@dataclass(frozen=True)
class Holder:
    path: str  # in the store
    kind: Kind
    token: str  # host-pid of its run
    what: str  # what the run does, as it said


class StoreLock:
    """``with StoreLock(store, "shared", "backup of vllm-node"):`` (see the module's text)."""

    def __init__(self, store: BackupDir, kind: Kind, what: str) -> None:
        self.store, self.kind, self.what = store, kind, what
        self.path = ""

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        check_layout(self.store, LOCKS)  # every run that writes or removes passes here
        self.store.mkdirs(LOCKS)
        self.path = f"{LOCKS}/{self.kind}.{run_token()}.{secrets.token_hex(4)}"
        created = datetime.now(UTC).isoformat(timespec="seconds")
        self.store.write_text(self.path, json.dumps({"what": self.what,
                                                     "created": created}) + "\n")
        conflicts = [h for h in holders(self.store) if h.path != self.path
                     and h.token != run_token()
                     and (self.kind == "exclusive" or h.kind == "exclusive")]
        if conflicts:
            self.release()
            h = conflicts[0]
            raise StoreBusy(
                f"{self.store} is locked by {h.what} ({h.kind}, run {h.token}): this "
                f"{self.what} needs it {'to itself' if self.kind == 'exclusive' else 'shared'}"
                f"; nothing was changed",
                hint=f"wait for that run to end and run this again; a lock whose run died "
                     f"is removed by the next run on its host (or after a day): "
                     f"{self.store}/{h.path}")

    def release(self) -> None:
        if self.path:
            self.store.remove(self.path)
            self.path = ""


def holders(store: BackupDir) -> list[Holder]:
    """The live locks of the store; stale ones (their run is gone) are removed."""
    out = []
    for f, st in store.files(LOCKS).items():
        kind, _, rest = f.partition(".")
        token = rest.rpartition(".")[0]
        if kind not in ("shared", "exclusive") or not token:
            continue
        path = f"{LOCKS}/{f}"
        own = token == run_token()
        if not own and not run_alive(token, st.mtime_ns):
            store.remove(path)
            continue
        what = "a run"
        try:  # another run's words: printable, and short
            said = str(loads_json(store.read_text(path) or "{}").get("what") or "")
            what = re.sub(r"[^\x20-\x7e]", "?", said)[:80] or what
        except (ValueError, AttributeError):
            pass
        out.append(Holder(path, kind, token, what))  # type: ignore[arg-type]
    return out
