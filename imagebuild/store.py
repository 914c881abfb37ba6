"""Backup stores: a directory tree of backup files on this host or on another one (ssh://).

``BackupDir`` is the interface: files under one root directory, each written under a
temporary name and renamed into place, hard links, streaming reads and writes, listings
with link counts. ``LocalDir`` and ``SshDir`` implement it; what to write, what to link
and what to prune is decided once, in ``layerstore.py`` and ``backup.py``, for both.

Paths are relative, ``/``-separated, made of components imagebuild chose or checked
(digests, image names, ``<hash12>``, the members of a ``docker save`` archive), each
matching ``[A-Za-z0-9._@+-]+`` and never ``.`` or ``..``. The remote side never parses
``ls`` output: listings come NUL-separated from ``find -printf`` and every remote path is
one shell word (``shlex`` quoting by remote.py).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import TracebackType
from typing import Protocol

from .errors import BackupError, RemoteError
from .fsutil import PinnedFile, atomic_write_text, fsync_dir
from .progress import Meter
from .remote import Process, Target, call, explain, finish, last_line, reading, run, start
from .spec import Backups, SshLocation
from .streams import CHUNK, DAMAGED_HINT

_COMPONENT = re.compile(r"[A-Za-z0-9._@+-]+")


@dataclass(frozen=True)
class FileStat:
    size: int
    mtime_ns: int
    ino: int = 0
    ctime_ns: int = 0
    nlink: int = 1

    @classmethod
    def of(cls, st: os.stat_result) -> FileStat:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, st.st_nlink)


class Writer(Protocol):
    """A file being written under a temporary name: ``write`` chunks, then ``commit``
    (durable, size checked) or ``abort`` (removed)."""

    def write(self, chunk: bytes) -> None: ...

    def commit(self) -> FileStat: ...

    def abort(self) -> None: ...


class BackupDir(Protocol):
    """One directory of backup files."""

    def __str__(self) -> str: ...

    def local_path(self, name: str) -> Path | None:
        """The file as a path on this host (None for a remote directory)."""
        ...

    def prepare(self) -> None:
        """Create the directory if it is missing."""
        ...

    def files(self, sub: str = "") -> dict[str, FileStat]:
        """Every regular file directly in the directory ``sub`` (the root: ""), by name."""
        ...

    def dirs(self, sub: str = "") -> list[str]:
        """The names of the directories directly in ``sub``."""
        ...

    def mkdirs(self, *paths: str) -> None:
        """Create directories (and their parents); existing ones are not an error."""
        ...

    def link_all(self, pairs: list[tuple[str, str]]) -> None:
        """Hard-link each ``src`` as ``dst`` (replacing it), in one round trip."""
        ...

    def symlink(self, target: str, path: str) -> None:
        """A symbolic link ``path`` -> ``target`` (relative, as an archive holds it)."""
        ...

    def remove_tree(self, *paths: str) -> None:
        """Remove directories and everything in them; absent ones are not an error."""
        ...

    def stat(self, name: str) -> FileStat | None: ...

    def read_text(self, name: str) -> str | None:
        """A small file's text, or None when it does not exist."""
        ...

    def write_text(self, name: str, text: str) -> None:
        """Write a small file atomically."""
        ...

    def free_bytes(self) -> int: ...

    def writer(self, name: str) -> Writer: ...

    def read(self, name: str, meter: Meter | None = None) -> Iterator[bytes]:
        """The file's bytes in chunks (memory stays flat)."""
        ...

    def sha256(self, name: str, meter: Meter | None = None) -> str:
        """The file's sha256, computed where the file is."""
        ...

    def link(self, src: str, dst: str) -> None:
        """Hard-link ``src`` as ``dst``, replacing ``dst``."""
        ...

    def rename(self, src: str, dst: str) -> None:
        """Rename a file (replacing ``dst``) or a directory (``dst`` must not exist)."""
        ...

    def place(self, src: str, dst: str) -> bool:
        """Move the file ``src`` to ``dst`` unless ``dst`` exists: then ``src`` is removed
        and ``dst`` kept (False). For content-addressed files, where another run may have
        put the same bytes there and hard-linked them already: replacing that file would
        leave its links on an inode the store no longer names."""
        ...

    def remove(self, *names: str) -> None:
        """Remove files; absent ones are not an error."""
        ...

    def not_directories(self, paths: Sequence[str], children_of: str) -> list[str]:
        """Of ``paths``, those that exist but are not directories of their own (a symlink,
        even to a directory, or any other kind of file), then every entry directly in
        ``children_of`` that is not (as lstat sees them: nothing is followed)."""
        ...


def check_name(name: str) -> str:
    """A relative path in the store: components of ``[A-Za-z0-9._@+-]``, no ``.``/``..``."""
    parts = name.split("/")
    if not name or any(not _COMPONENT.fullmatch(p) or p in (".", "..") for p in parts):
        raise BackupError(f"{name!r} is not a path in a backup directory")
    return name


def open_store(backups: Backups, ssh_config: str | None) -> BackupDir:
    if isinstance(backups.location, SshLocation):
        return SshDir(backups.location, ssh_config)
    return LocalDir(backups.location)


# -- on this host ------------------------------------------------------------------------------


class _LocalWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.f = path.open("wb")

    def write(self, chunk: bytes) -> None:
        self.f.write(chunk)

    def commit(self) -> FileStat:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        st = self.path.stat()
        return FileStat.of(st)

    def abort(self) -> None:
        try:
            self.f.close()  # may fail again flushing its buffer onto a full disk
        except OSError:
            pass
        self.path.unlink(missing_ok=True)


class LocalDir:
    """A backup directory on this host."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __str__(self) -> str:
        return str(self.directory)

    def _p(self, name: str) -> Path:
        return self.directory / check_name(name)

    def local_path(self, name: str) -> Path | None:
        return self._p(name)

    def prepare(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackupError(f"cannot create the backup directory {self.directory}: "
                              f"{exc.strerror or exc}") from None

    def _entries(self, sub: str) -> list[os.DirEntry[str]]:
        try:
            return list(os.scandir(self._p(sub) if sub else self.directory))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def files(self, sub: str = "") -> dict[str, FileStat]:
        out: dict[str, FileStat] = {}
        for e in self._entries(sub):
            if e.is_file(follow_symlinks=False):
                out[e.name] = FileStat.of(e.stat(follow_symlinks=False))
        return out

    def dirs(self, sub: str = "") -> list[str]:
        return sorted(e.name for e in self._entries(sub) if e.is_dir(follow_symlinks=False))

    def mkdirs(self, *paths: str) -> None:
        for path in paths:
            self._p(path).mkdir(parents=True, exist_ok=True)

    def link_all(self, pairs: list[tuple[str, str]]) -> None:
        for src, dst in pairs:
            self.link(src, dst)

    def symlink(self, target: str, path: str) -> None:
        self._p(path).unlink(missing_ok=True)
        os.symlink(target, self._p(path))

    def remove_tree(self, *paths: str) -> None:
        for path in paths:
            shutil.rmtree(self._p(path), ignore_errors=True)

    def stat(self, name: str) -> FileStat | None:
        try:
            st = self._p(name).stat()
        except FileNotFoundError:
            return None
        return FileStat.of(st)

    def read_text(self, name: str) -> str | None:
        try:
            return self._p(name).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise BackupError(f"cannot read {self._p(name)}: {exc}") from None

    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(self._p(name), text)
        fsync_dir(self._p(name).parent)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.directory).free

    def writer(self, name: str) -> Writer:
        return _LocalWriter(self._p(name))

    def read(self, name: str, meter: Meter | None = None) -> Iterator[bytes]:
        with PinnedFile.open(self._p(name)) as f:  # never blocks on a FIFO
            if not stat.S_ISREG(os.fstat(f.fd).st_mode):
                raise BackupError(f"{self._p(name)} is not a regular file; refusing to read "
                                  f"it", hint=DAMAGED_HINT)
            offset = 0
            while chunk := os.pread(f.fd, CHUNK, offset):
                offset += len(chunk)
                if meter is not None:
                    meter.add(len(chunk))
                yield chunk

    def sha256(self, name: str, meter: Meter | None = None) -> str:
        h = hashlib.sha256()
        for chunk in self.read(name, meter):
            h.update(chunk)
        return h.hexdigest()

    def link(self, src: str, dst: str) -> None:
        self._p(dst).unlink(missing_ok=True)
        os.link(self._p(src), self._p(dst))

    def rename(self, src: str, dst: str) -> None:
        os.replace(self._p(src), self._p(dst))
        fsync_dir(self._p(dst).parent)

    def place(self, src: str, dst: str) -> bool:
        try:
            os.link(self._p(src), self._p(dst))
            placed = True
        except FileExistsError:
            placed = False
        self._p(src).unlink()
        fsync_dir(self._p(dst).parent)
        return placed

    def remove(self, *names: str) -> None:
        for name in names:
            self._p(name).unlink(missing_ok=True)

    def not_directories(self, paths: Sequence[str], children_of: str) -> list[str]:
        out: list[str] = []
        for path in paths:
            try:
                mode = os.lstat(self._p(path)).st_mode
            except (FileNotFoundError, NotADirectoryError):  # a parent is named already
                continue
            if not stat.S_ISDIR(mode):
                out.append(path)
        if children_of not in out:
            out.extend(f"{children_of}/{e.name}" for e in self._entries(children_of)
                       if not e.is_dir(follow_symlinks=False))
        return out


# -- on another host -----------------------------------------------------------------------------


class _SshWriter:
    def __init__(self, store: SshDir, name: str) -> None:
        self.store, self.name = store, name
        self.proc: Process = start(store.target, ["sh", "-c", 'cat > "$1" && sync "$1"', "sh",
                                                  store.path_of(name)])
        self.size = 0
        self.broken = False

    def write(self, chunk: bytes) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(chunk)
        except (BrokenPipeError, ConnectionResetError):
            self.broken = True
            raise OSError(f"the connection to {self.store.target} closed") from None
        self.size += len(chunk)

    def commit(self) -> FileStat:
        r = finish(self.proc)
        got = self.store.stat(self.name)
        if r.code != 0 or self.broken or got is None or got.size != self.size:
            self.abort()
            why = (explain(self.store.target, r.code or 255, r.stderr) if r.code
                   else f"{got.size if got else 'no'} bytes arrived of {self.size}")
            raise OSError(why)
        return got

    def abort(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        try:
            self.store.remove(self.name)
        except RemoteError:
            pass


class SshDir:
    """A backup directory on another host, reached with OpenSSH."""

    def __init__(self, location: SshLocation, ssh_config: str | None) -> None:
        self.location = location
        self.target = Target(name=location.host, host=location.host, user=location.user,
                             port=location.port, config=ssh_config)

    def __str__(self) -> str:
        return str(self.location)

    def path_of(self, name: str) -> str:
        return f"{self.location.path}/{check_name(name)}"

    def local_path(self, name: str) -> Path | None:
        return None

    def prepare(self) -> None:
        run(self.target, ["mkdir", "-p", "--", self.location.path])

    def _dir(self, sub: str) -> str:
        return self.path_of(sub) if sub else self.location.path

    def _find(self, sub: str, kind: str, fmt: str) -> list[str]:
        r = call(self.target, ["find", self._dir(sub), "-mindepth", "1", "-maxdepth", "1",
                               "-type", kind, "-printf", fmt])
        if r.code != 0:
            if r.code == 1 and "No such file" in r.stderr:
                return []
            raise RemoteError(explain(self.target, r.code or 255, r.stderr))
        return r.stdout.split("\0")[:-1]

    def files(self, sub: str = "") -> dict[str, FileStat]:
        fields = self._find(sub, "f", r"%f\0%s\0%T@\0%i\0%C@\0%n\0")
        out: dict[str, FileStat] = {}
        try:
            for i in range(0, len(fields) - 5, 6):
                out[fields[i]] = FileStat(int(fields[i + 1]), _ns(fields[i + 2]),
                                          int(fields[i + 3]), _ns(fields[i + 4]),
                                          int(fields[i + 5]))
        except (ValueError, InvalidOperation):
            raise RemoteError(f"{self.target}: unexpected reply listing "
                              f"{self._dir(sub)}") from None
        return out

    def dirs(self, sub: str = "") -> list[str]:
        return sorted(self._find(sub, "d", r"%f\0"))

    def mkdirs(self, *paths: str) -> None:
        if paths:
            run(self.target, ["mkdir", "-p", "--", *(self.path_of(p) for p in paths)])

    def link_all(self, pairs: list[tuple[str, str]]) -> None:
        for start_at in range(0, len(pairs), 200):  # bounded command lines
            args = [p for src, dst in pairs[start_at:start_at + 200]
                    for p in (self.path_of(src), self.path_of(dst))]
            run(self.target, ["sh", "-c", 'while [ "$#" -gt 1 ]; do ln -f -- "$1" "$2" || '
                              'exit 1; shift 2; done', "sh", *args])

    def symlink(self, target: str, path: str) -> None:
        if target.startswith("-"):
            raise BackupError(f"{target!r} is not a link target imagebuild writes")
        run(self.target, ["ln", "-sfn", "--", target, self.path_of(path)])

    def remove_tree(self, *paths: str) -> None:
        if paths:
            run(self.target, ["rm", "-rf", "--", *(self.path_of(p) for p in paths)])

    def stat(self, name: str) -> FileStat | None:
        parent, _, base = check_name(name).rpartition("/")
        return self.files(parent).get(base)

    def read_text(self, name: str) -> str | None:
        r = call(self.target, ["cat", "--", self.path_of(name)])
        if r.code == 0:
            return r.stdout
        if r.code == 1 and "No such file" in r.stderr:
            return None
        raise RemoteError(explain(self.target, r.code or 255, r.stderr))

    def write_text(self, name: str, text: str) -> None:
        run(self.target, ["sh", "-c", 'cat > "$1.tmp" && sync "$1.tmp" && mv -f "$1.tmp" "$1"',
                          "sh", self.path_of(name)], stdin=text.encode())

    def free_bytes(self) -> int:
        lines = run(self.target, ["df", "-P", "-B1", "--", self.location.path]).splitlines()
        try:
            return int(lines[-1].split()[3])
        except (IndexError, ValueError):
            raise RemoteError(f"{self.target}: unexpected reply from df: "
                              f"{last_line(' '.join(lines))!r}") from None

    def writer(self, name: str) -> Writer:
        return _SshWriter(self, name)

    def read(self, name: str, meter: Meter | None = None) -> Iterator[bytes]:
        # a FIFO would hold cat forever, a device would never end: regular files only
        guarded = ('if [ ! -f "$1" ]; then echo "$1: not a regular file" >&2; exit 3; fi; '
                   'exec cat -- "$1"')
        with reading(self.target, ["sh", "-c", guarded, "sh", self.path_of(name)]) as proc:
            assert proc.stdout is not None
            while chunk := proc.stdout.read(CHUNK):
                if meter is not None:
                    meter.add(len(chunk))
                yield chunk
        r = finish(proc)
        if r.code != 0:
            raise RemoteError(f"reading {self.target.host}:{self.path_of(name)} failed: "
                              f"{explain(self.target, r.code or 255, r.stderr)}")

    def sha256(self, name: str, meter: Meter | None = None) -> str:
        out = run(self.target, ["sha256sum", "--", self.path_of(name)], timeout=3600)
        digest = out.split(" ", 1)[0]
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise RemoteError(f"{self.target}: unexpected reply from sha256sum: {out[:80]!r}")
        return digest

    def link(self, src: str, dst: str) -> None:
        run(self.target, ["ln", "-f", "--", self.path_of(src), self.path_of(dst)])

    def rename(self, src: str, dst: str) -> None:
        run(self.target, ["mv", "-f", "-T", "--", self.path_of(src), self.path_of(dst)])

    def place(self, src: str, dst: str) -> bool:
        # ln without -f fails on an existing dst; exit 3 says it was there already
        r = call(self.target, ["sh", "-c", 'ln -T -- "$1" "$2" 2>/dev/null; placed=$?; '
                               'rm -f -- "$1" || exit 1; [ -e "$2" ] || exit 1; '
                               '[ "$placed" -eq 0 ] || exit 3', "sh",
                               self.path_of(src), self.path_of(dst)])
        if r.code not in (0, 3):
            raise RemoteError(explain(self.target, r.code or 255, r.stderr))
        return r.code == 0

    def remove(self, *names: str) -> None:
        if names:
            run(self.target, ["rm", "-f", "--", *(self.path_of(n) for n in names)])

    def not_directories(self, paths: Sequence[str], children_of: str) -> list[str]:
        # one round trip; test -L before -d (which follows links); find lists without
        # following them
        script = ('c=$1; shift; for p; do if [ -L "$p" ] || { [ -e "$p" ] && [ ! -d "$p" ]; }; '
                  'then printf "%s\\0" "$p"; fi; done; '
                  'if [ -d "$c" ] && [ ! -L "$c" ]; then '
                  'find "$c" -mindepth 1 -maxdepth 1 ! -type d -printf "%p\\0"; fi')
        out = run(self.target, ["sh", "-c", script, "sh", self.path_of(children_of),
                                *(self.path_of(p) for p in paths)])
        root = self.location.path + "/"
        found = [p.removeprefix(root) for p in out.split("\0")[:-1]]
        if any(p.startswith("/") for p in found):
            raise RemoteError(f"{self.target}: unexpected reply checking {self.location.path}")
        return found


def _ns(seconds: str) -> int:
    """find's %T@ / %C@ (seconds with a fraction) in nanoseconds, exactly."""
    return int(Decimal(seconds) * 1_000_000_000)


class _Aborting:
    """``with _Aborting(writer):`` aborts the writer when the block raises."""

    def __init__(self, writer: Writer) -> None:
        self.writer = writer

    def __enter__(self) -> Writer:
        return self.writer

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.writer.abort()


def writing(store: BackupDir, name: str) -> _Aborting:
    return _Aborting(store.writer(name))
