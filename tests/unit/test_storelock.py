"""The backup store's lock: shared for writers and readers, exclusive for pruning."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagebuild.errors import BackupError, StoreBusy
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


@pytest.mark.parametrize("path", ["blobs", "blobs/sha256", "blobs/.incoming", "images",
                                  "images/vllm-node", "locks"])
@pytest.mark.parametrize("kind", ["symlink", "file"])
def test_a_store_whose_own_directory_points_elsewhere_is_refused_before_any_change(
        tmp_path: Path, path: str, kind: str) -> None:
    """A run that writes or removes takes the store's lock first: with blobs/.incoming a
    symlink it would delete old files elsewhere as leftovers, with blobs/sha256 garbage
    collection would, with images/NAME generations would be written there."""
    store = LocalDir(tmp_path / "store")
    for d in ("blobs/sha256", "blobs/.incoming", "images/vllm-node", "locks"):
        (store.directory / d).mkdir(parents=True, exist_ok=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / ("a" * 64)  # a name garbage collection or cleaning would take
    victim.write_bytes(b"not the store's")
    old = time.time() - 3 * 86400
    os.utime(victim, (old, old))
    target = store.directory / path
    os.rename(target, tmp_path / "moved")  # keep what was there out of the way
    if kind == "symlink":
        target.symlink_to(elsewhere, target_is_directory=True)
    else:
        target.write_text("x")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(BackupError) as info:
        StoreLock(store, "exclusive", "pruning").acquire()
    assert info.value.exit_code == 8
    assert f"{path} is not a directory of the store's own" in info.value.message
    assert "nothing was changed" in info.value.message
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert victim.read_bytes() == b"not the store's"


def test_a_store_with_real_directories_or_none_yet_is_taken(tmp_path: Path) -> None:
    store = LocalDir(tmp_path / "new")
    with StoreLock(store, "shared", "a backup"):  # a store not made yet: nothing to refuse
        pass
    for d in ("blobs/sha256", "blobs/.incoming", "images/vllm-node"):
        (store.directory / d).mkdir(parents=True, exist_ok=True)
    with StoreLock(store, "exclusive", "pruning"):
        pass
    # a link inside a generation is the archive's own (a layer saved twice), not the store's
    (store.directory / "images" / "vllm-node" / "current").write_text("abc\n")
    with StoreLock(store, "shared", "a backup"):
        pass
    (store.directory / "images" / "stray.json").write_text("{}")
    with pytest.raises(BackupError, match=r"images/stray\.json is not a directory"):
        StoreLock(store, "shared", "a backup").acquire()


def test_reading_a_store_file_that_is_a_fifo_or_a_device_is_refused_at_once(
        tmp_path: Path) -> None:
    from imagebuild.streams import DamagedBytes, checked

    store = LocalDir(tmp_path)
    os.mkfifo(tmp_path / "fifo")  # no writer: a plain open would wait forever
    os.symlink("/dev/zero", tmp_path / "zero")
    for name in ("fifo", "zero"):
        with pytest.raises(BackupError, match="is not a regular file"):
            next(iter(store.read(name)))

    # and a stream longer than its record is cut at the first byte too many
    def endless() -> Iterator[bytes]:
        while True:
            yield b"\0" * 4096

    with pytest.raises(DamagedBytes, match=r"\(4096 bytes, not 100\)"):
        for _ in checked(endless(), "0" * 64, 100, "store/x", "x"):
            pass
