"""Image archives (``docker save`` tars): read, checked against the image they claim to
hold, and checked again as they stream into ``docker load``.

Nothing an archive says is trusted before it is checked:

* ``ArchiveIndex.read`` indexes a backup tar through an open descriptor (a ``PinnedFile``;
  the same descriptor is later sent from) and validates its ``manifest.json``: one image,
  a config member, one layer file per layer of the config's ``rootfs``.
  ``ArchiveIndex.from_directory`` does the same for a generation directory of the backup
  layer store (docs/layer-store.md): a ``docker save`` layout on disk whose files must
  be exactly the ones its record lists, each with the sha256 it lists. Each file is
  opened once and becomes a member with a generated tar header; its bytes are checked
  against that sha256 whenever they are read (the small JSON files at once, the layers
  as they stream: ``engine.range_chunks``). ``ArchiveIndex.pieces`` composes either kind
  into the pieces of a tar stream (``engine.Piece``), with or without the first layers.
  ``ArchiveIndex.check`` then compares the archive's content fingerprint with the image's
  and refuses tags other than the ones allowed (``docker load`` applies ``RepoTags``:
  an archive must never move ``NAME:latest`` or name another image).
* ``TarGuard`` passes a tar stream through to ``docker load`` while hashing it and
  parsing its headers: it checks ``manifest.json`` (tags) before that member is released,
  and holds the tail of the stream back until the whole stream's size and sha256 match
  the sidecar and its config matches the expected fingerprint. A stream that fails any
  check is cut short, so ``docker load`` sees a truncated archive and loads nothing.
* ``SaveCheck`` follows a ``docker save`` stream while a backup is written and, at the
  end, proves it complete: every layer the manifest lists is in the archive and its
  content (decompressed, when the blob is gzip as on the containerd store) has the
  image's diff ID. ``docker save`` on the containerd store silently leaves out blobs
  missing from the content store (moby#49473); such a backup could never be restored.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import posixpath
import re
import stat
import tarfile
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BackupError
from .fsutil import PinnedFile
from .image import BadReply, fingerprint_of
from .streams import DAMAGED_HINT, FileRange, Piece

BLOCK = 512
SMALL = 4 << 20  # metadata members (manifest, config, index) are read whole below this
HOLD = 1 << 20  # bytes TarGuard keeps back until the end of the stream is checked
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
PIECE = 1 << 20  # layer files are read and hashed in pieces of this size
_META = ("manifest.json", "index.json", "repositories", "oci-layout")
_LAST = ("index.json", "manifest.json")  # a directory's members end with these, in this order
_HEX = re.compile(r"^[0-9a-f]{64}$")


def _is_meta(name: str) -> bool:
    return name in _META or name.endswith(".json")


def tar_header(name: str, size: int = 0, linkname: str = "") -> bytes:
    """The USTAR header of a regular file (or, with ``linkname``, a symbolic link) as
    imagebuild composes them: mode 0644, owner 0:0, mtime 0."""
    ti = tarfile.TarInfo(name)
    ti.mode, ti.mtime, ti.uid, ti.gid = 0o644, 0, 0, 0
    if linkname:
        ti.type, ti.linkname = tarfile.SYMTYPE, linkname
    else:
        ti.size = size
    return ti.tobuf(format=tarfile.USTAR_FORMAT)


def padding(size: int) -> bytes:
    """The zeros that fill a member's data up to the tar block size."""
    return b"\0" * ((-size) % BLOCK)


@dataclass(frozen=True)
class Member:
    """One member of an archive: of a tar (its header and data lie in ``file``, the tar,
    between ``offset`` and ``end``), or of a generation directory (its ``header`` made
    here, its data the whole of ``file``, which must hash to ``sha256``)."""

    name: str
    offset: int  # a tar member: start of its header block(s) in the tar (else 0)
    end: int  # a tar member: end of its data, padded to the block size (else 0)
    data_offset: int = 0
    size: int = 0
    link: str = ""  # a symlink's or hard link's target, as a member name
    file: PinnedFile | None = None  # where its bytes are (None: a directory's symlink)
    header: bytes | None = None  # a directory member's tar header (None: a tar member)
    sha256: str | None = None  # hex; a directory member's bytes must hash to it

    def data(self) -> FileRange:
        """The member's bytes as a range of its file (checked against its sha256 as they
        stream, when it has one)."""
        if self.file is None or self.link:
            raise BackupError(f"{self.name} is a link, not a file")
        return FileRange(self.file, self.data_offset, self.size, self.sha256, self.name)


@dataclass(frozen=True)
class Manifest:
    """The one entry of a ``docker save`` manifest.json, checked."""

    config: str
    layers: tuple[str, ...]
    repo_tags: tuple[str, ...]

    @classmethod
    def parse(cls, data: bytes, where: str) -> Manifest:
        entries = cls.parse_all(data, where)
        if len(entries) != 1:
            raise BackupError(f"{where} is not a single-image docker save archive")
        return entries[0]

    @classmethod
    def parse_all(cls, data: bytes, where: str) -> list[Manifest]:
        """Every entry of a manifest.json (an archive of one image or several)."""
        try:
            entries = json.loads(data)
        except ValueError:
            raise BackupError(f"{where}: manifest.json is not JSON") from None
        if not isinstance(entries, list) or not entries or not all(
                isinstance(e, dict) for e in entries):
            raise BackupError(f"{where}: manifest.json is not a list of images")
        return [cls._entry(e, where) for e in entries]

    @classmethod
    def _entry(cls, e: dict[str, Any], where: str) -> Manifest:
        config, layers, tags = e.get("Config"), e.get("Layers"), e.get("RepoTags") or []
        if not isinstance(config, str) or not config:
            raise BackupError(f"{where}: manifest.json names no config")
        for what, value in (("Layers", layers), ("RepoTags", tags)):
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                raise BackupError(f"{where}: manifest.json {what} is not a list of names")
        return cls(config, tuple(layers), tuple(tags))  # type: ignore[arg-type]


def config_fingerprint(config: bytes, where: str) -> tuple[str, tuple[str, ...]]:
    """The content fingerprint an image config (JSON) gives, and its layers' diff IDs."""
    try:
        data = json.loads(config)
    except ValueError:
        raise BackupError(f"{where}: the image config is not JSON") from None
    if not isinstance(data, dict):
        raise BackupError(f"{where}: the image config is not a JSON object")
    rootfs = data.get("rootfs") or {}
    cfg = data.get("config") or {}
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if (not isinstance(cfg, dict) or not isinstance(diff_ids, list)
            or not all(isinstance(d, str) for d in diff_ids)):
        raise BackupError(f"{where}: the image config has no rootfs.diff_ids or config")
    try:
        return fingerprint_of(tuple(diff_ids), cfg), tuple(diff_ids)
    except BadReply as exc:
        raise BackupError(f"{where}: the image config is malformed: {exc}") from None


def familiar(ref: str) -> str:
    """A reference as Docker shows it: ``docker.io/library/x:t`` is ``x:t`` (the
    containerd store writes the long form into an archive's index.json)."""
    if ref.startswith("docker.io/"):
        ref = ref[len("docker.io/"):]
        rest = ref[len("library/"):]
        if ref.startswith("library/") and "/" not in rest.split(":", 1)[0]:
            ref = rest
    return ref


def allowed_tags_error(tags: Iterable[str], allowed: set[str], where: str) -> BackupError | None:
    extra = sorted({familiar(t) for t in tags} - {familiar(a) for a in allowed})
    if not extra:
        return None
    return BackupError(
        f"{where} would tag {', '.join(extra)} when loaded, but it may only tag "
        f"{', '.join(sorted(allowed)) or 'nothing'}: refusing it; nothing was loaded",
        hint="a backup names its image only by NAME:<hash12>; latest moves only after the "
             "gate. Restore a tar imagebuild wrote, or rebuild")


def _damaged(where: str, m: Member, actual: str) -> BackupError:
    path = m.file.path if m.file is not None else where
    return BackupError(
        f"{m.name} ({path}) is damaged: its bytes do not have the sha256 it is stored "
        f"under; nothing was loaded\n  expected sha256 {m.sha256}\n  actual   sha256 "
        f"{actual}", hint=DAMAGED_HINT)


def _read_small(members: Iterable[Member], name: str, where: str) -> bytes | None:
    """The bytes of the regular member ``name`` when it is small (an OCI layout's config
    is ``blobs/sha256/<hex>``, not a ``.json`` name), read from its pinned descriptor and
    checked against its sha256 when it has one."""
    for m in members:
        if m.name == name and not m.link and m.file is not None and m.size < SMALL:
            data = os.pread(m.file.fd, m.size, m.data_offset)
            if len(data) != m.size:
                return None
            if m.sha256 is not None and hashlib.sha256(data).hexdigest() != m.sha256:
                raise _damaged(where, m, hashlib.sha256(data).hexdigest())
            return data
    return None


def _unique(files: Iterable[PinnedFile]) -> tuple[PinnedFile, ...]:
    return tuple({id(f): f for f in files}.values())


@dataclass(frozen=True)
class ArchiveIndex:
    """Where each member of a ``docker save`` archive lies (in a tar, or as the files of
    a generation directory), and which file is which layer."""

    where: str  # the tar's or the directory's path, for messages
    members: tuple[Member, ...]
    manifest: Manifest
    config: bytes  # the image config JSON (a few KB)
    fingerprint: str  # of the config: diff IDs and config
    diff_ids: tuple[str, ...]
    owned: tuple[PinnedFile, ...] = ()  # files this index opened: close() closes them

    @property
    def layers(self) -> tuple[str, ...]:
        return self.manifest.layers

    @property
    def repo_tags(self) -> tuple[str, ...]:
        return self.manifest.repo_tags

    @property
    def files(self) -> tuple[PinnedFile, ...]:
        """Every file the members' bytes are in: the tar, or the directory's files."""
        return _unique(m.file for m in self.members if m.file is not None)

    def changed(self) -> bool:
        """Whether any file of the archive was written to since it was opened. A file
        checked against its sha256 as it streams counts as changed only when its size or
        mtime moved (its ctime moves with every hard link made to it or removed)."""
        hashed = {id(m.file) for m in self.members if m.sha256 is not None}
        return any(f.changed(ctime=id(f) not in hashed) for f in self.files)

    def close(self) -> None:
        """Close the files this index opened (``from_directory``). The tar given to
        ``read`` belongs to the caller and stays open."""
        for f in self.owned:
            f.close()

    def __enter__(self) -> ArchiveIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def read(cls, file: PinnedFile) -> ArchiveIndex:
        """Index the tar open as ``file`` (which stays the caller's to close)."""
        where = str(file.path)
        members: list[Member] = []
        small: dict[str, bytes] = {}
        try:
            with os.fdopen(os.dup(file.fd), "rb") as fh, tarfile.open(fileobj=fh,
                                                                        mode="r:") as tf:
                for ti in tf:
                    data_end = ti.offset_data + -(-ti.size // BLOCK) * BLOCK
                    if data_end > file.size:
                        raise BackupError(f"{where} is truncated inside {ti.name}")
                    link = (os.path.normpath(os.path.join(os.path.dirname(ti.name),
                                                          ti.linkname))
                            if ti.issym() else ti.linkname if ti.islnk() else "")
                    members.append(Member(ti.name, ti.offset, data_end, ti.offset_data,
                                          ti.size, link, file))
                    if ti.isfile() and _is_meta(ti.name) and ti.size < SMALL:
                        f = tf.extractfile(ti)
                        assert f is not None
                        small[ti.name] = f.read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise BackupError(f"{where} is not a readable tar: {exc}") from None
        return cls._validated(where, members, small.get("manifest.json"), ())

    @classmethod
    def from_directory(cls, path: Path, files: dict[str, str], links: dict[str, str]
                       ) -> ArchiveIndex:
        """Index a generation directory: ``files`` maps the path (relative to ``path``)
        of every regular file it must hold to the sha256 (hex) its bytes must have,
        ``links`` every symbolic link to its target as stored (relative, as ``docker
        save`` writes it: ``../<v1 id>/layer.tar``). Anything else on disk, anything
        missing, and a link that leads out of the directory are refused. Each file is
        opened once (``close`` closes them); its bytes are checked against its sha256
        whenever they are read: the manifest and config here, the rest as they stream.
        Members are in name order, with ``index.json`` and ``manifest.json`` last, so a
        stream cut short never gives ``docker load`` a manifest."""
        where = str(path)
        on_disk, disk_links = _walk(path)
        _check_listing(where, files, links, on_disk, disk_links)
        members: list[Member] = []
        opened: list[PinnedFile] = []
        try:
            for name, digest in files.items():
                f = _open_regular(path, name, where)
                opened.append(f)
                members.append(Member(name, 0, 0, 0, f.size, file=f, sha256=digest,
                                      header=_header(where, name, f.size)))
            for name, target in links.items():
                members.append(Member(name, 0, 0, link=_link_target(name, target),
                                      header=_header(where, name, 0, target)))
            members.sort(key=lambda m: (m.name in _LAST, _LAST.index(m.name)
                                        if m.name in _LAST else 0, m.name))
            return cls._validated(where, members, None, tuple(opened))
        except BaseException:
            for f in opened:
                f.close()
            raise

    @classmethod
    def _validated(cls, where: str, members: list[Member], manifest_json: bytes | None,
                   owned: tuple[PinnedFile, ...]) -> ArchiveIndex:
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise BackupError(f"{where} holds a member name twice")
        if manifest_json is None:
            manifest_json = _read_small(members, "manifest.json", where)
        if manifest_json is None:
            raise BackupError(f"{where} is not a single-image docker save archive "
                              f"(no manifest.json)")
        manifest = Manifest.parse(manifest_json, where)
        config = _read_small(members, manifest.config, where)
        if config is None:
            raise BackupError(f"{where}: manifest.json names the config {manifest.config}, "
                              f"which the archive does not hold")
        fingerprint, diff_ids = config_fingerprint(config, where)
        if len(diff_ids) != len(manifest.layers):
            raise BackupError(f"{where}: manifest.json lists {len(manifest.layers)} layers, "
                              f"the config {len(diff_ids)}")
        index = cls(where=where, members=tuple(members), manifest=manifest, config=config,
                    fingerprint=fingerprint, diff_ids=diff_ids, owned=owned)
        for name in manifest.layers:
            index.member(name)  # every layer has a file, links resolved
        return index

    def check(self, fingerprint: str, allowed_tags: set[str]) -> None:
        """Refuse an archive that does not hold exactly the image with ``fingerprint``, or
        that would apply tags outside ``allowed_tags`` when loaded."""
        where = self.where
        if self.fingerprint != fingerprint:
            raise BackupError(f"{where} does not hold the image it is the backup of (its "
                              f"content fingerprint differs); nothing was sent",
                              hint="write the backup again: imagebuild backup NAME")
        err = allowed_tags_error(self.repo_tags, allowed_tags, where)
        if err is not None:
            raise err

    @functools.cached_property
    def _by_name(self) -> dict[str, Member]:
        return {m.name: m for m in self.members}

    def member(self, name: str) -> Member:
        """The member holding ``name``'s bytes (symlinks and hard links followed)."""
        by_name = self._by_name
        m = by_name.get(name)
        for _ in range(8):
            if m is None or not m.link:
                break
            m = by_name.get(m.link)
        if m is None or m.link or m.file is None:
            raise BackupError(f"{self.where}: no file for {name}")
        return m

    def layer_blob(self, index: int) -> tuple[str, str]:
        """(media type, digest) of layer ``index``'s file as the archive holds it: an
        uncompressed tar is named by its diff ID; a gzip or zstd blob (a containerd-store
        head's archive) by the digest of its compressed bytes (the sha256 a generation
        directory lists for it, its ``blobs/sha256/`` name, or hashed here when neither
        says)."""
        m = self.member(self.layers[index])
        f = m.data().file
        head = os.pread(f.fd, 4, m.data_offset) if m.size else b""
        if head[:2] == GZIP_MAGIC:
            media = "application/vnd.oci.image.layer.v1.tar+gzip"
        elif head[:4] == ZSTD_MAGIC:
            media = "application/vnd.oci.image.layer.v1.tar+zstd"
        else:
            return "application/vnd.oci.image.layer.v1.tar", self.diff_ids[index]
        if m.sha256 is not None:
            return media, "sha256:" + m.sha256
        base = m.name.rpartition("/")[2]
        if m.name.startswith("blobs/sha256/") and _HEX.match(base):
            return media, "sha256:" + base
        h = hashlib.sha256()
        for off in range(m.data_offset, m.data_offset + m.size, PIECE):
            h.update(os.pread(f.fd, min(PIECE, m.data_offset + m.size - off), off))
        return media, "sha256:" + h.hexdigest()

    def pieces(self, skip_layers: int) -> list[Piece]:
        """The archive (without its end-of-archive blocks) without the files of the
        first ``skip_layers`` layers. Taken from the manifest's layer list: a file that a
        later layer still needs (the same layer twice in one image: a link, or one blob
        named twice) stays. A tar's members are ranges of the tar (neighbours merged);
        a directory's are their header, the whole file (checked against its sha256 as it
        streams) and the padding."""
        needed = set()
        for name in self.layers[skip_layers:]:
            needed.add(name)
            needed.add(self.member(name).name)
        skip = {n for name in self.layers[:skip_layers]
                for n in (name, self.member(name).name)} - needed
        out: list[Piece] = []

        def literal(data: bytes) -> None:
            if not data:
                return
            last = out[-1] if out else None
            if isinstance(last, bytes):
                out[-1] = last + data
            else:
                out.append(data)

        for m in self.members:
            if m.name in skip:
                continue
            if m.header is not None:
                literal(m.header)
                if m.file is not None:
                    out.append(m.data())
                    literal(padding(m.size))
                continue
            assert m.file is not None  # a tar member lies in the tar
            last = out[-1] if out else None
            if (isinstance(last, FileRange) and last.file is m.file and last.sha256 is None
                    and last.offset + last.length == m.offset):
                out[-1] = FileRange(m.file, last.offset, m.end - last.offset)
            else:
                out.append(FileRange(m.file, m.offset, m.end - m.offset))
        return out


# -- a generation directory ---------------------------------------------------------------------


def _walk(root: Path) -> tuple[set[str], dict[str, str]]:
    """The regular files (relative paths) and the symbolic links (-> target) under
    ``root``; anything else is refused."""
    regular: set[str] = set()
    links: dict[str, str] = {}

    def visit(directory: str, prefix: str) -> None:
        with os.scandir(directory) as entries:
            for e in entries:
                name = prefix + e.name
                if e.is_symlink():
                    links[name] = os.readlink(e.path)
                elif e.is_dir(follow_symlinks=False):
                    visit(e.path, name + "/")
                elif e.is_file(follow_symlinks=False):
                    regular.add(name)
                else:
                    raise BackupError(f"{root} holds {name}, which is neither a file, a "
                                      f"directory nor a symbolic link: refusing it",
                                      hint=DAMAGED_HINT)

    try:
        visit(str(root), "")
    except OSError as exc:
        raise BackupError(f"{root} cannot be read as a backup generation: {exc}") from None
    return regular, links


def _is_relative_name(name: str) -> bool:
    return (bool(name) and not name.startswith("/") and posixpath.normpath(name) == name
            and name != "." and ".." not in name.split("/"))


def _link_target(name: str, target: str) -> str:
    """The member a symbolic link at ``name`` points to, or "" when it leads out of the
    directory (an absolute target, or one that climbs above it)."""
    if not target or target.startswith("/"):
        return ""
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
    return resolved if _is_relative_name(resolved) else ""


def _check_listing(where: str, files: dict[str, str], links: dict[str, str],
                   on_disk: set[str], disk_links: dict[str, str]) -> None:
    """Refuse a directory that is not exactly what its record lists."""
    def refuse(what: str) -> BackupError:
        return BackupError(f"{where}: {what}; refusing this backup generation",
                           hint=DAMAGED_HINT)

    for name, digest in files.items():
        if not _is_relative_name(name):
            raise refuse(f"its record lists {name!r}, which is not a path inside it")
        if not isinstance(digest, str) or not _HEX.match(digest):
            raise refuse(f"its record lists {digest!r} as the sha256 of {name}")
    for name, target in links.items():
        if not _is_relative_name(name):
            raise refuse(f"its record lists {name!r}, which is not a path inside it")
        if name in files:
            raise refuse(f"its record lists {name} both as a file and as a link")
        resolved = _link_target(name, target)
        if not resolved:
            raise refuse(f"the link {name} points to {target}, outside the directory")
        if resolved not in files and resolved not in links:
            raise refuse(f"the link {name} points to {target}, which is not in it")
    extra = sorted((on_disk | set(disk_links)) - set(files) - set(links))
    if extra:
        raise refuse(f"it holds {', '.join(extra[:3])}"
                     + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
                     + ", which its record does not list")
    missing = sorted((set(files) - on_disk) | (set(links) - set(disk_links)))
    if missing:
        raise refuse(f"{', '.join(missing[:3])}"
                     + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
                     + " is missing (or not of the kind its record says)")
    for name, target in links.items():
        if disk_links[name] != target:
            raise refuse(f"the link {name} points to {disk_links[name]}, but its record "
                         f"says {target}")


def _open_regular(root: Path, name: str, where: str) -> PinnedFile:
    try:
        f = PinnedFile.open(root / name, follow_symlinks=False)
    except OSError as exc:
        raise BackupError(f"{where}: {name} cannot be opened: {exc}; refusing this backup "
                          f"generation", hint=DAMAGED_HINT) from None
    if not stat.S_ISREG(os.fstat(f.fd).st_mode):
        f.close()
        raise BackupError(f"{where}: {name} is not a regular file; refusing this backup "
                          f"generation", hint=DAMAGED_HINT)
    return f


def _header(where: str, name: str, size: int, linkname: str = "") -> bytes:
    try:
        return tar_header(name, size, linkname)
    except ValueError as exc:
        raise BackupError(f"{where}: {name} cannot be put in a tar header: {exc}") from None


# -- proving a saved archive complete -----------------------------------------------------------



def content_digest(read: Callable[[int], bytes]) -> tuple[str, str]:
    """(kind, sha256 of the content) of one layer file read in pieces: ``raw`` (an
    uncompressed tar: the file's own digest), ``gzip`` (decompressed, members in
    sequence), or ``zstd`` (not checkable here: the digest is the compressed one)."""
    first = read(PIECE)
    h = hashlib.sha256()
    if first[:2] == GZIP_MAGIC:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        piece = first
        while piece:
            data = piece
            while data:  # output in bounded pieces; members one after another
                h.update(d.decompress(data, PIECE))
                if d.eof:
                    data, d = d.unused_data, zlib.decompressobj(16 + zlib.MAX_WBITS)
                else:
                    data = d.unconsumed_tail
            piece = read(PIECE)
        h.update(d.flush())
        return "gzip", "sha256:" + h.hexdigest()
    kind = "zstd" if first[:4] == ZSTD_MAGIC else "raw"
    piece = first
    while piece:
        h.update(piece)
        piece = read(PIECE)
    return kind, "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class _Seen:
    kind: str = ""  # raw, gzip or zstd; "" for a link
    digest: str = ""
    link: str = ""


class SaveCheck:
    """Follows a ``docker save`` stream as it is written (``write`` each chunk), reading
    it as a tar on a thread of its own; ``finish`` then refuses an archive that does not
    hold every layer of the image with its diff ID. Memory stays flat: a pipe between
    the two, layer files hashed in pieces. ``diff_ids``: the one image's layers, or for
    an archive of several images their layers by the tag each was saved as."""

    def __init__(self, where: str, diff_ids: tuple[str, ...] | dict[str, tuple[str, ...]]
                 ) -> None:
        self.where, self.diff_ids = where, diff_ids
        self.seen: dict[str, _Seen] = {}
        self.metas: dict[str, bytes] = {}
        self.error: BaseException | None = None
        r, w = os.pipe()
        self._w: int | None = w
        self._thread = threading.Thread(target=self._read, args=(r,), daemon=True,
                                        name="save-check")
        self._thread.start()

    def write(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view and self._w is not None:
            view = view[os.write(self._w, view):]

    def close(self) -> None:
        if self._w is not None:
            os.close(self._w)
            self._w = None
        self._thread.join()

    def _read(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as fh:
            try:
                with tarfile.open(fileobj=fh, mode="r|") as tf:
                    for ti in tf:
                        self._member(tf, ti)
            except BaseException as exc:  # reported by finish(), never lost
                self.error = exc
            while fh.read(PIECE):  # the writer never blocks on a reader that stopped
                pass

    def _member(self, tf: tarfile.TarFile, ti: tarfile.TarInfo) -> None:
        if ti.issym() or ti.islnk():
            target = (os.path.normpath(os.path.join(os.path.dirname(ti.name), ti.linkname))
                      if ti.issym() else ti.linkname)
            self.seen[ti.name] = _Seen(link=target)
            return
        if not ti.isfile():
            return
        f = tf.extractfile(ti)
        assert f is not None
        if _is_meta(ti.name) and ti.size < SMALL:
            self.metas[ti.name] = f.read()
            return
        if ti.size < SMALL:  # an OCI config is blobs/sha256/<hex>: keep small JSON objects
            data = f.read()
            if data[:1] == b"{":
                self.metas[ti.name] = data
            f = io.BytesIO(data)
        try:
            kind, digest = content_digest(f.read)
        except zlib.error:
            kind, digest = "gzip", "not valid gzip"
        self.seen[ti.name] = _Seen(kind, digest)

    def _resolve(self, name: str) -> _Seen | None:
        s = self.seen.get(name)
        for _ in range(8):
            if s is None or not s.link:
                break
            s = self.seen.get(s.link)
        return None if s is None or s.link else s

    def finish(self) -> None:
        """Raise ``BackupError`` unless the archive holds every layer of the image."""
        self.close()
        where = self.where
        if self.error is not None:
            raise BackupError(f"the archive written to {where} is not a readable tar: "
                              f"{self.error}; nothing was replaced") from None
        if "manifest.json" not in self.metas:
            raise self._incomplete(["manifest.json is not in it"])
        if not isinstance(self.diff_ids, dict):
            self._check_image(Manifest.parse(self.metas["manifest.json"], where),
                              self.diff_ids)
            return
        entries = Manifest.parse_all(self.metas["manifest.json"], where)
        for tag, diff_ids in self.diff_ids.items():
            entry = next((e for e in entries if tag in map(familiar, e.repo_tags)), None)
            if entry is None:
                raise self._incomplete([f"{tag} is not in it"])
            self._check_image(entry, diff_ids)

    def _check_image(self, manifest: Manifest, expected: tuple[str, ...]) -> None:
        where = self.where
        config = self.metas.get(manifest.config)
        if config is None:
            raise self._incomplete([f"its image config ({manifest.config}) is not in it"])
        _, diff_ids = config_fingerprint(config, where)
        if diff_ids != expected or len(manifest.layers) != len(diff_ids):
            raise BackupError(f"the archive written to {where} does not describe the image "
                              f"that was saved (its layers differ); nothing was replaced")
        missing: list[str] = []
        for i, (name, diff_id) in enumerate(zip(manifest.layers, diff_ids, strict=True), 1):
            got = self._resolve(name)
            if got is None:
                missing.append(f"layer {i} of {len(diff_ids)} ({diff_id[:19]}, file {name}) "
                               f"is not in it")
            elif got.kind == "zstd":
                missing.append(f"layer {i} ({name}) is zstd-compressed, which imagebuild "
                               f"cannot check")
            elif got.digest != diff_id:
                missing.append(f"layer {i} ({name}) holds other content than {diff_id[:19]}")
        if missing:
            raise self._incomplete(missing)

    def _incomplete(self, missing: list[str]) -> BackupError:
        return incomplete_save(
            self.where, missing,
            hint="on the containerd image store 'docker save' leaves out blobs that are "
                 "missing from the content store (moby#49473). Rebuild the image "
                 "(imagebuild build --rebuild NAME) or load it again from a good archive "
                 "so its blobs are complete, then run imagebuild backup NAME")


def incomplete_save(where: str, missing: list[str], hint: str) -> BackupError:
    """A saved archive that lacks what ``missing`` lists: never kept."""
    return BackupError(
        f"the archive docker saved for {where} is incomplete, so it could not be "
        f"restored: " + "; ".join(missing[:3])
        + (f"; and {len(missing) - 3} more" if len(missing) > 3 else "")
        + ". It was not kept; the previous backup is still in place", hint=hint)


# -- checking a stream -------------------------------------------------------------------------


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # base-256, for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big") | ((field[0] & 0x7F) << (8 * (len(field) - 1)))
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode(errors="replace")] = value.decode(errors="replace")
        pos += length
    return out


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
                if header[257:262] == b"ustar":
                    prefix = header[345:500].split(b"\0", 1)[0]
                    raw = prefix + b"/" + raw if prefix else raw
                name = self.next_name or raw.decode(errors="replace")
                if flag not in (b"x", b"g", b"L"):
                    self.next_name = None
                regular = flag in (b"0", b"\0") and size < SMALL
                meta = regular and _is_meta(name)
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
            index: Any = json.loads(data)
            manifests = index.get("manifests") or []
            return [str(v) for m in manifests for k, v in (m.get("annotations") or {}).items()
                    if k in ("io.containerd.image.name", "org.opencontainers.image.ref.name")
                    and ":" in str(v)]
        except (ValueError, AttributeError):
            raise BackupError(f"{where}: index.json is malformed") from None
    return []
