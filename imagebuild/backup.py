"""Backups of verified images in the layer store (layerstore.py), and restoring them.

``write_backup`` saves an image into the store of a ``BackupDir`` (local or ssh://) as a
generation: only the layers the store lacks are written, the generation appears only when
complete, generations beyond ``keep`` are pruned and blobs no generation links are
removed. Tar backups from before the store (``NAME.tar`` + ``NAME.tar.json``) are
imported into it on the next backup of their image; until then, and for any tar given
with ``restore-from-tar --file``, they restore as before: checked against their sidecar
(size, sha256, tags, content) as they stream into ``docker load``.

Readers see both kinds as ``Backup`` (by ``key``: a generation's directory, or a tar's
file name): ``backups_of`` lists them newest first, ``find_substitute`` finds one by
input hash, ``restore_backup`` loads one, ``generation_archive`` opens one for sending.
``latest`` is never touched here: that is promote's, after the gate.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .archive import (
    ArchiveIndex,
    docker_pieces,
)
from .engine import Engine
from .errors import BackupError, StoreBusy
from .fsutil import atomic_write_text
from .image import ImageInfo
from .layerstore import (
    BLOBS,
    CURRENT,
    IMAGES,
    GenSidecar,
    Meta,
    Wanted,
    current_generation,
    damaged,
    image_dir,
    ingest,
    ingest_many,
    is_complete,
    list_generations,
    prune,
    read_gen_sidecar,
    space_needed,
)
from .naming import hash12, hash_tag, input_hash, short_id, split_ref
from .progress import Progress
from .store import BackupDir, LocalDir
from .storelock import StoreLock
from .streams import DamagedBytes, archive_chunks, piece_size
from .tarbackup import Sidecar, guard, legacy_tars, read_sidecar, sidecar_name

SPACE_MARGIN = 64 << 20  # headers, small files and sidecars, on top of the new layers


def check_space(store: object, free: int, need: int, what: str) -> None:
    """Refuse before writing anything when ``store`` has less than ``need`` free."""
    if free < need:
        raise BackupError(
            f"{store} has {free / 1e9:.2f} GB free, but {what} needs about "
            f"{need / 1e9:.2f} GB: nothing was written",
            hint="free space there, or point backups.directory at a larger disk",
        )


# -- one view of both kinds ------------------------------------------------------------------


@dataclass(frozen=True)
class Backup:
    """A backup of one image: a generation of the layer store (``key`` is its directory,
    ``images/<name>/<hash12>``), or a tar from before the store (``key``: its file)."""

    key: str
    image: str
    image_id: str
    fingerprint: str
    input_hash: str | None
    size: int
    created: str
    gen: GenSidecar | None = None
    tar: Sidecar | None = None

    @property
    def hash_tag(self) -> str | None:
        return f"{self.image}:{hash12(self.input_hash)}" if self.input_hash else None

    @classmethod
    def of_gen(cls, sc: GenSidecar) -> Backup:
        return cls(sc.key, sc.image, sc.image_id, sc.fingerprint, sc.input_hash, sc.size,
                   sc.created, gen=sc)

    @classmethod
    def of_tar(cls, tar: str, sc: Sidecar) -> Backup:
        return cls(tar, sc.image, sc.image_id, sc.fingerprint, sc.input_hash, sc.size,
                   sc.created, tar=sc)


def backups_of(store: BackupDir, name: str) -> list[Backup]:
    """Every backup of ``name``: the current generation, the older ones newest first,
    then tars from before the layer store. An unreadable sidecar is passed over
    (``backup --check`` reports it)."""
    gens = list_generations(store, name)
    current = current_generation(store, name)
    if current is not None:
        gens = [current, *(g for g in gens if g.hash12 != current.hash12)]
    out = [Backup.of_gen(g) for g in gens]
    for tar in legacy_tars(store, name):
        try:
            sc = read_sidecar(store, tar)
        except BackupError:
            continue
        if sc is not None:
            out.append(Backup.of_tar(tar, sc))
    return out


def find_backup(store: BackupDir, name: str, match: Callable[[Backup], bool]) -> Backup | None:
    return next((b for b in backups_of(store, name) if match(b)), None)


def find_substitute(store: BackupDir, name: str, input_hash: str) -> str | None:
    """The key of a backup of exactly this derivation."""
    hit = find_backup(store, name, lambda b: b.input_hash == input_hash)
    return hit.key if hit is not None else None


def lookup(store: BackupDir, key: str) -> Backup:
    """The backup ``key`` names; a missing or unreadable one is an error."""
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == "images":
        sc = read_gen_sidecar(store, parts[1], parts[2])
        if sc is None or parts[2] not in store.dirs(f"images/{parts[1]}"):
            raise BackupError(f"{store}/{key} is not a complete backup generation",
                              hint="see 'imagebuild status'; run 'imagebuild backup'")
        return Backup.of_gen(sc)
    tsc = read_sidecar(store, key)
    if tsc is None:
        raise BackupError(f"{store}/{key} has no readable sidecar ({key}.json); refusing to "
                          f"load a tar whose content cannot be checked",
                          hint="a tar imagebuild did not write (docker save by hand, the "
                               "field's backups): 'imagebuild restore-from-tar --file TAR "
                               "--adopt [NAME]' loads it under a quarantine tag, runs NAME's "
                               "checks, and only if they pass makes it NAME:latest, rooted "
                               "and backed up")
    return Backup.of_tar(key, tsc)


# -- writing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackupResult:
    where: str  # the generation directory, as a path or an ssh:// URL
    backup: Backup
    written: bool  # False: this generation was in the store already
    bytes_written: int = 0  # new blob bytes (0: every layer was there)
    bytes_read: int = 0  # bytes of the save stream
    seconds: float = 0.0
    imported: tuple[str, ...] = ()  # tar backups moved into the store by this run
    dropped: tuple[str, ...] = ()  # generations pruned beyond backups.keep

    @property
    def key(self) -> str:
        return self.backup.key


def generation_of(info: ImageInfo) -> str:
    h = input_hash(info)
    return hash12(h) if h else short_id(info.id)


def write_backup(store: BackupDir, engine: Engine, name: str, info: ImageInfo, keep: int,
                 progress: Progress) -> BackupResult:
    """Save ``info`` (verified: the caller checked) into the layer store as a generation of
    ``name``: ``write_backups`` of one image."""
    return write_backups(store, engine, [(name, info)], keep, progress)[0]


def write_backups(store: BackupDir, engine: Engine, images: list[tuple[str, ImageInfo]],
                  keep: int, progress: Progress) -> list[BackupResult]:
    """Save the images (verified: the caller checked; parents first) into the layer store,
    one generation each, in one ``docker save`` (the layers they share come once); only
    layers the store lacks are written, and an image whose generation is complete there
    is not saved again. Then tar backups of these images from before the store are
    imported, and generations beyond ``keep`` pruned."""
    store.prepare()
    with StoreLock(store, "shared", f"a backup of {', '.join(n for n, _ in images)}"):
        done, imported, seconds = _write(store, engine, images, progress)
    dropped: dict[str, list[GenSidecar]] = {}
    try:  # removing needs the store to itself: no other run may be writing into it
        with StoreLock(store, "exclusive", "pruning after a backup"):
            dropped = {name: prune(store, name, keep) for name, _info in images}
    except StoreBusy as exc:
        progress.say(f"  older generations kept for now (pruned by a later backup): "
                     f"{exc.message}")
    results = []
    for name, _info in images:
        sc, written, read = done[name]
        results.append(BackupResult(
            f"{store}/{sc.key}", Backup.of_gen(sc), written >= 0,
            bytes_written=max(written, 0), bytes_read=read, seconds=seconds,
            imported=tuple(imported[name]),
            dropped=tuple(d.hash12 for d in dropped.get(name, []))))
    return results


def _write(store: BackupDir, engine: Engine, images: list[tuple[str, ImageInfo]],
           progress: Progress
           ) -> tuple[dict[str, tuple[GenSidecar, int, int]], dict[str, list[str]], float]:
    """The writing half of ``write_backups`` (under its shared lock): each image's
    generation (sidecar, bytes written or -1 when it was there, bytes read), the old tars
    imported, the seconds it took."""
    started = time.monotonic()
    done: dict[str, tuple[GenSidecar, int, int]] = {}
    todo: list[tuple[str, ImageInfo, str]] = []
    blobs = store.files(BLOBS)  # one listing for every image's completeness
    for name, info in images:
        h12 = generation_of(info)
        try:
            existing = read_gen_sidecar(store, name, h12)
        except BackupError:
            existing = None
        if (existing is not None and existing.image_id == info.id
                and h12 in store.dirs(image_dir(name)) and is_complete(store, existing, blobs)):
            if (current := current_generation(store, name)) is None or current.hash12 != h12:
                store.write_text(f"{image_dir(name)}/{CURRENT}", h12 + "\n")
            done[name] = (existing, -1, 0)
        else:
            todo.append((name, info, h12))
    # one save for all, when each is saved by its hash tag (how an archive of several
    # names its images); else one save each
    batches = [todo] if all(hash_tag(n, i) for n, i, _ in todo) else [[t] for t in todo]
    for batch in batches if todo else []:
        what = ", ".join(n for n, _, _ in batch)
        need = space_needed(store, [info for _, info, _ in batch]) + SPACE_MARGIN
        check_space(store, store.free_bytes(), need, f"a backup of {what}")
        refs = [hash_tag(n, info) or info.id for n, info, _ in batch]  # restores the tag
        wanted = [Wanted(n, h12, Meta.of(n, info), ref if len(batch) > 1 else None)
                  for (n, info, h12), ref in zip(batch, refs, strict=True)]
        progress.say(f"  saving {' '.join(refs)} into {store} (only layers it lacks are "
                     f"written)")
        try:
            got = ingest_many(store, functools.partial(engine.save, *refs), wanted,
                              f"{store}/{IMAGES}",
                              functools.partial(progress.meter, f"saving {what}"))
        except OSError as exc:
            raise BackupError(f"writing into {store} failed: {exc.strerror or exc}; the "
                              f"previous generations are intact",
                              hint="check free space and permissions of the backup directory"
                              ) from None
        for w in got:
            done[w.sidecar.image] = (w.sidecar, w.written, w.read)
    seconds = time.monotonic() - started
    imported = {name: _import_tars(store, name, progress) for name, _info in images}
    return done, imported, seconds


def _import_tars(store: BackupDir, name: str, progress: Progress) -> list[str]:
    """Move ``NAME.tar`` and its older generations into the layer store: each becomes a
    generation (checked against its sidecar as it is read), then the tar is removed. A
    tar that fails is kept and named; it stays restorable with ``--file``."""
    done = []
    for tar in legacy_tars(store, name):
        try:
            sc = read_sidecar(store, tar)
        except BackupError as exc:
            progress.say(f"  {name}: {tar} not imported: {exc.message}")
            continue
        if sc is None or sc.image != name:
            continue
        h12 = hash12(sc.input_hash) if sc.input_hash else short_id(sc.image_id)
        try:
            have = read_gen_sidecar(store, name, h12)
        except BackupError:
            have = None
        if have is None or have.image_id != sc.image_id:
            progress.say(f"  {name}: importing {tar} into the layer store")
            meta = Meta(sc.image_id, sc.fingerprint, sc.input_hash, sc.tags, sc.size, (),
                        sc.sha256, created=sc.created)
            try:
                ingest(store, functools.partial(store.read, tar), name, h12, meta,
                       f"{store}/{tar}", current=False)
            except (BackupError, OSError) as exc:
                why = exc.message if isinstance(exc, BackupError) else str(exc)
                progress.say(f"  {name}: {tar} not imported, kept as it is: {why}")
                continue
        store.remove(tar, sidecar_name(tar))
        done.append(tar)
    return done


# -- restoring -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreResult:
    name: str
    info: ImageInfo
    loaded: bool  # False: the image was already present (no-op)
    seconds: float = 0.0


def _present(engine: Engine, b: Backup) -> ImageInfo | None:
    """The backup's image in ``engine``: by its ID, or, written by a head on the other
    image store (the IDs differ, the content does not), by its hash tag and content
    fingerprint."""
    info = engine.inspect(b.image_id)
    if info is None and b.hash_tag is not None:
        info = engine.inspect(b.hash_tag)
        if info is not None and info.fingerprint != b.fingerprint:
            info = None
    return info


def restore_backup(engine: Engine, store: BackupDir, key: str, progress: Progress,
                   expect_image: str | None = None) -> RestoreResult:
    """Load the backup ``key`` (a no-op when its image is present), checked as it
    streams: a generation's every file against its digest, a tar's size and sha256
    against its sidecar; tags and config before anything is released, the end held back
    until all pass. Then restore its hash tag. ``latest`` is promote's, after the gate."""
    where = f"{store}/{key}"
    b = lookup(store, key)
    if expect_image is not None and b.image != expect_image:
        raise BackupError(f"{where} is a backup of {b.image}, not {expect_image}")
    started = time.monotonic()
    present = _present(engine, b)
    loaded = present is None
    if present is None:
        progress.say(f"  loading {where} ({b.size / 1e9:.2f} GB), checked as it streams")
        meter = progress.meter(f"loading {b.image}", b.size)
        if b.gen is not None:
            with generation_archive(store, b) as archive:  # tags and content checked
                try:
                    engine.load_archive(docker_pieces(archive), meter.to)
                except DamagedBytes as exc:  # name every generation that shares the blob
                    raise damaged(store, b.gen, exc.label, exc.got) from None
        else:
            assert b.tar is not None
            stat = store.stat(key)
            if stat is None:
                raise BackupError(f"{where} is missing (its sidecar is there)")
            if stat.size != b.tar.size:
                raise BackupError(
                    f"{where} is {stat.size} bytes but its sidecar says {b.tar.size}: "
                    f"truncated or altered; nothing was loaded",
                    hint="restore from an older generation with --file, or rebuild")
            engine.load(guard(where, b.tar).feed(store.read(key, meter)))
        present = _present(engine, b)
        if present is None:
            raise BackupError(f"loading {where} did not produce the image its sidecar names "
                              f"({b.hash_tag or b.image_id[:19]} with content "
                              f"{b.fingerprint[:19]})",
                              hint="the archive and its sidecar do not belong together")
    if present.fingerprint != b.fingerprint:
        raise BackupError(f"{where}: the image {short_id(present.id)} does not have the "
                          f"content its sidecar names")
    if b.hash_tag is not None:
        engine.tag(present.id, *split_ref(b.hash_tag))
    info = engine.require(present.id)
    return RestoreResult(b.image, info, loaded=loaded, seconds=time.monotonic() - started)


def generation_archive(store: BackupDir, b: Backup) -> ArchiveIndex:
    """A generation, in a store on this host or another, as the ``docker save`` archive
    that restore, distribute, publish and export send (``archive.docker_pieces``):
    checked before a byte is sent (its manifest and config hold the image its sidecar
    names and would apply no tag but its hash tag; on this host, every file is there at
    its size, opened once so what is checked is what is sent), and every file checked
    against its digest as it streams."""
    if b.gen is None:
        raise BackupError(f"{store}/{b.key} is a tar from before the layer store",
                          hint="run 'imagebuild backup' to import it")
    gen = b.gen
    path = store.local_path(b.key)
    if path is None:
        archive = ArchiveIndex.from_store(
            f"{store}/{b.key}", {p: (str(v[0]), int(v[1])) for p, v in gen.files.items()},
            dict(gen.links), lambda rel: store.read(f"{b.key}/{rel}"))
    else:
        for rel, (_, size) in gen.files.items():  # a truncated file: refused before sending
            try:
                got = os.stat(path / rel).st_size
            except OSError:
                got = -1
            if got != size:
                raise damaged(store, gen, rel, f"{got} bytes" if got >= 0 else "no file")
        archive = ArchiveIndex.from_directory(
            path, {p: str(v[0]) for p, v in gen.files.items()}, dict(gen.links))
    try:
        archive.check(gen.fingerprint, {gen.hash_tag} if gen.hash_tag else set())
        if list(archive.layers) != gen.layer_files or list(archive.diff_ids) != gen.layers:
            raise BackupError(f"{store}/{b.key}: its manifest.json and its sidecar differ")
    except BaseException:
        archive.close()
        raise
    return archive


@dataclass(frozen=True)
class ExportResult:
    image: str
    path: Path
    generation: str  # hash12 of the generation written out
    size: int
    sha256: str
    seconds: float


def export_backup(store: BackupDir, b: Backup, dest: Path, progress: Progress
                  ) -> ExportResult:
    """Write the generation ``b`` out as one plain ``docker save`` tar at ``dest``, with
    its sidecar beside it (``dest``.json, as ``restore-from-tar --file`` checks it):
    every file checked against its digest as it passes, free space checked first, the
    tar written under a temporary name, synced and renamed into place only when whole
    (a damaged blob leaves no file)."""
    if b.gen is None:
        raise BackupError(f"{store}/{b.key} is a tar already (from before the layer store)",
                          hint=f"copy it and its sidecar {b.key}.json")
    started = time.monotonic()
    with generation_archive(store, b) as archive:
        pieces = docker_pieces(archive)
        size = sum(piece_size(p) for p in pieces)
        try:
            free = shutil.disk_usage(dest.parent).free
        except OSError as exc:
            raise BackupError(f"cannot write {dest}: {exc.strerror or exc}",
                              hint="name a directory that exists with -o") from None
        check_space(dest.parent, free, size + SPACE_MARGIN, f"exporting {b.image}")
        tmp = dest.parent / f".{dest.name}.{os.getpid()}.partial"
        h = hashlib.sha256()
        meter = progress.meter(f"exporting {b.image}", size)
        try:
            with open(tmp, "xb") as f:
                for chunk in archive_chunks(pieces, meter.to):
                    f.write(chunk)
                    h.update(chunk)
                f.flush()
                os.fsync(f.fileno())
            st = os.stat(tmp)
            sidecar = Sidecar(
                image=b.image, image_id=b.image_id, fingerprint=b.fingerprint,
                input_hash=b.input_hash, tags=list(b.gen.tags), size=st.st_size,
                sha256=h.hexdigest(), created=b.created, mtime_ns=st.st_mtime_ns,
                ino=st.st_ino, ctime_ns=st.st_ctime_ns)
            os.replace(tmp, dest)
            atomic_write_text(dest.parent / sidecar_name(dest.name), sidecar.to_json())
        except DamagedBytes as exc:
            raise damaged(store, b.gen, exc.label, exc.got) from None
        except OSError as exc:
            raise BackupError(f"writing {dest} failed: {exc.strerror or exc}; nothing was "
                              f"left there", hint="check free space and permissions") from None
        finally:
            tmp.unlink(missing_ok=True)
            progress.end_live()
    return ExportResult(b.image, dest, b.gen.hash12, size, h.hexdigest(),
                        time.monotonic() - started)


def local_tar(path: Path) -> tuple[LocalDir, str]:
    """A tar given by path (``restore-from-tar --file``) as a store and a name."""
    if not re.fullmatch(r"[A-Za-z0-9._@+-]+", path.name):
        raise BackupError(f"{path}: imagebuild reads tars named with letters, digits and "
                          f"._@+- only", hint="rename it (and its .json sidecar)")
    return LocalDir(path.parent), path.name
