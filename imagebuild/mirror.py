"""Mirrors of the layer store on other hosts (``backups.mirror: ssh://control-node/...``).

A mirror is a layer store of its own (docs/layer-store.md), kept in step with the
primary store after each backup: for every generation the primary keeps, the blobs the
mirror lacks are sent (read from the primary checked against their digest, written on
the mirror under a temporary name, hashed there by ``sha256sum`` and renamed into
``blobs/sha256/`` only when the far side's digest is the name), then the generation is
assembled there (hard links into its blobs, renamed into place last, its sidecar and
``current`` after it), and generations beyond ``keep`` are pruned with the same rules.
Nothing is written outside the mirror's directory. A blob ``backup --check --mirror``
found damaged on the mirror is sent again by the next copy, and every generation that
uses it assembled again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .errors import BackupError, ImagebuildError, StoreBusy, reason
from .layerstore import (
    BLOBS,
    CURRENT,
    INCOMING,
    GenSidecar,
    assemble,
    blob_path,
    current_generation,
    image_dir,
    image_names,
    is_complete,
    list_generations,
    prune,
    read_gen_sidecar,
    run_token,
)
from .progress import Progress
from .store import BackupDir, FileStat, writing
from .storelock import StoreLock
from .streams import checked


@dataclass
class MirrorResult:
    where: str
    blobs_sent: int = 0
    bytes_sent: int = 0
    generations: list[str] = field(default_factory=list)  # "name hash12" put in place
    dropped: list[str] = field(default_factory=list)  # "name hash12" pruned there
    seconds: float = 0.0
    error: str | None = None  # it could not be brought up to date (unreachable, ...)


def copy_to_mirror(local: BackupDir, mirror: BackupDir, names: list[str], keep: int,
                   progress: Progress, damaged: frozenset[str] = frozenset()
                   ) -> MirrorResult:
    """Bring ``mirror`` up to date with the generations ``local`` keeps of ``names``
    (see the module's text); ``damaged``: blobs known to be damaged on the mirror.
    Raises what makes the mirror unusable (unreachable, locked, a blob refused)."""
    started = time.monotonic()
    result = MirrorResult(str(mirror))
    mirror.prepare()
    mirror.mkdirs(BLOBS, INCOMING)
    with StoreLock(mirror, "shared", f"a mirror copy of {', '.join(names)}"):
        have = mirror.files(BLOBS)
        sent: set[str] = set()  # this run's: a damaged blob is sent again once
        for name in names:
            current = current_generation(local, name)
            gens = sorted(list_generations(local, name),
                          key=lambda g: current is not None and g.hash12 == current.hash12)
            for sc in gens:  # the current one last: it is what `current` names there
                is_current = current is not None and sc.hash12 == current.hash12
                if _in_place(mirror, sc, have, damaged):
                    if is_current and _current_there(mirror, name) != sc.hash12:
                        mirror.write_text(f"{image_dir(name)}/{CURRENT}", sc.hash12 + "\n")
                    continue
                for d, size in sorted({(str(v[0]), int(v[1])) for v in sc.files.values()}):
                    if d in have and have[d].size == size and d not in damaged - sent:
                        continue
                    _send_blob(local, mirror, d, size, result, progress,
                               replace=d in damaged)
                    have[d] = FileStat(size, 0)
                    sent.add(d)
                assemble(mirror, sc, current=is_current)
                result.generations.append(f"{name} {sc.hash12}")
    try:
        with StoreLock(mirror, "exclusive", "pruning a mirror"):
            for name in names:
                result.dropped += [f"{name} {g.hash12}" for g in prune(mirror, name, keep)]
    except StoreBusy as exc:
        progress.say(f"  {mirror}: older generations kept for now: {exc.message}")
    result.seconds = time.monotonic() - started
    return result


def _in_place(mirror: BackupDir, sc: GenSidecar, have: dict[str, FileStat],
              damaged: frozenset[str]) -> bool:
    try:
        there = read_gen_sidecar(mirror, sc.image, sc.hash12)
    except BackupError:
        return False
    return (there is not None and there.files == sc.files and there.links == sc.links
            and sc.hash12 in mirror.dirs(image_dir(sc.image))
            and is_complete(mirror, sc, have) and not (sc.blobs() & damaged))


def _current_there(mirror: BackupDir, name: str) -> str:
    return (mirror.read_text(f"{image_dir(name)}/{CURRENT}") or "").strip()


def _send_blob(local: BackupDir, mirror: BackupDir, digest: str, size: int,
               result: MirrorResult, progress: Progress, *, replace: bool) -> None:
    """One blob to the mirror: checked as it is read here, hashed again there, put in
    place only when the mirror's own digest is its name: over the mirror's copy when
    that is known to be damaged (``replace``), else never over a copy another run put
    there (it may be linked into a generation already)."""
    tmp = f"{INCOMING}/{run_token()}-m{result.blobs_sent}"
    meter = progress.meter(f"to {mirror}: blob {digest[:12]}", size)
    with writing(mirror, tmp) as w:
        for chunk in checked(local.read(blob_path(digest)), digest, size,
                             f"{local}/{blob_path(digest)}", blob_path(digest)):
            w.write(chunk)
            meter.add(len(chunk))
        w.commit()
    progress.end_live()
    got = mirror.sha256(tmp)
    if got != digest:
        mirror.remove(tmp)
        raise BackupError(f"{mirror}: blob {digest[:12]} arrived as sha256 {got[:12]}; it "
                          f"was not kept",
                          hint="check the mirror host's disk and the network; run the backup "
                               "again")
    if replace:
        mirror.rename(tmp, blob_path(digest))
    else:
        mirror.place(tmp, blob_path(digest))
    result.blobs_sent += 1
    result.bytes_sent += size


@dataclass(frozen=True)
class MirrorState:
    where: str
    state: str  # "current", "behind by N generations", "unreachable: ..."


def mirror_state(local: BackupDir, mirror: BackupDir) -> MirrorState:
    """How far the mirror is from the primary store: the generations the primary keeps
    that the mirror lacks (by their sidecars; ``backup --check --mirror`` hashes them)."""
    try:
        missing = 0
        for name in image_names(local):
            there = {g.hash12 for g in list_generations(mirror, name)}
            missing += sum(1 for g in list_generations(local, name) if g.hash12 not in there)
    except (ImagebuildError, OSError) as exc:
        return MirrorState(str(mirror), f"unreachable: {reason(exc)}")
    return MirrorState(str(mirror), "current" if not missing else
                       f"behind by {missing} generation{'s' if missing > 1 else ''}")
