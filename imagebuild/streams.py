"""Checked byte streams: an archive described as pieces (ranges of open files and
literal bytes), read in chunks of at most 1 MiB so memory stays flat, each file range
with a sha256 hashed as it passes and its last chunk held back until the digest matched:
a damaged file stops the stream before its end, so what it feeds (``docker load``, an
upload) never completes with it.
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
    (see ``range_chunks``)."""

    file: PinnedFile
    offset: int
    length: int
    sha256: str | None = None
    label: str = ""  # what to call the file in an error (its path in the archive)


Piece = FileRange | bytes  # a range of a file, or literal bytes (headers, generated JSON)


def piece_size(piece: Piece) -> int:
    return piece.length if isinstance(piece, FileRange) else len(piece)


def _ended_early(r: FileRange, missing: int) -> BackupError:
    return BackupError(
        f"{r.label or r.file.path} ({r.file.path}) ended {missing} bytes before the "
        f"{r.length} it had when it was opened: it was truncated; nothing was loaded",
        hint="the file changed while it was read: run the command again, or restore from "
             "another copy")


def range_chunks(r: FileRange) -> Iterator[bytes]:
    """The bytes of ``r`` in chunks of at most 1 MiB. A range with ``sha256`` is hashed
    as it passes and its last chunk is yielded only after the digest matched: a damaged
    file raises ``BackupError`` before its end, so an archive that carries it is cut
    short and ``docker load`` loads nothing."""
    h = hashlib.sha256() if r.sha256 is not None else None
    held: bytes | None = None
    offset, left = r.offset, r.length
    while left > 0:
        chunk = os.pread(r.file.fd, min(left, CHUNK), offset)
        if not chunk:
            raise _ended_early(r, left)
        offset += len(chunk)
        left -= len(chunk)
        if h is None:
            yield chunk
            continue
        h.update(chunk)
        if held is not None:
            yield held
        held = chunk
    if h is not None and h.hexdigest() != r.sha256:
        raise BackupError(
            f"{r.label or r.file.path} ({r.file.path}) is damaged: its bytes do not have "
            f"the sha256 it is stored under; nothing was loaded\n"
            f"  expected sha256 {r.sha256}\n  actual   sha256 {h.hexdigest()}",
            hint=DAMAGED_HINT)
    if held is not None:
        yield held


def archive_chunks(pieces: Iterable[Piece], on_bytes: OnBytes | None = None
                   ) -> Iterator[bytes]:
    """The archive the pieces describe, in chunks of at most 1 MiB (memory stays flat).
    A file range with a sha256 is checked as it streams (``range_chunks``); on a
    mismatch the stream stops there, before the rest of the archive and its end."""
    sent = 0
    for piece in pieces:
        chunks = [piece] if isinstance(piece, bytes) else range_chunks(piece)
        for chunk in chunks:
            sent += len(chunk)
            if on_bytes is not None:
                on_bytes(sent)
            yield chunk
