"""Writing files so that nothing is ever half-written under its final name.

``atomic_write_text`` writes a temporary file in the same directory, fsyncs it and
renames it into place. The new file keeps the mode of the file it replaces; a new file
gets the mode the umask gives (0644 under the usual 022), not mkstemp's private 0600,
so a lock, a Dockerfile or a sidecar stays readable to the users who could read it before.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

_CHUNK = 1 << 20


class Meter(Protocol):
    def add(self, n: int) -> None: ...


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file, fsync, ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class NotAFile(OSError):
    """What was asked for as a file is a FIFO, a device, a directory or a socket."""


def read_file_bytes(path: Path, limit: int | None = None) -> bytes:
    """A regular file's bytes (at most ``limit`` + 1 of them, so a caller can tell it is
    too large). Opened without blocking, so a FIFO put in a file's place is refused
    (``NotAFile``) instead of waiting forever for a writer; OSError as ``open`` raises
    it otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotAFile(0, "not a regular file (a FIFO, a device or a directory)")
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        left = (limit + 1) if limit is not None else None
        while left is None or left > 0:
            chunk = os.read(fd, _CHUNK if left is None else min(_CHUNK, left))
            if not chunk:
                break
            chunks.append(chunk)
            if left is not None:
                left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


Identity = tuple[int, int, int, int, int]  # dev, ino, size, mtime_ns, ctime_ns


def _identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class PinnedFile:
    """A file opened once: hashed, and served, through the same descriptor."""

    path: Path
    fd: int
    identity: Identity

    @classmethod
    def open(cls, path: Path, *, follow_symlinks: bool = True) -> PinnedFile:
        """Open ``path`` for reading; with ``follow_symlinks=False`` a symbolic link in
        its last component is refused (``OSError``, ELOOP). Never blocks: a FIFO in a
        file's place opens at once (callers refuse what is not a regular file)."""
        flags = (os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
                 | (0 if follow_symlinks else os.O_NOFOLLOW))
        fd = os.open(path, flags)
        return cls(path, fd, _identity(os.fstat(fd)))

    @property
    def size(self) -> int:
        return self.identity[2]

    def changed(self, *, ctime: bool = True) -> bool:
        """Whether the file was written to since it was opened: its size or mtime moved,
        or its ctime did while it still has a name (a write with the mtime put back).
        A file only unlinked or renamed over (ctime moves, no link left) has not changed:
        the descriptor still holds the bytes that were checked.

        ``ctime=False`` counts only a size or mtime that moved: for a file whose bytes are
        checked against their sha256 as they are read anyway, and whose ctime also moves
        whenever a hard link to it is made or removed (a blob of the backup layer store,
        linked by every generation that holds it)."""
        st = os.fstat(self.fd)
        now = _identity(st)
        if now[:4] != self.identity[:4]:
            return True
        return ctime and now[4] != self.identity[4] and st.st_nlink > 0

    def sha256(self, meter: Meter | None = None) -> str:
        h = hashlib.sha256()
        offset = 0
        while chunk := os.pread(self.fd, _CHUNK, offset):
            h.update(chunk)
            offset += len(chunk)
            if meter is not None:
                meter.add(len(chunk))
        return h.hexdigest()

    def chunks(self, offset: int, length: int) -> Iterator[bytes]:
        """``length`` bytes from ``offset``, in chunks of at most 1 MiB."""
        while length > 0:
            chunk = os.pread(self.fd, min(length, _CHUNK), offset)
            if not chunk:
                raise OSError(f"{self.path} ended early")
            offset += len(chunk)
            length -= len(chunk)
            yield chunk

    def __enter__(self) -> PinnedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
