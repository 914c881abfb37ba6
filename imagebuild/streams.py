"""Checked byte streams: an archive described as pieces (ranges of open files, whole
files of a backup store on another host, and literal bytes), read in chunks of at most
1 MiB so memory stays flat, each file with a sha256 hashed as it passes and its last
chunk held back until the digest matched: a damaged file stops the stream before its
end, so what it feeds (``docker load``, an upload) never completes with it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from .errors import BackupError
from .fsutil import PinnedFile

CHUNK = 1 << 20

OnBytes = Callable[[int], None]  # bytes sent so far
DAMAGED_HINT = ("rebuild the image, or restore it from another copy; "
                "'imagebuild backup --check' lists every damaged layer")


@dataclass(frozen=True)
class FileRange:
    """``length`` bytes of ``file`` from ``offset``, read through its open descriptor.

    With ``sha256`` (hex) the range is the whole file, whose bytes must hash to it: they
    are hashed as they stream, and the last chunk is held back until the digest matched
    (see ``piece_chunks``)."""

    file: PinnedFile
    offset: int
    length: int
    sha256: str | None = None
    label: str = ""  # what to call the file in an error (its path in the archive)

    @property
    def where(self) -> str:
        return f"{self.label or self.file.path} ({self.file.path})"


@dataclass(frozen=True)
class StoredFile:
    """A whole file of a backup store that is not on this host (``ssh://``), read through
    the store (``read()`` starts a fresh read) and checked against ``sha256`` and
    ``length`` as it streams, like a ``FileRange`` with a sha256."""

    read: Callable[[], Iterable[bytes]]
    length: int
    sha256: str
    label: str  # its path in the archive
    location: str  # where it is (an ssh:// URL), for errors

    @property
    def where(self) -> str:
        return self.location


Piece = FileRange | StoredFile | bytes  # a file's bytes, or literal (headers, generated JSON)


def piece_size(piece: Piece) -> int:
    return len(piece) if isinstance(piece, bytes) else piece.length


def _ended_early(where: str, length: int, missing: int) -> BackupError:
    return BackupError(
        f"{where} ended {missing} bytes before the {length} it had when it was opened: it "
        f"was truncated; nothing was loaded",
        hint="the file changed while it was read: run the command again, or restore from "
             "another copy")


class DamagedBytes(BackupError):
    """A file's bytes did not match the sha256 (or size) it is stored under; ``label``
    names it in its archive, ``got`` says what came instead."""

    def __init__(self, where: str, label: str, expected: str, actual: str, got: int,
                 length: int) -> None:
        size = "" if got == length else f" ({got} bytes, not {length})"
        super().__init__(
            f"{where} is damaged{size}: its bytes do not have the sha256 it is stored "
            f"under; nothing was loaded\n  expected sha256 {expected}\n  actual   sha256 "
            f"{actual}", hint=DAMAGED_HINT)
        self.label = label
        self.got = f"{got} bytes, sha256 {actual[:12]}"


def _file_chunks(r: FileRange) -> Iterator[bytes]:
    offset, left = r.offset, r.length
    while left > 0:
        chunk = os.pread(r.file.fd, min(left, CHUNK), offset)
        if not chunk:
            raise _ended_early(r.where, r.length, left)
        offset += len(chunk)
        left -= len(chunk)
        yield chunk


def checked(chunks: Iterable[bytes], sha256: str, length: int, where: str, label: str
            ) -> Iterator[bytes]:
    """``chunks`` hashed as they pass, the last one held back until their sha256 and
    length matched: damaged bytes raise ``BackupError`` before their end, so an archive
    that carries them is cut short and ``docker load`` loads nothing."""
    h = hashlib.sha256()
    held: bytes | None = None
    got = 0
    for chunk in chunks:
        h.update(chunk)
        got += len(chunk)
        if got > length:  # longer than recorded (a link to /dev/zero): stop reading now
            raise DamagedBytes(where, label, sha256, h.hexdigest(), got, length)
        if held is not None:
            yield held
        held = chunk
    if got != length or h.hexdigest() != sha256:
        raise DamagedBytes(where, label, sha256, h.hexdigest(), got, length)
    if held is not None:
        yield held


def piece_chunks(piece: Piece) -> Iterator[bytes]:
    """The bytes of one piece in chunks of at most 1 MiB; a file with a sha256 checked as
    it passes (``checked``)."""
    if isinstance(piece, bytes):
        if piece:
            yield piece
    elif isinstance(piece, StoredFile):
        yield from checked(piece.read(), piece.sha256, piece.length, piece.where,
                           piece.label)
    elif piece.sha256 is None:
        yield from _file_chunks(piece)
    else:
        yield from checked(_file_chunks(piece), piece.sha256, piece.length, piece.where,
                           piece.label)


def archive_chunks(pieces: Iterable[Piece], on_bytes: OnBytes | None = None
                   ) -> Iterator[bytes]:
    """The archive the pieces describe, in chunks of at most 1 MiB (memory stays flat).
    A file with a sha256 is checked as it streams; on a mismatch the stream stops there,
    before the rest of the archive and its end."""
    sent = 0
    for piece in pieces:
        for chunk in piece_chunks(piece):
            sent += len(chunk)
            if on_bytes is not None:
                on_bytes(sent)
            yield chunk
