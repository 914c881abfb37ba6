"""The layer store (docs/layer-store.md): every file of every backup kept once, by digest.

    blobs/sha256/<hex>                 a file of some generation, named by its sha256
    blobs/.incoming/<host>-<pid>-<n>   a blob being written (cleaned by the next run)
    images/<name>/<hash12>/            one generation: a ``docker save`` directory whose
                                       regular files are hard links into blobs/
    images/<name>/<hash12>.json        its sidecar, written once the directory is complete
    images/<name>/current              the hash12 of the generation written last

The same code writes a local directory and one on another host (``BackupDir``,
store.py). ``ingest`` reads one ``docker save`` stream and writes only what the store
lacks: a file named by its digest (``blobs/sha256/<hex>``, the OCI layout of a
containerd-store engine) is hashed in passing and skipped when present; a
``<v1 id>/layer.tar`` (classic store) is uncompressed, so its sha256 is one of the
image's diff IDs: when the store holds a blob of that size among those digests it is
hashed in passing and not written, and in the rare case that the bytes turn out to be
another layer of the same size, the save is read again with that size written. A file
of at most 64 KiB is read whole and hashed before anything is decided. Every
other file (configs, ``json``, ``VERSION``, manifests) is small and stored the same way.

A generation directory is assembled under a temporary name and renamed into place only
when every blob it links is in; its sidecar comes after it, so no sidecar ever names an
incomplete directory. Dropping a generation removes its sidecar, then its directory,
then every blob no other generation links (link count 1): a shared layer is never
removed. Nothing here holds a layer in memory: one chunk per file at a time.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from . import __version__
from .archive import (
    INCOMPLETE_HINT,
    Manifest,
    SaveCheck,
    allowed_tags_error,
    config_fingerprint,
    familiar,
    incomplete_save,
)
from .errors import BackupError, RemoteError
from .image import ImageInfo
from .naming import hash12, hash_tag, input_hash, latest_tag
from .progress import Meter
from .store import BackupDir, FileStat, writing
from .untrusted import loads_json

CHUNK = 1 << 20
SMALL = 1 << 16  # files up to this size are read whole (manifests, configs, json)
BLOBS = "blobs/sha256"
INCOMING = "blobs/.incoming"
MAX_FILE_SIZE = 1 << 50  # a layer file recorded larger than a PiB is a damaged record
IMAGES = "images"
CURRENT = "current"
PARTIAL = ".partial"
FOREIGN_PARTIAL_AGE = 24 * 3600  # a write from another host is spared a day

_HEX = re.compile(r"[0-9a-f]{64}")
_H12 = re.compile(r"[0-9a-f]{12}")
_NAME = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*")
# the members a docker save archive may hold, on either image store
_MEMBER = re.compile(r"manifest\.json|index\.json|oci-layout|repositories|[0-9a-f]{64}\.json"
                     r"|[0-9a-f]{64}/(?:layer\.tar|json|VERSION)|blobs/sha256/[0-9a-f]{64}")
_DIR = re.compile(r"[0-9a-f]{64}|blobs|blobs/sha256")
_LINK = re.compile(r"\.\./[0-9a-f]{64}/layer\.tar")  # a layer repeated within one image
_LAST = ("index.json", "manifest.json")  # composed last: a cut stream never has them


def check_layout(store: BackupDir, *more: str) -> None:
    """Refuse (exit 8) a store whose own directories are not directories of their own:
    with ``blobs/.incoming`` a symlink, cleaning leftovers would delete files elsewhere;
    with ``blobs/sha256``, garbage collection; with ``images/NAME``, generations would be
    written elsewhere. ``more``: other directories of the store its caller writes."""
    bad = store.not_directories(["blobs", BLOBS, INCOMING, IMAGES, *more], IMAGES)
    if bad:
        raise BackupError(
            f"{store}: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} "
            f"{'is not a directory' if len(bad) == 1 else 'are not directories'} of the "
            f"store's own (a symlink, or a file): imagebuild writes into and deletes from "
            f"its store's directories only; nothing was changed",
            hint="see where it points; put the real directory in its place (or remove the "
                 "link or file), then run again")


def blob_path(digest: str) -> str:
    if not _HEX.fullmatch(digest):
        raise BackupError(f"{digest!r} is not a sha256 hex digest")
    return f"{BLOBS}/{digest}"


def image_dir(name: str) -> str:
    return f"{IMAGES}/{name}"


def gen_path(name: str, h12: str) -> str:
    return f"{IMAGES}/{name}/{h12}"


def sidecar_path(name: str, h12: str) -> str:
    return f"{IMAGES}/{name}/{h12}.json"


# -- the sidecar -------------------------------------------------------------------------------


def sidecar_json(sidecar: Any) -> str:
    return json.dumps(asdict(sidecar), indent=2, sort_keys=True) + "\n"


def json_fields(cls: Any, text: str) -> dict[str, Any]:
    """A sidecar's JSON object, refused when it has keys the dataclass ``cls`` lacks
    (the caller constructs it and checks every value)."""
    data = loads_json(text)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    extra = sorted(set(data) - {f.name for f in fields(cls)})
    if extra:
        raise ValueError(f"unknown keys {extra}")
    return data


@dataclass(frozen=True)
class GenSidecar:
    """What a generation holds, checked when read: the image, and every file of its
    directory with the sha256 and size of its bytes."""

    image: str
    hash12: str
    image_id: str
    fingerprint: str
    input_hash: str | None
    tags: list[str]
    created: str
    files: dict[str, list[Any]]  # path in the directory -> [sha256 hex, size]
    links: dict[str, str] = field(default_factory=dict)  # symlink path -> target
    layers: list[str] = field(default_factory=list)  # diff IDs, base first
    layer_files: list[str] = field(default_factory=list)  # their files, in that order
    tool_version: str = __version__

    def to_json(self) -> str:
        return sidecar_json(self)

    @classmethod
    def from_json(cls, text: str) -> GenSidecar:
        sc = cls(**json_fields(cls, text))
        if not isinstance(sc.image, str) or not _NAME.fullmatch(sc.image):
            raise ValueError("image is not an image name")
        if not isinstance(sc.hash12, str) or not _H12.fullmatch(sc.hash12):
            raise ValueError("hash12 is not 12 hex digits")
        for what, ref in (("image_id", sc.image_id), ("fingerprint", sc.fingerprint)):
            if not isinstance(ref, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", ref):
                raise ValueError(f"{what} is not a sha256 digest")
        if sc.input_hash is not None and not (isinstance(sc.input_hash, str)
                                              and _HEX.fullmatch(sc.input_hash)):
            raise ValueError("input_hash is not a sha256 hex digest")
        if not isinstance(sc.tags, list) or not all(isinstance(t, str) for t in sc.tags):
            raise ValueError("tags must be a list of strings")
        if not isinstance(sc.created, str) or not isinstance(sc.tool_version, str):
            raise ValueError("created and tool_version must be strings")
        if not isinstance(sc.files, dict) or "manifest.json" not in sc.files:
            raise ValueError("files must map the generation's files (manifest.json first "
                             "among them)")
        for path, entry in sc.files.items():
            v: Any = entry
            if (not isinstance(path, str) or not _MEMBER.fullmatch(path)
                    or not isinstance(v, list) or len(v) != 2
                    or not isinstance(v[0], str) or not _HEX.fullmatch(v[0])
                    or isinstance(v[1], bool) or not isinstance(v[1], int) or v[1] < 0
                    or v[1] > MAX_FILE_SIZE):
                raise ValueError(f"files: bad entry {path!r}")
        if not isinstance(sc.links, dict) or not all(
                isinstance(p, str) and _MEMBER.fullmatch(p) and isinstance(t, str)
                and _LINK.fullmatch(t) for p, t in sc.links.items()):
            raise ValueError("links must map archive members to ../<v1 id>/layer.tar")
        for what, items in (("layers", sc.layers), ("layer_files", sc.layer_files)):
            if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
                raise ValueError(f"{what} must be a list of strings")
        if not all(re.fullmatch(r"sha256:[0-9a-f]{64}", d) for d in sc.layers):
            raise ValueError("layers must be diff IDs")
        if not all(link_target(p, t) in sc.files for p, t in sc.links.items()):
            raise ValueError("links must lead to files of the generation")
        if len(sc.layers) != len(sc.layer_files) or not all(
                p in sc.files or p in sc.links for p in sc.layer_files):
            raise ValueError("layer_files must name one file of the generation per layer")
        return sc

    @property
    def key(self) -> str:
        """How readers name this generation: its directory in the store."""
        return gen_path(self.image, self.hash12)

    @property
    def hash_tag(self) -> str | None:
        return f"{self.image}:{hash12(self.input_hash)}" if self.input_hash else None

    @property
    def size(self) -> int:
        """The bytes of the generation's archive (each file once)."""
        return sum(int(v[1]) for v in self.files.values())

    def blobs(self) -> set[str]:
        return {str(v[0]) for v in self.files.values()}


def read_gen_sidecar(store: BackupDir, name: str, h12: str) -> GenSidecar | None:
    path = sidecar_path(name, h12)
    text = store.read_text(path)
    if text is None:
        return None
    try:
        sc = GenSidecar.from_json(text)
    except (ValueError, TypeError) as exc:
        raise BackupError(f"{store}/{path} is not a valid generation sidecar: {exc}",
                          hint="remove it and its directory and run 'imagebuild backup' "
                               "again") from None
    if (sc.image, sc.hash12) != (name, h12):
        raise BackupError(f"{store}/{path} describes {sc.image} {sc.hash12}, not its own "
                          f"place in the store")
    return sc


def list_generations(store: BackupDir, name: str) -> list[GenSidecar]:
    """Every complete generation of ``name``, newest first (an unreadable sidecar is
    passed over: ``check`` reports it)."""
    files = store.files(image_dir(name))
    dirs = set(store.dirs(image_dir(name)))
    out: list[tuple[str, int, GenSidecar]] = []
    for f, st in files.items():
        h12 = f.removesuffix(".json")
        if not f.endswith(".json") or not _H12.fullmatch(h12) or h12 not in dirs:
            continue
        try:
            sc = read_gen_sidecar(store, name, h12)
        except BackupError:
            continue
        if sc is not None:
            out.append((sc.created, st.mtime_ns, sc))
    out.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return [sc for _, _, sc in out]


def current_generation(store: BackupDir, name: str) -> GenSidecar | None:
    """The generation written last for ``name`` (``images/<name>/current``)."""
    text = store.read_text(f"{image_dir(name)}/{CURRENT}")
    h12 = (text or "").strip()
    if not _H12.fullmatch(h12) or h12 not in store.dirs(image_dir(name)):
        return None
    try:
        return read_gen_sidecar(store, name, h12)
    except BackupError:
        return None


def image_names(store: BackupDir) -> list[str]:
    return [n for n in store.dirs(IMAGES) if _NAME.fullmatch(n)]


# -- writing -----------------------------------------------------------------------------------


def run_token() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def run_alive(token: str, mtime_ns: int) -> bool:
    """Whether the run that wrote a temporary file named with ``token`` may still run."""
    host, _, pid = token.rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return time.time() - mtime_ns / 1e9 < FOREIGN_PARTIAL_AGE
    return int(pid) != os.getpid() and os.path.exists(f"/proc/{pid}")


def clean_leftovers(store: BackupDir, name: str | None = None) -> None:
    """Remove what a killed or failed write left: incoming blobs and partial generation
    directories of runs that are no longer alive."""
    stale = [f"{INCOMING}/{f}" for f, st in store.files(INCOMING).items()
             if not run_alive(f.rpartition("-")[0], st.mtime_ns)]
    store.remove(*stale)
    for n in [name] if name else image_names(store):
        for d in store.dirs(image_dir(n)):
            if d.startswith(".") and d.endswith(PARTIAL):
                token = d[1:-len(PARTIAL)].partition(".")[2]
                if not run_alive(token, 0):  # another host's: a run older than a day
                    store.remove_tree(f"{image_dir(n)}/{d}")


class _Again(Exception):
    """A layer.tar taken for a stored blob of its size turned out to be other bytes."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


@dataclass
class _Ingest:
    store: BackupDir
    blobs: dict[str, FileStat]  # what the store holds: hex -> stat
    expected: set[str]  # hex diff IDs of the image (layer.tar files hash to these)
    force_sizes: set[int]
    written: int = 0
    seq: int = 0
    new: list[str] = field(default_factory=list)  # blobs this run added

    def undo(self) -> None:
        """After a failure: remove the blobs this run added that no generation links."""
        if self.new:
            now = self.store.files(BLOBS)
            self.store.remove(*(blob_path(d) for d in self.new
                                if d in now and now[d].nlink == 1))

    def put_small(self, data: bytes, named: str | None) -> str:
        """A file read whole: its digest is known before anything is written."""
        digest = hashlib.sha256(data).hexdigest()
        if named is not None and digest != named:
            raise _corrupt(named, digest)
        if digest in self.blobs:
            return digest
        return self.put(io.BytesIO(data).read, len(data), named, [])

    def put(self, read: Callable[[int], bytes], size: int, named: str | None,
            candidates: list[str]) -> str:
        """One file of the archive into blobs/ (only when absent); returns its digest."""
        h = hashlib.sha256()
        if (named is not None and named in self.blobs) or candidates:
            _drain(read, size, h.update)
            digest = h.hexdigest()
            if named is not None and digest != named:
                raise _corrupt(named, digest)
            if named is None and digest not in candidates:
                raise _Again(size)
            return digest
        self.seq += 1
        tmp = f"{INCOMING}/{run_token()}-{self.seq}"
        with writing(self.store, tmp) as w:
            def sink(chunk: bytes) -> None:
                h.update(chunk)
                w.write(chunk)

            _drain(read, size, sink)
            digest = h.hexdigest()
            if named is not None and digest != named:
                raise _corrupt(named, digest)
            stat = w.commit()
        if stat.size != size:
            self.store.remove(tmp)
            raise BackupError(f"{self.store}/{tmp}: {stat.size} bytes arrived of {size}")
        if digest in self.blobs:  # the same bytes under another name in the archive
            self.store.remove(tmp)
        elif self.store.place(tmp, blob_path(digest)):
            self.blobs[digest] = stat
            self.new.append(digest)
            self.written += size
        else:  # a backup running beside this one put the same bytes there first: its
            # file stays (it may be linked into its generation already)
            self.blobs[digest] = stat
        return digest


def _corrupt(named: str, got: str) -> BackupError:
    return BackupError(f"a file the archive names sha256:{named[:12]} has the digest "
                       f"sha256:{got[:12]}: the engine sent a corrupt blob; nothing of it "
                       f"was kept",
                       hint="run the backup again; if it repeats, check the engine's storage")


def _drain(read: Callable[[int], bytes], size: int, sink: Callable[[bytes], None]) -> None:
    left = size
    while left:
        chunk = read(min(CHUNK, left))
        if not chunk:
            raise BackupError(f"the archive ended {left} bytes before the end of a "
                              f"{size}-byte file",
                              hint="the save stream was cut short; run the backup again")
        sink(chunk)
        left -= len(chunk)


class _Chunks(io.RawIOBase):
    """A read-only file over an iterator of chunks (for tarfile's stream mode)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it = iter(chunks)
        self._buf = b""
        self.total = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._it)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        self.total += n
        return n


@dataclass(frozen=True)
class Written:
    sidecar: GenSidecar
    written: int  # bytes written into blobs/
    read: int  # bytes of the save stream (the last pass)
    passes: int = 1


def space_needed(store: BackupDir, infos: list[ImageInfo]) -> int:
    """An upper bound of the bytes a backup of ``infos`` (in one save) adds: each image's
    size, less the layers some generation of the store already holds (as their sidecars
    record them) or, for an image built on another of the batch, less that image's size
    (its layers come once)."""
    stored: dict[str, int] = {}
    for n in image_names(store):
        for sc in list_generations(store, n):
            for diff_id, path in zip(sc.layers, sc.layer_files, strict=True):
                if path in sc.files:
                    stored[diff_id] = int(sc.files[path][1])
    need = 0
    for info in infos:
        known = sum(stored.get(d, 0) for d in dict.fromkeys(info.diff_ids))
        below = [o.size for o in infos if o is not info and len(o.diff_ids) < len(
            info.diff_ids) and info.diff_ids[:len(o.diff_ids)] == o.diff_ids]
        need += max(info.size - max([known, *below]), 0)
    return need


@dataclass(frozen=True)
class Meta:
    """What a generation records about its image, known before its archive is read."""

    image_id: str
    fingerprint: str
    input_hash: str | None
    tags: list[str]
    size: int  # an estimate of the archive's bytes, for progress
    diff_ids: tuple[str, ...]  # empty: not known (an imported tar), taken from its config
    stream_sha256: str | None = None  # the archive's own digest, when it is a kept file
    created: str | None = None  # when it was first written (an imported tar's); None: now

    @classmethod
    def of(cls, name: str, info: ImageInfo) -> Meta:
        tags = {latest_tag(name)} | ({t} if (t := hash_tag(name, info)) else set())
        return cls(info.id, info.fingerprint, input_hash(info), sorted(tags), info.size,
                   info.diff_ids)


@dataclass(frozen=True)
class Wanted:
    """One image of a save stream, to become a generation."""

    name: str
    h12: str
    meta: Meta
    tag: str | None = None  # the reference it was saved as (None: the archive's only image)


def ingest(store: BackupDir, save: Callable[[], Iterable[bytes]], name: str, h12: str,
           meta: Meta, where: str, meter: Callable[[int], Meter] | None = None,
           current: bool = True) -> Written:
    """Read ``save()`` (one image's ``docker save``) into the store as generation
    ``h12`` of ``name``; only files the store lacks are written. ``current``: the
    generation becomes ``current`` (not for an imported tar)."""
    return ingest_many(store, save, [Wanted(name, h12, meta)], where, meter, current)[0]


def ingest_many(store: BackupDir, save: Callable[[], Iterable[bytes]], wanted: list[Wanted],
                where: str, meter: Callable[[int], Meter] | None = None,
                current: bool = True) -> list[Written]:
    """Read ``save()`` (a ``docker save`` of the images ``wanted``, one call: the layers
    they share come once) into the store, one generation per image; only files the
    store lacks are written. ``save`` is called again in the rare case described in the
    module docstring."""
    if len(wanted) > 1 and any(w.tag is None for w in wanted):
        raise ValueError("an archive of several images needs each one's tag")
    store.mkdirs(BLOBS, INCOMING, *(image_dir(w.name) for w in wanted))
    for w in wanted:
        clean_leftovers(store, w.name)
    state = _Ingest(store, store.files(BLOBS), {d.removeprefix("sha256:")
                                                for w in wanted for d in w.meta.diff_ids},
                    set())
    try:
        return _ingest(state, save, wanted, where, meter, current)
    except BaseException:
        state.undo()
        raise


def _ingest(state: _Ingest, save: Callable[[], Iterable[bytes]], wanted: list[Wanted],
            where: str, meter: Callable[[int], Meter] | None, current: bool
            ) -> list[Written]:
    passes = 0
    while True:
        passes += 1
        try:
            files, links, small, read = _read_save(state, save(), wanted, where, meter)
            break
        except _Again as again:
            if passes == 3:
                raise BackupError(f"{where}: the save stream changed between reads",
                                  hint="run the backup again") from None
            state.force_sizes.add(again.size)
    try:
        raw = loads_json(small["manifest.json"])
    except ValueError:
        raise BackupError(f"{where}: manifest.json is not JSON") from None
    entries = Manifest.parse_all(small["manifest.json"], where)
    sidecars = []
    for w in wanted:
        if w.tag is None:
            if len(entries) != 1:
                raise BackupError(f"{where} is not a single-image docker save archive")
            i = 0
        else:
            found = next((i for i, e in enumerate(entries)
                          if w.tag in map(familiar, e.repo_tags)), None)
            if found is None:
                raise BackupError(f"{where}: {w.tag} is not in the archive")
            i = found
        # the same files for an image whatever save it came in (alone, or with others):
        # two backups writing one generation at once then agree on every blob, so the
        # directory one of them renames into place and the sidecar the other writes
        # always name the same files
        manifest = entries[i]
        w_files, w_links = _one_image(state, raw[i], manifest, files, links, small, where)
        config = small.get(manifest.config)
        if config is None:
            raise incomplete_save(where, [f"its image config ({manifest.config}) is not in it"],
                                  INCOMPLETE_HINT)
        fingerprint, diff_ids = config_fingerprint(config, where)
        meta = w.meta
        if fingerprint != meta.fingerprint or len(diff_ids) != len(manifest.layers):
            raise BackupError(f"{where} does not hold the image {w.name} was saved as (the "
                              f"content fingerprint differs); the generation was not kept")
        err = allowed_tags_error(manifest.repo_tags, set(meta.tags), where)
        if err is not None:
            raise err
        sidecars.append(GenSidecar(
            image=w.name, hash12=w.h12, image_id=meta.image_id, fingerprint=meta.fingerprint,
            input_hash=meta.input_hash, tags=meta.tags,
            created=meta.created or datetime.now(UTC).isoformat(timespec="microseconds"),
            files={p: [d, n] for p, (d, n) in sorted(w_files.items())},
            links=dict(sorted(w_links.items())), layers=list(diff_ids),
            layer_files=list(manifest.layers)))
    for sc in sidecars:  # every blob is in: the generations appear
        assemble(state.store, sc, current)
    new = {d: state.blobs[d].size for d in state.new}  # each new blob counted once, for
    out = []  # the first image (in the order given: parents first) that holds it
    for i, sc in enumerate(sidecars):
        mine = sc.blobs() & new.keys()
        out.append(Written(sc, sum(new.pop(d) for d in mine), read if i == 0 else 0, passes))
    return out


def _one_image(state: _Ingest, entry: dict[str, Any], manifest: Manifest,
               files: dict[str, tuple[str, int]], links: dict[str, str],
               small: dict[str, bytes], where: str
               ) -> tuple[dict[str, tuple[str, int]], dict[str, str]]:
    """The files of one image of an archive (of it alone or of several): its config, its layer files
    (with the file a repeated layer links to, and the legacy ``json``/``VERSION`` beside
    each), and a ``manifest.json`` (and for the OCI layout an ``index.json``, the
    ``oci-layout`` and its manifest blob) that name this image alone."""
    paths = {manifest.config}
    own_links = {}
    for layer in manifest.layers:
        path = layer
        if layer in links:
            own_links[layer] = links[layer]
            path = link_target(layer, links[layer])
        paths.add(path)
        for base in {os.path.dirname(layer), os.path.dirname(path)}:
            paths |= {p for p in (f"{base}/json", f"{base}/VERSION") if p in files}
    extra = {"manifest.json": json.dumps([entry]).encode()}
    if "index.json" in small:
        try:
            index = loads_json(small["index.json"])
        except ValueError:
            raise BackupError(f"{where}: index.json is not JSON") from None
        config_digest = "sha256:" + manifest.config.rsplit("/", 1)[-1]
        mine = []
        for desc in index.get("manifests", []) if isinstance(index, dict) else []:
            path = "blobs/sha256/" + str(desc.get("digest", "")).removeprefix("sha256:")
            try:
                names = loads_json(small[path]).get("config", {}).get("digest")
            except (KeyError, ValueError, AttributeError):
                continue
            if names == config_digest:
                mine.append(desc)
                paths.add(path)
        paths.add("oci-layout")
        extra["index.json"] = json.dumps({**index, "manifests": mine}).encode()
    missing = sorted(p for p in paths if p not in files)
    if missing:  # Docker 28.5 leaves the config out with a blob missing from its store
        raise incomplete_save(where, [f"{p}, which its manifest names, is not in it"
                                      for p in missing], INCOMPLETE_HINT)
    own = {p: files[p] for p in paths}
    for name, data in extra.items():
        own[name] = (state.put_small(data, None), len(data))
    return own, own_links


def _read_save(state: _Ingest, chunks: Iterable[bytes], wanted: list[Wanted], where: str,
               meter: Callable[[int], Meter] | None
               ) -> tuple[dict[str, tuple[str, int]], dict[str, str], dict[str, bytes], int]:
    # the archive must be complete (moby#49473), when the images' layers are known: the
    # compressed blobs of a containerd-store save are decompressed and hashed by
    # SaveCheck beside the write; the layer.tar files of a classic save are hashed here
    # anyway (their sha256 is the diff ID), so they are checked after the read
    expected: tuple[str, ...] | dict[str, tuple[str, ...]] | None = None
    if len(wanted) == 1 and wanted[0].meta.diff_ids:
        expected = wanted[0].meta.diff_ids
    elif len(wanted) > 1:
        expected = {str(w.tag): w.meta.diff_ids for w in wanted}
    checks: list[SaveCheck] = []
    meta = wanted[0].meta  # the archive's own digest: a kept tar, one image
    progress = meter(max(w.meta.size for w in wanted)) if meter is not None else None
    whole = hashlib.sha256()

    def teed() -> Iterator[bytes]:
        for chunk in chunks:
            if expected is not None and needs_save_check(chunk):
                checks.append(SaveCheck(where, expected))
            for check in checks:
                check.write(chunk)
            if meta.stream_sha256 is not None:
                whole.update(chunk)
            if progress is not None:
                progress.add(len(chunk))
            yield chunk

    seen_first: list[bool] = []

    def needs_save_check(chunk: bytes) -> bool:
        """At the first chunk: whether the archive is not a classic save (its first
        member is not a ``<v1 id>/`` directory), so its layers need SaveCheck."""
        if seen_first:
            return False
        seen_first.append(True)
        return not re.match(rb"(\./)?[0-9a-f]{64}/", chunk[:100])

    stream = _Chunks(teed())
    files: dict[str, tuple[str, int]] = {}
    links: dict[str, str] = {}
    small: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BufferedReader(stream, CHUNK), mode="r|") as tf:
            for m in tf:
                path = m.name.removeprefix("./").rstrip("/")
                if m.isdir() and (_DIR.fullmatch(path) or path in ("", ".")):
                    continue
                if not _MEMBER.fullmatch(path):
                    raise BackupError(f"{where}: the archive holds {m.name!r}, which a "
                                      f"docker save archive does not")
                if m.issym() and _LINK.fullmatch(m.linkname):
                    links[path] = m.linkname
                    continue
                if not m.isfile():
                    raise BackupError(f"{where}: {m.name!r} in the archive is not a "
                                      f"regular file")
                f = tf.extractfile(m)
                assert f is not None
                named = path.removeprefix("blobs/sha256/") if path.startswith("blobs/") else None
                if m.size <= SMALL:  # read whole: no need to guess which blob it is
                    small[path] = f.read()
                    files[path] = (state.put_small(small[path], named), m.size)
                    continue
                candidates = ([d for d, st in state.blobs.items()
                               if st.size == m.size and d in state.expected]
                              if path.endswith("/layer.tar") and m.size not in state.force_sizes
                              else [])
                files[path] = (state.put(f.read, m.size, named, candidates), m.size)
            while stream.read(CHUNK):  # to the end: the whole stream is hashed and checked
                pass
        for check in checks:
            check.finish()
    except tarfile.TarError as exc:
        raise BackupError(f"{where} is not a readable tar: {exc}") from None
    finally:
        for check in checks:
            check.close()
    if expected is not None and not checks and "manifest.json" in small:
        _check_raw_layers(files, links, small, expected, where)
    if meta.stream_sha256 is not None and whole.hexdigest() != meta.stream_sha256:
        raise BackupError(f"{where} does not match its sidecar (sha256 "
                          f"{whole.hexdigest()[:12]}, expected {meta.stream_sha256[:12]}); "
                          f"it was not imported", hint="restore it with --file to see the "
                          "damage, or delete it: it is not a usable backup")
    if "manifest.json" not in small:
        raise BackupError(f"{where}: the archive has no manifest.json")
    return files, links, small, stream.total


def _check_raw_layers(files: dict[str, tuple[str, int]], links: dict[str, str],
                      small: dict[str, bytes],
                      expected: tuple[str, ...] | dict[str, tuple[str, ...]], where: str
                      ) -> None:
    """A classic save is complete: each image it should hold is in its manifest with the
    layers expected, and each layer's file (links followed) has its diff ID as sha256."""
    entries = Manifest.parse_all(small["manifest.json"], where)
    wanted = expected if isinstance(expected, dict) else {"": expected}
    missing: list[str] = []
    for tag, diff_ids in wanted.items():
        entry = (entries[0] if not tag and len(entries) == 1 else next(
            (e for e in entries if tag and tag in map(familiar, e.repo_tags)), None))
        if entry is None:
            missing.append(f"{tag or 'its image'} is not in it")
            continue
        config = small.get(entry.config)
        got_ids = config_fingerprint(config, where)[1] if config is not None else None
        if got_ids != diff_ids or len(entry.layers) != len(diff_ids):
            raise BackupError(f"the archive written to {where} does not describe the image "
                              f"that was saved (its layers differ); nothing was kept")
        for i, (name, diff_id) in enumerate(zip(entry.layers, diff_ids, strict=True), 1):
            got = files.get(link_target(name, links[name]) if name in links else name)
            if got is None or "sha256:" + got[0] != diff_id:
                missing.append(f"layer {i} of {len(diff_ids)} ({diff_id[:19]}, file {name}) "
                               f"is not in it" if got is None else
                               f"layer {i} ({name}) holds other content than {diff_id[:19]}")
    if missing:
        raise incomplete_save(where, missing, hint="rebuild the image (imagebuild build "
                              "--rebuild NAME), then run imagebuild backup NAME")


def assemble(store: BackupDir, sc: GenSidecar, current: bool) -> None:
    """The generation directory under a temporary name, renamed into place, then its
    sidecar, then ``current``."""
    parent = image_dir(sc.image)
    tmp = f"{parent}/.{sc.hash12}.{run_token()}{PARTIAL}"
    final = gen_path(sc.image, sc.hash12)
    store.remove_tree(tmp)
    subdirs = sorted({p.rpartition("/")[0] for p in [*sc.files, *sc.links] if "/" in p})
    store.mkdirs(tmp, *(f"{tmp}/{d}" for d in subdirs))
    try:
        store.link_all([(blob_path(str(d)), f"{tmp}/{p}") for p, (d, _) in sc.files.items()])
        for path, target in sc.links.items():
            store.symlink(target, f"{tmp}/{path}")
        store.remove(sidecar_path(sc.image, sc.hash12))  # a sidecar never names a partial dir
        store.remove_tree(final)
        try:
            store.rename(tmp, final)
        except (OSError, RemoteError):
            # another backup running beside this one (both hold the shared lock) put the
            # same generation in place first: its blobs are all there, keep that one
            if sc.hash12 not in store.dirs(parent) or not is_complete(store, sc):
                raise
            store.remove_tree(tmp)
    except (OSError, RemoteError) as exc:
        store.remove_tree(tmp)
        raise BackupError(f"assembling {store}/{final} failed: {exc}; the generation was "
                          f"not kept", hint="check free space and permissions, and run the "
                          "backup again") from None
    store.write_text(sidecar_path(sc.image, sc.hash12), sc.to_json())
    if current:
        store.write_text(f"{parent}/{CURRENT}", sc.hash12 + "\n")


def is_complete(store: BackupDir, sc: GenSidecar, blobs: dict[str, FileStat] | None = None
                ) -> bool:
    """Every blob the generation links is in the store with its size."""
    blobs = store.files(BLOBS) if blobs is None else blobs
    return all(d in blobs and blobs[d].size == s for d, s in sc.files.values())


# -- keep and prune ------------------------------------------------------------------------------


def drop(store: BackupDir, sc: GenSidecar) -> None:
    store.remove(sidecar_path(sc.image, sc.hash12))
    store.remove_tree(gen_path(sc.image, sc.hash12))


def prune(store: BackupDir, name: str, keep: int) -> list[GenSidecar]:
    """Keep ``keep`` generations of ``name`` (the current one and the newest others),
    drop the rest, then remove every blob no generation links any more."""
    current = current_generation(store, name)
    others = [g for g in list_generations(store, name)
              if current is None or g.hash12 != current.hash12]
    kept = max(keep - (1 if current is not None else 0), 0)
    dropped = others[kept:]
    for sc in dropped:
        drop(store, sc)
    collect_garbage(store)
    return dropped


def collect_garbage(store: BackupDir) -> int:
    """Remove blobs that no generation links (link count 1); returns the bytes freed."""
    orphans = {d: st for d, st in store.files(BLOBS).items()
               if _HEX.fullmatch(d) and st.nlink == 1}
    store.remove(*(blob_path(d) for d in orphans))
    return sum(st.size for st in orphans.values())


# -- reading -----------------------------------------------------------------------------------


def damaged(store: BackupDir, sc: GenSidecar, path: str, got: str) -> BackupError:
    """The error for a damaged file of a generation (``path``, or a link to it), naming
    every generation its blob is part of."""
    if path in sc.links:
        path = link_target(path, sc.links[path])
    digest, size = sc.files[path]
    users = [f"{g.image} {g.hash12}" for n in image_names(store)
             for g in list_generations(store, n) if digest in g.blobs()]
    return BackupError(
        f"{store}/{sc.key}/{path} is damaged (expected {size} bytes, sha256 "
        f"{str(digest)[:12]}; got {got}); nothing was loaded. Every generation that uses "
        f"this blob is affected: {', '.join(users) or sc.image + ' ' + sc.hash12}",
        hint="rebuild the image (imagebuild build --rebuild NAME) or restore it from another "
             "copy; 'imagebuild backup --check' lists every damaged blob")


def link_target(path: str, target: str) -> str:
    """The archive path a symbolic link at ``path`` (``../<v1 id>/layer.tar``) leads to."""
    return os.path.normpath(os.path.join(os.path.dirname(path), target))


# -- checking the whole store --------------------------------------------------------------------


@dataclass(frozen=True)
class StoreCheck:
    blobs: int  # blobs checked
    bytes: int
    damaged: dict[str, list[str]]  # blob hex -> the generations that use it ("name hash12")
    missing: dict[str, list[str]]  # blob hex -> the generations that need it
    unreadable: list[str]  # sidecars that could not be read

    @property
    def ok(self) -> bool:
        return not (self.damaged or self.missing or self.unreadable)

    def lines(self) -> list[str]:
        """The report, a line per finding."""
        out = [f"{self.blobs} blobs checked ({self.bytes / 1e9:.2f} GB)"]
        for what, found in (("DAMAGED", self.damaged), ("MISSING", self.missing)):
            out += [f"{what} blob sha256:{d[:12]}, used by {', '.join(gens)}"
                    for d, gens in found.items()]
        out += [f"UNREADABLE sidecar {path}" for path in self.unreadable]
        return out if not self.ok else [*out, "every blob matches its digest"]

    def error(self) -> BackupError | None:
        if self.ok:
            return None
        gens = sorted({g for found in (self.damaged, self.missing) for gs in found.values()
                       for g in gs})
        return BackupError(
            f"the backup store is damaged: {len(self.damaged)} blob(s) do not match their "
            f"digest, {len(self.missing)} are missing, {len(self.unreadable)} sidecar(s) "
            f"are unreadable; these generations cannot be restored or sent: "
            f"{', '.join(gens) or 'none'}",
            hint="delete each damaged blob (blobs/sha256/<digest>) and run 'imagebuild "
                 "backup': every image present whose generation used it is written again "
                 "(rebuild a lost one with 'imagebuild build --rebuild NAME'); an older "
                 "generation that used it cannot be restored")


def check_store(store: BackupDir, sha256: Callable[[str], str],
                on_blob: Callable[[int], None] | None = None,
                blobs: dict[str, FileStat] | None = None) -> StoreCheck:
    """Hash every blob a generation uses (``sha256(path)``, where the blob lies) and
    compare it with its name. ``blobs``: the listing of blobs/, when the caller has it."""
    users: dict[str, list[str]] = {}
    unreadable: list[str] = []
    for name in image_names(store):
        for f in store.files(image_dir(name)):
            h12 = f.removesuffix(".json")
            if f.endswith(".json") and _H12.fullmatch(h12):
                try:
                    sc = read_gen_sidecar(store, name, h12)
                except BackupError:
                    unreadable.append(sidecar_path(name, h12))
                    continue
                if sc is not None:
                    for d in sc.blobs():
                        users.setdefault(d, []).append(f"{name} {h12}")
    blobs = store.files(BLOBS) if blobs is None else blobs
    bad: dict[str, list[str]] = {}
    missing: dict[str, list[str]] = {}
    total = 0
    for d, gens in sorted(users.items()):
        if d not in blobs:
            missing[d] = gens
            continue
        total += blobs[d].size
        if sha256(blob_path(d)) != d:
            bad[d] = gens
        if on_blob is not None:
            on_blob(blobs[d].size)
    return StoreCheck(len(users) - len(missing), total, bad, missing, unreadable)
