"""The backup store's lock: shared for writers and readers, exclusive for pruning."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from imagebuild.errors import StoreBusy
from imagebuild.layerstore import FOREIGN_PARTIAL_AGE
from imagebuild.store import LocalDir
from imagebuild.storelock import LOCKS, StoreLock, holders


def _other_run(store: LocalDir, kind: str, *, host: str | None = None, pid: int = 1,
               age: float = 0.0) -> Path:
    """The lock file another run would write: this host's pid 1 (alive), or another
    host's, ``age`` seconds old."""
    d = store.directory / LOCKS
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{kind}.{host or socket.gethostname()}-{pid}.abcd1234"
    path.write_text('{"what": "a backup of vllm-node\\u0007", "created": "x"}\n')
    if age:
        t = time.time() - age
        os.utime(path, (t, t))
    return path


def test_shared_locks_share_and_an_exclusive_one_waits_for_none(tmp_path: Path) -> None:
    store = LocalDir(tmp_path)
    other = _other_run(store, "shared")
    with StoreLock(store, "shared", "a restore"):  # two readers or writers: fine
        assert len(holders(store)) == 2
    with pytest.raises(StoreBusy, match=r"locked by a backup of vllm-node\? \(shared") as err:
        StoreLock(store, "exclusive", "pruning").acquire()
    assert err.value.exit_code == 12 and str(other.name) in err.value.hint
    assert [h.path for h in holders(store)] == [f"{LOCKS}/{other.name}"]  # ours withdrawn
    other.unlink()
    _other_run(store, "exclusive")
    with pytest.raises(StoreBusy, match="exclusive"):
        StoreLock(store, "shared", "a backup").acquire()


def test_a_lock_of_a_run_that_is_gone_is_stale_and_removed(tmp_path: Path) -> None:
    store = LocalDir(tmp_path)
    dead = _other_run(store, "exclusive", pid=2 ** 22 + 7)  # no such pid
    far = _other_run(store, "shared", host="control-node", age=FOREIGN_PARTIAL_AGE + 60)
    near = _other_run(store, "shared", host="control-node", pid=2, age=60)
    with StoreLock(store, "shared", "a backup"):
        assert not dead.exists() and not far.exists() and near.exists()
    with pytest.raises(StoreBusy, match="control-node"):
        StoreLock(store, "exclusive", "pruning").acquire()


def test_the_locks_of_one_run_never_conflict(tmp_path: Path) -> None:
    store = LocalDir(tmp_path)
    with StoreLock(store, "shared", "a backup"), StoreLock(store, "exclusive", "pruning"):
        assert {h.kind for h in holders(store)} == {"shared", "exclusive"}
    assert holders(store) == [] and list((tmp_path / LOCKS).iterdir()) == []
