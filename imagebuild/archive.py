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
  as they stream: ``engine.piece_chunks``). ``ArchiveIndex.pieces`` composes either kind
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

import dataclasses
import functools
import hashlib
import io
import os
import posixpath
import re
import stat
import tarfile
import threading
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BackupError
from .fsutil import PinnedFile
from .image import BadReply, fingerprint_of
from .streams import DAMAGED_HINT, FileRange, Piece, StoredFile, piece_chunks
from .untrusted import loads_json

BLOCK = 512
SMALL = 4 << 20  # metadata members (manifest, config, index) are read whole below this
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
PIECE = 1 << 20  # layer files are read and hashed in pieces of this size
_META = ("manifest.json", "index.json", "repositories", "oci-layout")
_LAST = ("index.json", "manifest.json")  # a directory's members end with these, in this order
_HEX = re.compile(r"^[0-9a-f]{64}\Z")


TRAILER = b"\0" * (2 * BLOCK)  # the end of a tar archive


def is_meta(name: str) -> bool:
    return name in _META or name.endswith(".json")


USTAR_MAX_SIZE = 8 ** 11 - 1  # 8 GiB: a USTAR header's size field holds no more


def tar_header(name: str, size: int = 0, linkname: str = "") -> bytes:
    """The header of a regular file (or, with ``linkname``, a symbolic link) as imagebuild
    composes them: mode 0644, owner 0:0, mtime 0; USTAR, or for a file of 8 GiB and more
    (a CUDA layer can be) the GNU header that writes the size in base 256, one block all
    the same, as docker's own tar writer does. ValueError for a name or size no header
    holds."""
    ti = tarfile.TarInfo(name)
    ti.mode, ti.mtime, ti.uid, ti.gid = 0o644, 0, 0, 0
    if linkname:
        ti.type, ti.linkname = tarfile.SYMTYPE, linkname
    else:
        ti.size = size
    if size > USTAR_MAX_SIZE:
        header = ti.tobuf(format=tarfile.GNU_FORMAT)
        if len(header) != BLOCK:
            raise ValueError(f"{name!r} does not fit one GNU header")
        return header
    return ti.tobuf(format=tarfile.USTAR_FORMAT)


def padding(size: int) -> bytes:
    """The zeros that fill a member's data up to the tar block size."""
    return b"\0" * ((-size) % BLOCK)


@dataclass(frozen=True)
class Member:
    """One member of an archive: of a tar (its header and data lie in ``file``, the tar,
    between ``offset`` and ``end``), or of a backup generation (its ``header`` made
    here, its data the whole of ``file``, or, in a store on another host, ``stored``;
    either must hash to ``sha256``)."""

    name: str
    offset: int  # a tar member: start of its header block(s) in the tar (else 0)
    end: int  # a tar member: end of its data, padded to the block size (else 0)
    data_offset: int = 0
    size: int = 0
    link: str = ""  # a symlink's or hard link's target, as a member name
    file: PinnedFile | None = None  # where its bytes are (None: a directory's symlink)
    header: bytes | None = None  # a directory member's tar header (None: a tar member)
    sha256: str | None = None  # hex; a directory member's bytes must hash to it
    stored: StoredFile | None = None  # a member of a generation in a store on another host

    @property
    def has_data(self) -> bool:
        return self.file is not None or self.stored is not None

    def data(self) -> FileRange | StoredFile:
        """The member's bytes: a range of its file, or a stored file (checked against
        its sha256 as they stream, when it has one)."""
        if self.stored is not None:
            return self.stored
        if self.file is None or self.link:
            raise BackupError(f"{self.name} is a link, not a file")
        return FileRange(self.file, self.data_offset, self.size, self.sha256, self.name)

    def head(self, n: int) -> bytes:
        """The first ``n`` bytes of its data (unchecked: for sniffing a format)."""
        data = self.data()
        if isinstance(data, FileRange):
            return os.pread(data.file.fd, min(n, data.length), data.offset)
        chunks = iter(data.read())
        try:
            return next(chunks, b"")[:n]
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()


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
            entries = loads_json(data)
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
        data = loads_json(config)
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
        if m.name == name and m.stored is not None and m.size < SMALL:
            return b"".join(piece_chunks(m.stored))
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
                    if ti.isfile() and is_meta(ti.name) and ti.size < SMALL:
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
        whenever they are read: the manifest and config here, the rest as they stream."""
        where = str(path)
        on_disk, disk_links = _walk(path)
        _check_listing(where, files, links, on_disk, disk_links)
        opened: list[PinnedFile] = []

        def data_of(name: str, digest: str) -> FileRange:
            f = _open_regular(path, name, where)
            opened.append(f)
            return FileRange(f, 0, f.size, digest, name)

        try:
            return cls._generation(where, files, links, data_of, opened)
        except BaseException:
            for f in opened:
                f.close()
            raise

    @classmethod
    def from_store(cls, where: str, files: dict[str, tuple[str, int]], links: dict[str, str],
                   read: Callable[[str], Iterable[bytes]]) -> ArchiveIndex:
        """Index a generation of a backup store on another host from its record alone:
        ``files`` maps each path to (sha256 hex, size), ``read(path)`` streams one. Its
        bytes are checked against both whenever they are read (the manifest and config
        here, the rest as they stream)."""
        _check_listing(where, {n: d for n, (d, _) in files.items()}, links,
                       set(files), dict(links))

        def data_of(name: str, digest: str) -> StoredFile:
            return StoredFile(functools.partial(read, name), int(files[name][1]), digest,
                              name, f"{where}/{name}")

        return cls._generation(where, {n: d for n, (d, _) in files.items()}, links,
                               data_of, [])

    @classmethod
    def _generation(cls, where: str, files: dict[str, str], links: dict[str, str],
                    data_of: Callable[[str, str], FileRange | StoredFile],
                    opened: list[PinnedFile]) -> ArchiveIndex:
        """The members of a generation: a header made here and the data of each file; a
        link is sent as a copy of the file it leads to (the containerd store's ``docker
        load`` does not follow links between layer files). Members are in name order,
        with ``index.json`` and ``manifest.json`` last, so a stream cut short never gives
        ``docker load`` a manifest."""
        data = {name: data_of(name, digest) for name, digest in files.items()}
        for name in links:
            target = name
            for _ in range(8):
                if target not in links:
                    break
                target = _link_target(target, links[target])
            if target not in data:
                raise BackupError(f"{where}: the link {name} does not lead to a file",
                                  hint=DAMAGED_HINT)
            copy = data[target]
            data[name] = dataclasses.replace(copy, label=name)
        members = []
        for name, d in data.items():
            stored = d if isinstance(d, StoredFile) else None
            file = d.file if isinstance(d, FileRange) else None
            members.append(Member(name, 0, 0, 0, d.length, file=file, sha256=d.sha256,
                                  header=_header(where, name, d.length), stored=stored))
        members.sort(key=lambda m: (m.name in _LAST, _LAST.index(m.name)
                                    if m.name in _LAST else 0, m.name))
        return cls._validated(where, members, None, tuple(opened))

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

    def small(self, name: str) -> bytes | None:
        """The bytes of the small regular member ``name`` (checked against its sha256
        when it has one), or None when there is none."""
        return _read_small(self.members, name, self.where)

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
        if m is None or m.link or not m.has_data:
            raise BackupError(f"{self.where}: no file for {name}")
        return m

    def layer_blob(self, index: int) -> tuple[str, str]:
        """(media type, digest) of layer ``index``'s file as the archive holds it: an
        uncompressed tar is named by its diff ID; a gzip or zstd blob (a containerd-store
        head's archive) by the digest of its compressed bytes (the sha256 a generation
        directory lists for it, its ``blobs/sha256/`` name, or hashed here when neither
        says)."""
        m = self.member(self.layers[index])
        head = m.head(4) if m.size else b""
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
        for chunk in piece_chunks(m.data()):
            h.update(chunk)
        return media, "sha256:" + h.hexdigest()

    def pieces(self, skip_layers: int, leave_out: frozenset[str] = frozenset()
               ) -> list[Piece]:
        """The archive (without its end-of-archive blocks) without the files of the
        first ``skip_layers`` layers, nor the members named in ``leave_out``. Taken
        from the manifest's layer list: a file that a later layer still needs (the same
        layer twice in one image: a link, or one blob named twice) stays. A tar's
        members are ranges of the tar (neighbours merged); a directory's are their
        header, the whole file (checked against its sha256 as it streams) and the
        padding."""
        needed = set()
        for name in self.layers[skip_layers:]:
            needed.add(name)
            needed.add(self.member(name).name)
        skip = ({n for name in self.layers[:skip_layers]
                 for n in (name, self.member(name).name)} - needed) | leave_out
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
                if m.has_data:
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


def docker_pieces(archive: ArchiveIndex, skip_layers: int = 0) -> list[Piece]:
    """The ``docker save`` archive without the first ``skip_layers`` layer files, its
    end-of-archive blocks included: what restore, distribute and export send."""
    return [*archive.pieces(skip_layers), TRAILER]


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
        if is_meta(ti.name) and ti.size < SMALL:
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
        return incomplete_save(self.where, missing, INCOMPLETE_HINT)


INCOMPLETE_HINT = (
    "on the containerd image store 'docker save' leaves out blobs that are missing from "
    "the content store (moby#49473; Docker 28.5 leaves out the image's config with them). "
    "Rebuild the image (imagebuild build --rebuild NAME) or load it again from a good "
    "archive so its blobs are complete, then run imagebuild backup NAME")


def incomplete_save(where: str, missing: list[str], hint: str) -> BackupError:
    """A saved archive that lacks what ``missing`` lists: never kept."""
    return BackupError(
        f"the archive docker saved for {where} is incomplete, so it could not be "
        f"restored: " + "; ".join(missing[:3])
        + (f"; and {len(missing) - 3} more" if len(missing) > 3 else "")
        + ". It was not kept; the previous backup is still in place", hint=hint)
