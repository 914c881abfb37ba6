"""The wheel store: built wheels kept by content, and which derivation made which.

    <store>/sha256/<sha256>/<filename>     a wheel (the filename is kept: installers read
                                           its name, version and tags from it)
    <store>/derivations/<input hash>.json  what the derivation with that hash made
    <store>/incoming/                      builds in progress (renamed into place)

A prebuilt wheel declared by URL (``wheels.url``) is downloaded once into the same
store (``wheelbuild.fetch_wheels``), kept only when its sha256 is the declared one.

``imagebuild status`` shows what the store holds (``store_state``): each wheel locked by
wheels.lock, built by the spec's current derivation but not locked yet, or referred to
by nothing; ``imagebuild prune`` removes the last kind (``prune_store``).

A wheel is renamed to its final name only when it is complete, checked and hashed; the
derivation's record is written (atomically) after it. So a crash leaves either nothing
or a wheel without a record (built again next time, same bytes, same place), never a
record of a partial wheel. Records are parsed and checked when read: one that does not
parse, or whose wheel is gone, is not a hit.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from .errors import LockError
from .fsutil import atomic_write_text, fsync_dir
from .lock import SHA256, WHEEL_FILE, Lock, LockedWheel, parse_wheel
from .spec import Spec
from .untrusted import loads_json
from .wheelplan import WheelDerivation, wheel_plan

RECORD_SCHEMA = 1
_HASH = re.compile(r"^[0-9a-f]{64}\Z")
_IMAGE_ID = re.compile(r"^sha256:[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class WheelRecord:
    """What one wheel derivation made."""

    name: str
    version: str
    filename: str
    sha256: str
    input_hash: str
    built: str  # UTC, ISO 8601
    seconds: float  # how long the build took
    log: str  # the build's log file
    builder_id: str  # the image ID of the builder that made it


class WheelStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def blob(self, sha256: str, filename: str) -> Path:
        return self.root / "sha256" / sha256 / filename

    def _record_path(self, input_hash: str) -> Path:
        return self.root / "derivations" / f"{input_hash}.json"

    def lookup(self, input_hash: str) -> WheelRecord | None:
        """The record of a derivation whose wheel is in the store, or None."""
        try:
            raw = self._record_path(input_hash).read_text(encoding="utf-8")
        except (FileNotFoundError, UnicodeDecodeError):
            return None
        record = _parse(raw, input_hash)
        if record is None or not self.blob(record.sha256, record.filename).is_file():
            return None
        return record

    @contextlib.contextmanager
    def incoming(self) -> Iterator[Path]:
        """A private directory on the store's filesystem for one build's output, removed
        afterwards whatever happened."""
        base = self.root / "incoming"
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="build-", dir=base))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def put(self, wheel: Path, record: WheelRecord) -> WheelRecord:
        """Move a complete, hashed wheel into the store, then record its derivation."""
        final = self.blob(record.sha256, record.filename)
        final.parent.mkdir(parents=True, exist_ok=True)
        if not final.is_file():
            os.chmod(wheel, 0o644)
            os.replace(wheel, final)
            fsync_dir(final.parent)
        atomic_write_text(self._record_path(record.input_hash),
                          json.dumps({"schema": RECORD_SCHEMA, **asdict(record)}, indent=2)
                          + "\n")
        return record


def _parse(raw: str, input_hash: str) -> WheelRecord | None:
    """A record, checked field by field (None: not a usable record)."""
    try:
        data = loads_json(raw)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("schema") != RECORD_SCHEMA:
        return None
    try:
        record = WheelRecord(**{k: data[k] for k in WheelRecord.__dataclass_fields__})
    except (KeyError, TypeError):
        return None
    strings = (record.name, record.version, record.filename, record.sha256,
               record.input_hash, record.built, record.log, record.builder_id)
    if not all(isinstance(x, str) for x in strings) or not isinstance(record.seconds,
                                                                       int | float):
        return None
    if (record.input_hash != input_hash or not SHA256.match(record.sha256)
            or not _HASH.match(record.input_hash) or not WHEEL_FILE.match(record.filename)
            or not _IMAGE_ID.match(record.builder_id)):
        return None
    try:
        parsed = parse_wheel(record.filename)
    except Exception:
        return None
    if (parsed.name, parsed.version) != (record.name, record.version):
        return None
    return record


def wheel_path(spec: Spec, wheel: LockedWheel) -> Path:
    """Where a locked local wheel's file is: the wheel store for a built or fetched one,
    else the spec's wheels directory."""
    if wheel.in_store and wheel.sha256 is not None:
        return WheelStore(spec.wheel_store).blob(wheel.sha256, wheel.filename)
    return spec.wheels_dir / wheel.filename


@contextlib.contextmanager
def wheel_view(spec: Spec, wheels: Iterable[LockedWheel]) -> Iterator[Path]:
    """One directory that holds the wheels directory's files and the built and fetched
    wheels among ``wheels`` (as symbolic links, nothing copied): what the resolver's
    ``--find-links`` and the metadata reads see. A file in the wheels directory of a
    project that is built from source or fetched by URL is left out (an older download of
    it must not compete with the build: ``vllm==0.22.1rc1`` also matches
    ``0.22.1rc1+cu132``). With no built or fetched wheels, the wheels directory itself."""
    built = [w for w in wheels if w.in_store]
    if not built:
        yield spec.wheels_dir
        return
    names = {w.name for w in built}
    with tempfile.TemporaryDirectory(prefix="imagebuild-wheels-") as tmp:
        view = Path(tmp)
        for w in built:
            target = wheel_path(spec, w)
            if target.is_file():
                (view / w.filename).symlink_to(target.absolute())
        if spec.wheels_dir.is_dir():
            for f in sorted(spec.wheels_dir.iterdir()):
                if WHEEL_FILE.match(f.name) and f.is_file() and _project(f.name) not in names:
                    (view / f.name).symlink_to(f.absolute())
        yield view


def _project(filename: str) -> str | None:
    try:
        return parse_wheel(filename).name
    except LockError:
        return None


# derivations, each with the record of its wheel in the store (None: not built there)
Stored = Sequence[tuple[WheelDerivation, "WheelRecord | None"]]


def stored(spec: Spec, derivations: Iterable[WheelDerivation]) -> Stored:
    """Each derivation with the record of its wheel in the store (None: not built)."""
    store = WheelStore(spec.wheel_store)
    return [(d, store.lookup(d.input_hash)) for d in derivations]


def is_locked(lock: Lock | None, d: WheelDerivation, record: WheelRecord | None) -> bool:
    """wheels.lock records this derivation, with the stored wheel's bytes (a wheel built
    again here may have others, if its build is not reproducible)."""
    entry = next((w for w in lock.wheels if w.name == d.name), None) if lock else None
    return entry is not None and entry.derivation == d.input_hash and (
        record is None or entry.sha256 == record.sha256)


# -- what the store holds, and pruning it ----------------------------------------------------

WheelUse = Literal["locked", "built, not locked", "unreferenced"]
LEFTOVER_AGE = 24 * 3600  # an incoming build directory this old belongs to no live build


@dataclass(frozen=True)
class StoredWheel:
    filename: str
    sha256: str
    size: int
    use: WheelUse  # locked: wheels.lock names it; built, not locked: the spec's current
    # derivation of it (a build-wheels run not locked yet); else nothing refers to it


@dataclass(frozen=True)
class WheelStoreState:
    root: str
    wheels: tuple[StoredWheel, ...]
    leftovers: tuple[str, ...]  # incoming directories of builds that never finished

    @property
    def size(self) -> int:
        return sum(w.size for w in self.wheels)

    @property
    def unreferenced(self) -> tuple[StoredWheel, ...]:
        return tuple(w for w in self.wheels if w.use == "unreferenced")

    def count(self, use: WheelUse) -> int:
        return sum(1 for w in self.wheels if w.use == use)


def _records(store: WheelStore) -> dict[str, list[Path]]:
    """Each stored wheel's sha256 -> the derivation records that name it."""
    out: dict[str, list[Path]] = {}
    directory = store.root / "derivations"
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else ():
        try:
            record = _parse(path.read_text(encoding="utf-8"), path.stem)
        except (OSError, UnicodeDecodeError):
            record = None
        if record is not None:
            out.setdefault(record.sha256, []).append(path)
    return out


def store_state(spec: Spec, lock: Lock) -> WheelStoreState:
    """What the wheel store holds and what refers to each wheel: wheels.lock, or the
    spec's current derivation of a wheel (built, not locked yet). Reads only."""
    store = WheelStore(spec.wheel_store)
    locked = {w.sha256 for w in lock.wheels if w.sha256 is not None}
    current = {r.sha256 for _d, r in stored(spec, wheel_plan(spec)) if r is not None}
    wheels: list[StoredWheel] = []
    blobs = store.root / "sha256"
    for d in sorted(blobs.iterdir()) if blobs.is_dir() else ():
        if not _HASH.match(d.name) or not d.is_dir():
            continue
        for f in sorted(d.iterdir()):
            if not WHEEL_FILE.match(f.name) or not f.is_file() or f.is_symlink():
                continue
            use: WheelUse = ("locked" if d.name in locked else
                             "built, not locked" if d.name in current else "unreferenced")
            wheels.append(StoredWheel(f.name, d.name, f.stat().st_size, use))
    incoming = store.root / "incoming"
    now = time.time()
    leftovers = tuple(str(p) for p in sorted(incoming.iterdir())
                      if p.is_dir() and now - p.stat().st_mtime > LEFTOVER_AGE
                      ) if incoming.is_dir() else ()
    return WheelStoreState(str(store.root), tuple(wheels), leftovers)


def prune_store(spec: Spec, lock: Lock, *, dry_run: bool) -> WheelStoreState:
    """Remove the wheels nothing refers to (their derivation records first, so a crash
    leaves at most a wheel without a record, removed next time) and the leftovers of
    builds that never finished. Returns what was (or, ``dry_run``, would be) removed."""
    state = store_state(spec, lock)
    gone = WheelStoreState(state.root, state.unreferenced, state.leftovers)
    if dry_run:
        return gone
    store = WheelStore(spec.wheel_store)
    records = _records(store)
    try:
        for w in gone.wheels:
            for path in records.get(w.sha256, []):
                path.unlink(missing_ok=True)
            blob = store.blob(w.sha256, w.filename)
            blob.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                blob.parent.rmdir()  # empty unless another file shares the sha256
        for p in gone.leftovers:
            shutil.rmtree(p)
    except OSError as exc:
        raise LockError(f"cannot prune the wheel store {store.root}: {exc.strerror or exc}",
                        hint="check the permissions of the spec's state directory, then "
                             "run 'imagebuild prune' again") from None
    return gone
