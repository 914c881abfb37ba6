"""A backup as one tar file beside its sidecar (``NAME.tar`` + ``NAME.tar.json``): how
imagebuild kept backups before the layer store, and how the tars given to
``restore-from-tar --file`` are checked.

Nothing such a tar says is trusted before it is checked. ``guard`` passes its bytes
through to ``docker load`` while hashing them and parsing the tar headers (``TarGuard``):
``manifest.json`` and ``index.json`` (the tags ``docker load`` would apply) are checked
before they are released, and the tail of the stream is held back until the whole
stream's size and sha256 match the sidecar and its config has the content fingerprint
the sidecar names. A stream that fails any check is cut short, so ``docker load`` sees a
truncated archive and loads nothing.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from . import __version__
from .archive import (
    BLOCK,
    SMALL,
    Manifest,
    allowed_tags_error,
    config_fingerprint,
    is_meta,
)
from .errors import BackupError
from .layerstore import json_fields, sidecar_json
from .naming import hash12
from .store import BackupDir
from .untrusted import loads_json

HOLD = 1 << 20  # bytes TarGuard keeps back until the end of the stream is checked


@dataclass(frozen=True)
class Sidecar:
    """The sidecar of a tar backup (``NAME.tar.json``), as written before the layer store."""

    image: str
    image_id: str
    fingerprint: str
    input_hash: str | None
    tags: list[str]
    size: int
    sha256: str
    created: str
    mtime_ns: int
    tool_version: str = __version__
    ino: int = 0  # the file's inode and ctime when it was written and hashed (0: unknown)
    ctime_ns: int = 0

    def to_json(self) -> str:
        return sidecar_json(self)

    @classmethod
    def from_json(cls, text: str) -> Sidecar:
        sc = cls(**json_fields(cls, text))
        ints = (sc.size, sc.mtime_ns, sc.ino, sc.ctime_ns)
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 or v >= 1 << 64
               for v in ints):
            raise ValueError("size, mtime_ns, ino and ctime_ns must be whole numbers "
                             "below 2**64")
        strs = (sc.image, sc.image_id, sc.fingerprint, sc.sha256, sc.created, sc.tool_version)
        if not all(isinstance(v, str) for v in strs):
            raise ValueError("image, image_id, fingerprint, sha256, created and tool_version "
                             "must be strings")
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", sc.fingerprint):
            raise ValueError("fingerprint is not a content fingerprint")
        if not isinstance(sc.tags, list) or not all(isinstance(t, str) for t in sc.tags):
            raise ValueError("tags must be a list of strings")
        if sc.input_hash is not None and not isinstance(sc.input_hash, str):
            raise ValueError("input_hash must be a string or null")
        if not re.fullmatch(r"[0-9a-f]{64}", sc.sha256):
            raise ValueError("sha256 is not a sha256 hex digest")
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", sc.image_id):
            raise ValueError("image_id is not an image ID")
        if sc.input_hash is not None and not re.fullmatch(r"[0-9a-f]{64}", sc.input_hash):
            raise ValueError("input_hash is not a sha256 hex digest")
        if not re.fullmatch(r"[a-z0-9]+(?:[._-][a-z0-9]+)*", sc.image):
            raise ValueError("image is not an image name")
        return sc

    @property
    def hash_tag(self) -> str | None:
        """The one tag a backup may carry: ``NAME:<hash12>``."""
        return f"{self.image}:{hash12(self.input_hash)}" if self.input_hash else None


def tar_name(name: str) -> str:
    return f"{name}.tar"


def sidecar_name(tar: str) -> str:
    return f"{tar}.json"


def read_sidecar(store: BackupDir, tar: str) -> Sidecar | None:
    text = store.read_text(sidecar_name(tar))
    if text is None:
        return None
    try:
        return Sidecar.from_json(text)
    except (ValueError, TypeError) as exc:
        raise BackupError(f"{store}/{sidecar_name(tar)} is not a valid backup sidecar: {exc}",
                          hint="remove it and run 'imagebuild backup' again") from None


def legacy_tars(store: BackupDir, name: str) -> list[str]:
    """Tar backups of ``name`` from before the layer store (``NAME.tar``, then
    ``NAME@<hash12>.tar`` newest first) that have a sidecar."""
    files = store.files()
    old = sorted((f for f in files if f.startswith(f"{name}@") and f.endswith(".tar")),
                 key=lambda f: files[f].mtime_ns, reverse=True)
    return [t for t in [tar_name(name), *old] if t in files and sidecar_name(t) in files]


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # base-256, for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big") | ((field[0] & 0x7F) << (8 * (len(field) - 1)))
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax(data: bytes) -> dict[str, str]:
    """The records of a pax header ("LEN key=value\n" each). Raises ValueError on a
    record whose length does not cover itself or runs past the header (a zero-length
    record would otherwise never advance)."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        end = pos + length
        if end <= space + 1 or end > len(data) or data[end - 1:end] != b"\n":
            raise ValueError(f"a record of length {length} at {pos}")
        key, eq, value = data[space + 1:end - 1].partition(b"=")
        if not eq:
            raise ValueError(f"a record without '=' at {pos}")
        out[key.decode(errors="replace")] = value.decode(errors="replace")
        pos = end
    return out


# What a docker save archive holds (classic: <id>/layer.tar, <id>/json, <id>/VERSION,
# <config>.json; OCI layout: blobs/sha256/<digest>, index.json, oci-layout; both:
# manifest.json, repositories), by name after normalising ("./x" and "a/../x" are "x")
_FILE = re.compile(r"manifest\.json|index\.json|repositories|oci-layout|[0-9a-f]{64}\.json"
                   r"|[0-9a-f]{64}/(?:layer\.tar|json|VERSION)|blobs/sha256/[0-9a-f]{64}")
_DIRECTORY = re.compile(r"\.|[0-9a-f]{64}|blobs|blobs/sha256")
# docker 20.10 writes a layer saved twice as a link to the first file; newer ones may
# point a layer directory at its blob
_LINK = re.compile(r"[0-9a-f]{64}/layer\.tar")
_LINK_TARGET = re.compile(r"[0-9a-f]{64}/layer\.tar|blobs/sha256/[0-9a-f]{64}")
REFUSED_HINT = ("imagebuild loads only what docker save writes: regular files under their "
                "own names (no name twice), the directories, a layer linked to another "
                "(and a file hard-linked to one before it, as tar writes them); "
                "save the image again with 'docker save', or load it with 'restore-from-tar "
                "--file X.tar --adopt' if it is a tar of the field's")


class TarGuard:
    """Checks a tar stream while it passes through (see the module's text).

    ``check_meta(name, data)`` is called for each small metadata member as soon as it is
    complete (raise to refuse); ``finish(metas)`` once at the end with all of them. The
    bytes of a metadata member are held back until it was checked, and the last ``HOLD``
    bytes until the end was.
    """

    def __init__(self, where: str, size: int, sha256: str,
                 check_meta: Callable[[str, bytes], None],
                 finish: Callable[[dict[str, bytes]], None]) -> None:
        self.where, self.size, self.sha256 = where, size, sha256
        self.check_meta, self.finish = check_meta, finish
        self.hash = hashlib.sha256()
        self.seen = 0  # absolute offset of the end of what was received
        self.pending = bytearray()  # received, not yet released
        self.released = 0  # absolute offset released so far
        self.parsed = 0  # next header starts here (or the current member's data ends here)
        self.hold_from: int | None = None  # a metadata member starts here: hold it back
        # the member being walked: (name, typeflag, data start, data size); None: a header
        self.current: tuple[str, bytes, int, int] | None = None
        self.metas: dict[str, bytes] = {}
        self.capture: bytearray | None = None
        self.maybe_json = False  # the member captured is a small blob, kept if JSON
        self.next_name: str | None = None  # from a pax or GNU long-name header
        self.next_link: str | None = None  # from a pax header's linkpath
        self.names: set[str] = set()  # every member's name so far, normalised
        self.files: set[str] = set()  # of them, the regular files (what a hard link may name)

    def feed(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.seen += len(chunk)
            if self.seen > self.size:
                raise BackupError(f"{self.where} is longer than its sidecar says "
                                  f"({self.size} bytes); nothing was loaded")
            self.hash.update(chunk)
            self.pending += chunk
            self._walk()
            out = self._releasable()
            if out:
                yield out
        if self.seen != self.size:
            raise BackupError(f"{self.where} is {self.seen} bytes but its sidecar says "
                              f"{self.size}: truncated or altered; nothing was loaded")
        actual = self.hash.hexdigest()
        if actual != self.sha256:
            raise BackupError(
                f"{self.where} does not match its sidecar; nothing was loaded\n"
                f"  expected sha256 {self.sha256}\n  actual   sha256 {actual}",
                hint="the file is corrupt: restore an older generation with --file, or "
                     "rebuild")
        if self.current is not None:
            raise BackupError(f"{self.where} ends inside {self.current[0]}")
        self.finish(self.metas)
        if self.pending:
            yield bytes(self.pending)
            self.pending.clear()

    def _releasable(self) -> bytes:
        limit = self.seen - HOLD
        if self.hold_from is not None:
            limit = min(limit, self.hold_from)
        n = limit - self.released
        if n <= 0:
            return b""
        out = bytes(self.pending[:n])
        del self.pending[:n]
        self.released += n
        return out

    def _bytes(self, offset: int, length: int) -> bytes:
        start = offset - self.released
        assert start >= 0, "walked bytes were released"
        return bytes(self.pending[start:start + length])

    def _walk(self) -> None:
        """Advance through headers and data as far as the bytes received allow."""
        while True:
            if self.current is None:  # a header
                if self.seen - self.parsed < BLOCK:
                    return
                start = self.parsed
                header = self._bytes(start, BLOCK)
                self.parsed += BLOCK
                if header == b"\0" * BLOCK:
                    continue  # the end-of-archive blocks
                try:
                    size = _octal(header[124:136])
                except ValueError:
                    raise BackupError(f"{self.where}: a tar header is corrupt") from None
                flag = header[156:157]
                raw = header[0:100].split(b"\0", 1)[0]
                if header[257:263] == b"ustar\0":  # POSIX ustar: a GNU header has no prefix
                    prefix = header[345:500].split(b"\0", 1)[0]
                    raw = prefix + b"/" + raw if prefix else raw
                name = self.next_name or raw.decode(errors="replace")
                if flag not in (b"x", b"L"):
                    link = self.next_link or header[157:257].split(b"\0", 1)[0].decode(
                        errors="replace")
                    self.next_name = self.next_link = None
                    name = self._admit(name, flag, size, link)
                regular = flag in (b"0", b"\0") and size < SMALL
                meta = regular and is_meta(name)
                # an OCI layout names its config blobs/sha256/<hex>: keep any small JSON
                # object (decided on its first byte) so finish() can find the config
                self.maybe_json = regular and not meta and size > 0
                self.capture = (bytearray() if flag in (b"x", b"L") or meta
                                or self.maybe_json else None)
                if meta and self.hold_from is None:
                    self.hold_from = start
                self.current = (name, flag, self.parsed, size)
                self.parsed += -(-size // BLOCK) * BLOCK
                continue
            name, flag, data_start, size = self.current
            if self.capture is not None:
                have = min(self.seen, data_start + size) - (data_start + len(self.capture))
                if have > 0:
                    self.capture += self._bytes(data_start + len(self.capture), have)
                if self.maybe_json and self.capture and self.capture[:1] != b"{":
                    self.capture = None  # a layer, not a JSON document
            if self.seen < self.parsed:
                return
            self.current = None
            self._member_done(name, flag)

    def _admit(self, name: str, flag: bytes, size: int, link: str) -> str:
        """A member's name, normalised, if a docker save archive can hold it as this kind
        of member; else the stream is refused (what docker load would read under a name
        the checks never saw: a second manifest.json as ./manifest.json, a link named
        manifest.json, one too large to check)."""
        norm = posixpath.normpath(name) if name else ""
        what = f"{self.where}: the member {name[:200]!r}"
        if not norm or name.startswith("/") or norm == ".." or norm.startswith("../"):
            raise BackupError(f"{what} is not a name inside the archive; nothing was loaded",
                              hint=REFUSED_HINT)
        if norm in self.names:
            raise BackupError(f"{what} is a second member named {norm}; nothing was loaded",
                              hint=REFUSED_HINT)
        self.names.add(norm)
        if flag in (b"0", b"\0"):
            self.files.add(norm)
            if not _FILE.fullmatch(norm):
                raise BackupError(f"{what} is not a file docker save writes; nothing was "
                                  f"loaded", hint=REFUSED_HINT)
            if is_meta(norm) and size >= SMALL:
                raise BackupError(f"{what} is {size} bytes, more than imagebuild reads to "
                                  f"check it ({SMALL} bytes); nothing was loaded",
                                  hint=REFUSED_HINT)
        elif flag == b"5":
            if not _DIRECTORY.fullmatch(norm):
                raise BackupError(f"{what} is not a directory docker save writes; nothing "
                                  f"was loaded", hint=REFUSED_HINT)
        elif flag == b"2":
            target = posixpath.normpath(posixpath.join(posixpath.dirname(norm), link))
            if not _LINK.fullmatch(norm) or not _LINK_TARGET.fullmatch(target):
                raise BackupError(f"{what} is a link to {link[:200]!r}, not a layer linked to "
                                  f"another; nothing was loaded", hint=REFUSED_HINT)
        elif flag == b"1":  # tar of a directory writes a file again as a hard link to it
            target = posixpath.normpath(link)
            if not _FILE.fullmatch(norm) or is_meta(norm) or target not in self.files:
                raise BackupError(f"{what} is a hard link to {link[:200]!r}: only a file "
                                  f"docker save writes may be one, to a file before it; "
                                  f"nothing was loaded", hint=REFUSED_HINT)
        else:
            kinds = {b"3": "a device", b"4": "a device", b"6": "a FIFO",
                     b"g": "a global pax header", b"K": "a GNU long link name"}
            raise BackupError(f"{what} is {kinds.get(flag, f'of type {flag!r}')}, which docker "
                              f"save never writes; nothing was loaded", hint=REFUSED_HINT)
        return norm

    def _member_done(self, name: str, flag: bytes) -> None:
        data = bytes(self.capture) if self.capture is not None else None
        self.capture = None
        if data is None:
            return
        if flag == b"x":
            try:
                pax = _pax(data)
            except ValueError:
                raise BackupError(f"{self.where}: a pax header is corrupt") from None
            self.next_name = pax.get("path", self.next_name)
            self.next_link = pax.get("linkpath", self.next_link)
            return
        if flag == b"L":
            self.next_name = data.split(b"\0", 1)[0].decode(errors="replace")
            return
        self.metas[name] = data
        if self.maybe_json:
            return
        self.check_meta(name, data)
        self.hold_from = None


def manifest_tags(name: str, data: bytes, where: str) -> list[str]:
    """The tags ``docker load`` would apply from a metadata member (manifest.json's
    RepoTags; index.json's image-name annotations), for checking before it passes."""
    if name == "manifest.json":
        return list(Manifest.parse(data, where).repo_tags)
    if name == "index.json":
        try:
            index: Any = loads_json(data)
            manifests = index.get("manifests") or []
            return [str(v) for m in manifests for k, v in (m.get("annotations") or {}).items()
                    if k in ("io.containerd.image.name", "org.opencontainers.image.ref.name")
                    and ":" in str(v)]
        except (ValueError, AttributeError):
            raise BackupError(f"{where}: index.json is malformed") from None
    return []


def guard(where: str, sidecar: Sidecar) -> TarGuard:
    """The checks a backup tar passes on its way into ``docker load``: its size and
    sha256 (the sidecar's), the tags it would apply (only the sidecar's hash tag), and its
    config (the sidecar's content fingerprint)."""
    allowed = {sidecar.hash_tag} if sidecar.hash_tag else set()

    def check_meta(name: str, data: bytes) -> None:
        err = allowed_tags_error(manifest_tags(name, data, where), allowed, where)
        if err is not None:
            raise err

    def finish(metas: dict[str, bytes]) -> None:
        if "manifest.json" not in metas:
            raise BackupError(f"{where} is not a docker save archive (no manifest.json); "
                              f"nothing was loaded")
        manifest = Manifest.parse(metas["manifest.json"], where)
        config = metas.get(manifest.config)
        if config is None:
            raise BackupError(f"{where}: its config {manifest.config} is missing")
        fingerprint, diff_ids = config_fingerprint(config, where)
        if fingerprint != sidecar.fingerprint or len(diff_ids) != len(manifest.layers):
            raise BackupError(f"{where} does not hold the image its sidecar names (the "
                              f"content fingerprint differs); nothing was loaded")

    return TarGuard(where, sidecar.size, sidecar.sha256, check_meta, finish)
