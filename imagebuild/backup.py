"""Tar backups of verified images, and restoring them, in any ``BackupDir``.

A backup is ``NAME.tar`` plus a JSON sidecar ``NAME.tar.json``. It is streamed from
``docker save`` into a temporary name in the same directory (never /tmp), hashed while it
streams, synced, its size checked, then renamed into place; the previous generation stays
as ``NAME@<hash12>.tar`` (a hard link), and generations beyond ``keep`` are pruned. The
same code writes a local directory and one on another host (store.py). While it streams,
the archive is read as a tar too (``SaveCheck``): it is kept only if it holds every layer
of the image with its diff ID (``docker save`` on the containerd store can leave blobs
out, moby#49473).

A restore checks the tar against its sidecar (size, sha256) before anything is loaded,
loads it, checks the image ID and restores the hash tag. ``latest`` is not touched here:
that is promote's, after the gate.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

from . import __version__
from .archive import (
    Manifest,
    SaveCheck,
    TarGuard,
    allowed_tags_error,
    config_fingerprint,
    manifest_tags,
)
from .engine import Engine, ImageInfo
from .errors import BackupError
from .fsutil import PinnedFile
from .naming import hash12, hash_tag, input_hash, latest_tag, short_id, split_ref
from .progress import Progress
from .store import BackupDir, FileStat, LocalDir, writing

SPACE_MARGIN = 64 << 20  # tar headers and the sidecar, on top of the image size
PARTIAL = ".partial"
FOREIGN_PARTIAL_AGE = 24 * 3600  # a partial file written from another host, spared a day


@dataclass(frozen=True)
class Sidecar:
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
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Sidecar:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        known = {f.name for f in fields(cls)}
        extra = sorted(set(data) - known)
        if extra:
            raise ValueError(f"unknown keys {extra}")
        sc = cls(**data)
        ints = (sc.size, sc.mtime_ns, sc.ino, sc.ctime_ns)
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in ints):
            raise ValueError("size, mtime_ns, ino and ctime_ns must be whole numbers")
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

    def written_as(self, stat: FileStat | None) -> bool:
        """Whether the file is still the one that was written and hashed (its size,
        mtime, inode and ctime unchanged; sidecars of old versions: size and mtime)."""
        if stat is None or (stat.size, stat.mtime_ns) != (self.size, self.mtime_ns):
            return False
        return self.ino == 0 or (stat.ino, stat.ctime_ns) == (self.ino, self.ctime_ns)


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


@dataclass(frozen=True)
class BackupResult:
    where: str  # the tar, as a path or an ssh:// URL
    tar: str  # its name in the store
    sidecar: Sidecar
    written: bool
    seconds: float = 0.0
    local_tar: Path | None = None  # the tar on this host, when it is here


def check_space(store: object, free: int, need: int, what: str) -> None:
    """Refuse before writing anything when ``store`` has less than ``need`` free."""
    if free < need:
        raise BackupError(
            f"{store} has {free / 1e9:.2f} GB free, but {what} needs about "
            f"{need / 1e9:.2f} GB: nothing was written",
            hint="free space there, or point backups.directory at a larger disk",
        )


def _new_sidecar(name: str, info: ImageInfo, stat: FileStat, sha256: str) -> Sidecar:
    tags = {latest_tag(name)} | ({t} if (t := hash_tag(name, info)) else set())
    return Sidecar(
        image=name, image_id=info.id, fingerprint=info.fingerprint, input_hash=input_hash(info),
        tags=sorted(tags), size=stat.size, sha256=sha256,
        created=datetime.now(UTC).isoformat(timespec="seconds"), mtime_ns=stat.mtime_ns,
        ino=stat.ino, ctime_ns=stat.ctime_ns,
    )


# -- writing ---------------------------------------------------------------------------------


def _partial_name(name: str) -> str:
    return f".{tar_name(name)}.{socket.gethostname()}-{os.getpid()}{PARTIAL}"


def _writer_alive(token: str, mtime_ns: int) -> bool:
    """Whether the backup that writes a partial file named with ``token`` may still run."""
    host, _, pid = token.rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return time.time() - mtime_ns / 1e9 < FOREIGN_PARTIAL_AGE
    return int(pid) != os.getpid() and Path(f"/proc/{pid}").exists()


def _clean_partials(store: BackupDir, name: str, files: dict[str, FileStat]) -> None:
    """Remove temp files of earlier backups of ``name`` that were killed half-way."""
    prefix = f".{tar_name(name)}."
    stale = [f for f, st in files.items()
             if f.startswith(prefix) and f.endswith(PARTIAL)
             and not _writer_alive(f[len(prefix):-len(PARTIAL)], st.mtime_ns)]
    store.remove(*stale)


def write_backup(store: BackupDir, engine: Engine, name: str, info: ImageInfo, keep: int,
                 progress: Progress) -> BackupResult:
    """Write ``NAME.tar`` of ``info`` (verified: the caller checked) into ``store``."""
    store.prepare()
    tar = tar_name(name)
    existing = read_sidecar(store, tar)
    files = store.files()
    current = files.get(tar)
    if existing and existing.image_id == info.id and existing.written_as(current):
        return BackupResult(f"{store}/{tar}", tar, existing, written=False,
                            local_tar=store.local_path(tar))
    _clean_partials(store, name, files)
    check_space(store, store.free_bytes(), info.size + SPACE_MARGIN, f"a backup of {name}")
    ref = hash_tag(name, info) or info.id  # the hash tag, so the tar restores it
    tmp = _partial_name(name)
    started = time.monotonic()
    h = hashlib.sha256()
    meter = progress.meter(f"saving {name} to {store}", info.size)
    check = SaveCheck(f"{store}/{tar_name(name)}", info.diff_ids)
    try:
        with writing(store, tmp) as w:
            for chunk in engine.save(ref):
                w.write(chunk)
                h.update(chunk)
                check.write(chunk)
                meter.add(len(chunk))
            check.finish()  # before commit: an incomplete archive never replaces a backup
            stat = w.commit()
    except OSError as exc:
        raise BackupError(f"writing {store}/{tmp} failed: {exc.strerror or exc}; nothing was "
                          f"replaced",
                          hint="check free space and permissions of the backup directory"
                          ) from None
    finally:
        check.close()
    if current is not None:  # keep the previous generation as NAME@<hash12>.tar
        gen = f"{name}@{_generation(existing)}.tar"
        store.remove(gen, sidecar_name(gen))
        store.link(tar, gen)
        if existing is not None:
            store.link(sidecar_name(tar), sidecar_name(gen))
    store.rename(tmp, tar)
    final = store.stat(tar)  # the rename moved its ctime
    if final is None or final.size != stat.size:
        raise BackupError(f"{store}/{tar} is not there after it was written")
    sidecar = _new_sidecar(name, info, final, h.hexdigest())
    store.write_text(sidecar_name(tar), sidecar.to_json())
    _prune_generations(store, name, keep)
    return BackupResult(f"{store}/{tar}", tar, sidecar, written=True,
                        seconds=time.monotonic() - started, local_tar=store.local_path(tar))


def _generation(old: Sidecar | None) -> str:
    if old is not None and old.input_hash:
        return hash12(old.input_hash)
    if old is not None:
        return short_id(old.image_id)
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S")


def generations(store: BackupDir, name: str, files: dict[str, FileStat] | None = None
                ) -> list[str]:
    """Older generations of ``name`` (``NAME@*.tar``), newest first."""
    files = store.files() if files is None else files
    gens = [f for f in files if f.startswith(f"{name}@") and f.endswith(".tar")]
    return sorted(gens, key=lambda f: files[f].mtime_ns, reverse=True)


def _prune_generations(store: BackupDir, name: str, keep: int) -> None:
    """Keep ``keep`` generations in all: NAME.tar and the ``keep - 1`` newest older ones."""
    old = generations(store, name)[max(keep - 1, 0):]
    store.remove(*old, *(sidecar_name(g) for g in old))


# -- finding ---------------------------------------------------------------------------------


def find_backup(store: BackupDir, name: str, match: Callable[[Sidecar], bool]) -> str | None:
    """The newest backup tar of ``name`` (current, then older generations) whose sidecar
    matches; a generation with an unreadable sidecar is passed over, not fatal."""
    files = store.files()
    for tar in [tar_name(name), *generations(store, name, files)]:
        if tar not in files:
            continue
        try:
            sc = read_sidecar(store, tar)
        except BackupError:
            continue
        if sc is not None and match(sc):
            return tar
    return None


def find_substitute(store: BackupDir, name: str, input_hash: str) -> str | None:
    """A backup tar (current or older generation) of exactly this derivation."""
    return find_backup(store, name, lambda sc: sc.input_hash == input_hash)


# -- restoring -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreResult:
    name: str
    info: ImageInfo
    loaded: bool  # False: the image was already present (no-op)
    seconds: float = 0.0


def _guard(where: str, sidecar: Sidecar) -> TarGuard:
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


def _present(engine: Engine, sidecar: Sidecar) -> ImageInfo | None:
    """The sidecar's image in ``engine``: by its ID, or, written by a head on the other
    image store (the IDs differ, the content does not), by its hash tag and content
    fingerprint."""
    info = engine.inspect(sidecar.image_id)
    if info is None and sidecar.hash_tag is not None:
        info = engine.inspect(sidecar.hash_tag)
        if info is not None and info.fingerprint != sidecar.fingerprint:
            info = None
    return info


def restore_backup(engine: Engine, store: BackupDir, tar: str, progress: Progress,
                   expect_image: str | None = None) -> RestoreResult:
    """Load ``tar`` (a no-op when its image is present), checked as it streams: its size,
    sha256, tags and config against its sidecar, the tail held back until all pass. Then
    restore its hash tag. ``latest`` is promote's, after the gate."""
    where = f"{store}/{tar}"
    sidecar = read_sidecar(store, tar)
    if sidecar is None:
        raise BackupError(f"{where} has no readable sidecar ({where}.json); refusing to load "
                          f"a tar whose content cannot be checked")
    if expect_image is not None and sidecar.image != expect_image:
        raise BackupError(f"{where} is a backup of {sidecar.image}, not {expect_image}")
    started = time.monotonic()
    present = _present(engine, sidecar)
    loaded = present is None
    if present is None:
        stat = store.stat(tar)
        if stat is None:
            raise BackupError(f"{where} is missing (its sidecar is there)")
        if stat.size != sidecar.size:
            raise BackupError(
                f"{where} is {stat.size} bytes but its sidecar says {sidecar.size}: "
                f"truncated or altered; nothing was loaded",
                hint="restore from an older generation (NAME@<hash12>.tar) with --file, or "
                     "rebuild")
        progress.say(f"  loading {where} ({sidecar.size / 1e9:.2f} GB), checked as it "
                     f"streams")
        guard = _guard(where, sidecar)
        engine.load(guard.feed(store.read(tar, progress.meter(f"loading {tar}",
                                                              sidecar.size))))
        present = _present(engine, sidecar)
        if present is None:
            raise BackupError(f"loading {where} did not produce the image named in its "
                              f"sidecar ({sidecar.hash_tag or sidecar.image_id[:19]} with "
                              f"content {sidecar.fingerprint[:19]})",
                              hint="the tar and its sidecar do not belong together")
    if present.fingerprint != sidecar.fingerprint:
        raise BackupError(f"{where}: the image {short_id(present.id)} does not have the "
                          f"content its sidecar names")
    if sidecar.hash_tag is not None:
        engine.tag(present.id, *split_ref(sidecar.hash_tag))
    info = engine.require(present.id)
    return RestoreResult(sidecar.image, info, loaded=loaded, seconds=time.monotonic() - started)


def checked_tar(store: BackupDir, tar: str, sidecar: Sidecar, progress: Progress
                ) -> PinnedFile:
    """A local backup tar opened for sending: the same descriptor that is checked is
    sent from. Still the file that was hashed when it was written (size, mtime, inode,
    ctime), or hashed again now against its sidecar."""
    path = store.local_path(tar)
    if path is None:
        raise BackupError(f"{store}/{tar} is not on this host")
    try:
        f = PinnedFile.open(path)
    except OSError as exc:
        raise BackupError(f"cannot open {path}: {exc.strerror or exc}") from None
    st = os.fstat(f.fd)
    if not sidecar.written_as(FileStat.of(st)):
        if st.st_size != sidecar.size:
            f.close()
            raise BackupError(f"{path} is {st.st_size} bytes but its sidecar says "
                              f"{sidecar.size}: truncated or altered; nothing was sent",
                              hint="write the backup again: imagebuild backup NAME")
        actual = f.sha256(progress.meter(f"checking {tar}", sidecar.size))
        if actual != sidecar.sha256:
            f.close()
            raise BackupError(f"{path} does not match its sidecar; nothing was sent\n"
                              f"  expected sha256 {sidecar.sha256}\n  actual   sha256 {actual}",
                              hint="write the backup again: imagebuild backup NAME")
    return f


def local_tar(path: Path) -> tuple[LocalDir, str]:
    """A tar given by path (``restore-from-tar --file``) as a store and a name."""
    return LocalDir(path.parent), path.name
