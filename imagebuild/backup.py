"""Tar backups of verified images, and restoring them, in any ``BackupDir``.

A backup is ``NAME.tar`` plus a JSON sidecar ``NAME.tar.json``. It is streamed from
``docker save`` into a temporary name in the same directory (never /tmp), hashed while it
streams, synced, its size checked, then renamed into place; the previous generation stays
as ``NAME@<hash12>.tar`` (a hard link), and generations beyond ``keep`` are pruned. The
same code writes a local directory and one on another host (store.py).

A restore checks the tar against its sidecar (size, sha256) before anything is loaded,
loads it, checks the image ID and restores the hash tag. ``latest`` is not touched here:
that is promote's, after the gate.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

from . import __version__
from .engine import Engine, ImageInfo
from .errors import BackupError
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
        ints = (sc.size, sc.mtime_ns)
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in ints):
            raise ValueError("size and mtime_ns must be whole numbers")
        strs = (sc.image, sc.image_id, sc.fingerprint, sc.sha256, sc.created)
        if not all(isinstance(v, str) for v in strs):
            raise ValueError("image, image_id, fingerprint, sha256 and created must be strings")
        if not isinstance(sc.tags, list) or not all(isinstance(t, str) for t in sc.tags):
            raise ValueError("tags must be a list of strings")
        if sc.input_hash is not None and not isinstance(sc.input_hash, str):
            raise ValueError("input_hash must be a string or null")
        return sc


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
    if (existing and existing.image_id == info.id and current is not None
            and (current.size, current.mtime_ns) == (existing.size, existing.mtime_ns)):
        return BackupResult(f"{store}/{tar}", tar, existing, written=False,
                            local_tar=store.local_path(tar))
    _clean_partials(store, name, files)
    check_space(store, store.free_bytes(), info.size + SPACE_MARGIN, f"a backup of {name}")
    ref = hash_tag(name, info) or info.id  # the hash tag, so the tar restores it
    tmp = _partial_name(name)
    started = time.monotonic()
    h = hashlib.sha256()
    meter = progress.meter(f"saving {name} to {store}", info.size)
    try:
        with writing(store, tmp) as w:
            for chunk in engine.save(ref):
                w.write(chunk)
                h.update(chunk)
                meter.add(len(chunk))
            stat = w.commit()
    except OSError as exc:
        raise BackupError(f"writing {store}/{tmp} failed: {exc.strerror or exc}; nothing was "
                          f"replaced",
                          hint="check free space and permissions of the backup directory"
                          ) from None
    sidecar = _new_sidecar(name, info, stat, h.hexdigest())
    if current is not None:  # keep the previous generation as NAME@<hash12>.tar
        gen = f"{name}@{_generation(existing)}.tar"
        store.remove(gen, sidecar_name(gen))
        store.link(tar, gen)
        if existing is not None:
            store.link(sidecar_name(tar), sidecar_name(gen))
    store.rename(tmp, tar)
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


def check_tar(store: BackupDir, tar: str, sidecar: Sidecar, progress: Progress) -> None:
    """Refuse a tar that is missing, truncated or whose sha256 differs from its sidecar."""
    where = f"{store}/{tar}"
    stat = store.stat(tar)
    if stat is None:
        raise BackupError(f"{where} is missing (its sidecar is there)")
    if stat.size != sidecar.size:
        raise BackupError(
            f"{where} is {stat.size} bytes but its sidecar says {sidecar.size}: truncated or "
            f"altered; nothing was loaded",
            hint="restore from an older generation (NAME@<hash12>.tar) with --file, or "
                 "rebuild",
        )
    actual = store.sha256(tar, progress.meter(f"checking {tar}", stat.size))
    if actual != sidecar.sha256:
        raise BackupError(
            f"{where} does not match its sidecar; nothing was loaded\n"
            f"  expected sha256 {sidecar.sha256}\n  actual   sha256 {actual}",
            hint="the file is corrupt: restore an older generation with --file, or rebuild",
        )


def restore_backup(engine: Engine, store: BackupDir, tar: str, progress: Progress,
                   expect_image: str | None = None) -> RestoreResult:
    """Load ``tar`` after checking it against its sidecar (a no-op when the image is
    present), then restore its hash tag. ``latest`` is promote's, after the gate."""
    where = f"{store}/{tar}"
    sidecar = read_sidecar(store, tar)
    if sidecar is None:
        raise BackupError(f"{where} has no readable sidecar ({where}.json); refusing to load "
                          f"a tar whose content cannot be checked")
    if expect_image is not None and sidecar.image != expect_image:
        raise BackupError(f"{where} is a backup of {sidecar.image}, not {expect_image}")
    started = time.monotonic()
    present = engine.inspect(sidecar.image_id)
    loaded = present is None
    if present is None:
        check_tar(store, tar, sidecar, progress)
        progress.say(f"  loading {where} ({sidecar.size / 1e9:.2f} GB)")
        engine.load(store.read(tar, progress.meter(f"loading {tar}", sidecar.size)))
        present = engine.inspect(sidecar.image_id)
        if present is None:
            raise BackupError(f"loading {where} did not produce image {sidecar.image_id[:19]} "
                              f"named in its sidecar",
                              hint="the tar and its sidecar do not belong together")
    for ref in sidecar.tags:
        repo, tag = split_ref(ref)
        if ref != latest_tag(repo):
            engine.tag(present.id, repo, tag)
    info = engine.require(present.id)
    return RestoreResult(sidecar.image, info, loaded=loaded, seconds=time.monotonic() - started)


def local_tar(path: Path) -> tuple[LocalDir, str]:
    """A tar given by path (``restore-from-tar --file``) as a store and a name."""
    return LocalDir(path.parent), path.name
