"""The render and lock workflows: Dockerfiles from the templates, and every lock
(wheels.lock and each image's closure lock) from the spec, the wheels and the indexes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from packaging.utils import canonicalize_name

from . import web
from .closure import (
    ClosureLock,
    Locks,
    changes,
    format_closure,
)
from .errors import (
    LockError,
)
from .fsutil import atomic_write_text
from .lock import compute_lock, format_lock
from .locking import IndexListings, LockFiles, lock_image, read_lock_files
from .progress import Progress, Quiet
from .render import RenderResult, check_rendered, write_rendered
from .spec import Spec
from .wheelbuild import fetch_wheels, fetched_wheels, locked_built_wheels
from .wheelplan import wheel_plan
from .wheelstore import (
    Stored,
    stored,
    wheel_view,
)


def render(spec: Spec, *, check: bool) -> RenderResult:
    """Write dockerfiles/ from the templates, or (``check``) raise RenderDrift if stale."""
    if check:
        check_rendered(spec)
        return RenderResult(written=(), unchanged=())
    return write_rendered(spec)


LockState = Literal["written", "unchanged", "up to date"]  # "up to date": with --check


@dataclass(frozen=True)
class ClosureOutcome:
    image: str
    path: Path
    packages: int
    unresolved: str | None
    state: LockState
    changed: tuple[str, ...]  # "name old -> new" for every package that moved


@dataclass(frozen=True)
class LockOutcome:
    path: Path
    wheels: int
    unresolved: int
    state: LockState
    notes: tuple[str, ...]
    # the locks as written (with --check: as they stand), what a build goes on with
    locks: Locks
    warnings: tuple[str, ...] = ()
    closures: tuple[ClosureOutcome, ...] = ()
    allowed_unresolved: bool = False  # --check --allow-unresolved passed an unresolved lock

    @property
    def unresolved_closures(self) -> int:
        return sum(1 for c in self.closures if c.unresolved is not None)


def lock(spec: Spec, *, check: bool, upgrade: bool | list[str],
         progress: Progress | None = None, allow_unresolved: bool = False) -> LockOutcome:
    """``imagebuild lock``: the lock step (``lock_from``) from the lock files as they
    are now and the derivations of the wheels the spec builds."""
    return lock_from(spec, read_lock_files(spec), stored(spec, wheel_plan(spec)), check=check,
                     upgrade=upgrade, progress=progress, allow_unresolved=allow_unresolved)


def lock_from(spec: Spec, files: LockFiles, built: Stored, *,
              check: bool, upgrade: bool | list[str], progress: Progress | None = None,
              allow_unresolved: bool = False) -> LockOutcome:
    """Hash every declared wheel into wheels.lock and resolve every image's closure into
    locks/pylock.<image>.toml (or, ``check``, refuse a stale lock). ``upgrade``: True
    moves everything to the newest the indexes offer, a list of names moves only those;
    otherwise every existing pin stays. Every file is computed before any is written.
    ``files``: the lock files as the caller read them (what the new locks start from);
    ``built``: the derivation of every wheel the spec builds, with its wheel store record
    as the caller found it."""
    previous = files.previous
    current = _current_text(spec.lock_path)
    warnings: list[str] = []
    if isinstance(files.wheels, LockError) and spec.lock_path.exists():
        warnings.append(f"ignoring the existing lock: {files.wheels.message}")
    decls = [(d.filename, d.index) for d in spec.wheels if d.url is None]
    # a wheel not built yet is refused before anything is downloaded
    built_wheels, built_notes = locked_built_wheels(previous, built)
    fetched = fetched_wheels(spec)
    built_notes += fetch_wheels(spec, fetched, progress or Quiet(), strict=False)
    in_store = [*built_wheels, *fetched]  # their entries come from the store, not hashing
    closures: list[tuple[ClosureLock, str]] = []  # each image's lock and its text
    made: dict[str, ClosureLock] = {}
    moved: dict[str, tuple[str, ...]] = {}
    listed: IndexListings = {}  # index pages read once for every image's source check
    # the wheels directory with the built and fetched wheels: what the resolver sees
    with wheel_view(spec, in_store) as links:
        result = compute_lock(spec.wheels_dir, decls, previous, upgrade=upgrade,
                              fetch=web.get_text, built=in_store)
        try:
            spec_name = str(spec.path.relative_to(spec.lock_path.parent))
        except ValueError:
            spec_name = spec.path.name
        text = format_lock(result.wheels, spec_name)
        unresolved = sum(1 for w in result.wheels if w.sha256 is None)
        wheels = {w.name: w for w in result.wheels}
        for name in spec.closure(None):
            if progress is not None:
                progress.say(f"locking the closure of {name}")
            prev = files.previous_closure(name)
            parent = spec.images[name].parent
            made[name] = lock_image(spec, wheels, name, made[parent] if parent else None,
                                    prev, upgrade, wheel_dir=links, listed=listed)
            # what moved in it (nothing for a first lock)
            moved[name] = (() if prev is None or prev.unresolved is not None else
                           tuple(changes(prev.by_name(), made[name].by_name())))
            closures.append((made[name], format_closure(made[name], spec.path.name)))
    if isinstance(upgrade, list):
        locked = {p.name for c, _t in closures for p in c.packages}
        unknown = [n for n in upgrade if canonicalize_name(n) not in locked]
        if unknown and all(c.unresolved is None for c, _t in closures):
            raise LockError(f"--upgrade {' '.join(unknown)}: no image's closure has "
                            f"{'it' if len(unknown) == 1 else 'them'}; nothing was written",
                            hint="name packages as the locks do (see locks/pylock.*.toml)")
    strays = sorted(set(spec.lock_dir.glob("pylock.*.toml"))
                    - {spec.closure_lock_path(n) for n in spec.images})

    def state_of(path: Path, new_text: str) -> LockState:
        if check:
            return "up to date"
        return "unchanged" if _current_text(path) == new_text else "written"

    def outcome() -> LockOutcome:
        return LockOutcome(
            spec.lock_path, len(result.wheels), unresolved, state_of(spec.lock_path, text),
            (*built_notes, *result.notes), Locks(spec.lock_path, tuple(result.wheels), made),
            tuple(warnings),
            tuple(ClosureOutcome(c.image, c.path, len(c.packages), c.unresolved,
                                 state_of(c.path, t), moved[c.image])
                  for c, t in closures),
            allowed_unresolved=check and allow_unresolved)

    if check:
        stale = [str(spec.lock_path)] if current != text else []
        stale += [str(c.path) for c, t in closures if _current_text(c.path) != t]
        stale += [f"{p} (no such image)" for p in strays]
        if stale:
            raise LockError(f"out of date with the spec, the wheels or the indexes: "
                            f"{', '.join(stale)}",
                            hint="run 'imagebuild lock' and commit wheels.lock and locks/")
        done = outcome()
        if (unresolved or done.unresolved_closures) and not allow_unresolved:
            raise LockError(
                f"the locks are up to date but unresolved: {unresolved} wheel hash(es) and "
                f"{done.unresolved_closures} image closure(s); no image can be built from "
                f"them", hint="run 'imagebuild lock' where the wheels and the indexes are, "
                              "and commit; a CI machine without the wheels can pass "
                              "--allow-unresolved (it says so on every run)")
        return done
    result_outcome = outcome()
    try:
        for c, t in closures:
            if _current_text(c.path) != t:
                c.path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(c.path, t)
        if current != text:
            atomic_write_text(spec.lock_path, text)
        for p in strays:
            p.unlink()
    except OSError as exc:
        raise LockError(f"cannot write the locks: {exc.strerror or exc}",
                        hint="the spec's 'lock:' and 'locks:' must be writable") from None
    return result_outcome


def _current_text(path: Path) -> str | None:
    """The lock file's text, or None when there is none or it is not text (then it is
    simply out of date)."""
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        return None
    except OSError as exc:
        raise LockError(f"cannot read {path}: {exc.strerror or exc}",
                        hint="the spec's 'lock:' must name a file") from None


