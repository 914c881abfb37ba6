"""The workflows of wheels built from source: what a build does about each wheel
(``wheel_steps``), realizing them (``build_wheels``, which can run the lock step after),
and checking that a build is reproducible (``check_wheels``). Beside ``ops.py`` (whose
build realizes the planned wheels through ``realize_planned``), on ``lockflow.py``,
whose lock step it calls."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from packaging.utils import canonicalize_name

from . import lockflow
from .engine import Engine
from .errors import ImagebuildError, LockError, NotReproducible, SpecError, WheelBuildFailed
from .fsutil import atomic_write_text
from .git import git_mirror, git_rev_parse
from .lock import Lock
from .locking import LockFiles, read_lock_files
from .progress import Progress
from .spec import DEFAULT_SPEC, Spec, did_you_mean, with_wheel_commit
from .wheelbuild import (
    WheelOutcome,
    build_wheel,
    fetch_wheels,
    fetched_wheels,
    mirror_path,
    realize_wheels,
)
from .wheelplan import WheelDerivation, needed_by, wheel_plan
from .wheelstore import WheelRecord, WheelStore, is_locked, stored


@dataclass(frozen=True)
class WheelStep:
    """What a build does about one wheel built from source."""

    derivation: WheelDerivation
    record: WheelRecord | None  # the wheel store has it: reused, nothing fetched or run
    locked: bool  # wheels.lock records this derivation's wheel

    @property
    def action(self) -> Literal["reuse", "build"]:
        return "reuse" if self.record is not None else "build"


def wheel_names(spec: Spec, names: list[str]) -> list[str]:
    """The wheels built from source that ``names`` asks for (all when empty), checked."""
    out: list[str] = []
    for n in names:
        cn = str(canonicalize_name(n))
        if cn not in spec.built:
            raise SpecError(f"{n!r} is not a wheel built from source in {spec.path.name}"
                            f"{did_you_mean(cn, set(spec.built))}",
                            hint="the wheels under wheels.build can be built")
        out.append(cn)
    return out or list(spec.built)


def wheel_steps(spec: Spec, names: list[str]) -> list[WheelStep]:
    """What building the wheels ``names`` does: reuse or build each, and whether the lock
    records it. No engine."""
    return _plan(spec, read_lock_files(spec).previous, set(names)).steps


def _plan(spec: Spec, lock: Lock | None, wanted: set[str]) -> WheelPlan:
    """A step for every wheel the spec builds (its wheel store record, whether ``lock``
    records it), and the steps of the wheels ``wanted``."""
    steps = [WheelStep(d, record, is_locked(lock, d, record))
             for d, record in stored(spec, wheel_plan(spec))]
    return WheelPlan([s for s in steps if s.derivation.name in wanted], tuple(steps))


@dataclass(frozen=True)
class WheelPlan:
    """The wheel steps of a build of some images, and what they were planned from (a
    step for every wheel the spec builds, wheels.lock as read), carried on to realizing
    and locking."""

    steps: list[WheelStep]  # the wheels of the images asked for
    all_steps: tuple[WheelStep, ...] = ()  # every wheel the spec builds, in its order

    @property
    def every(self) -> tuple[WheelDerivation, ...]:
        """Every wheel the spec builds from source, in the spec's order."""
        return tuple(s.derivation for s in self.all_steps)

    @property
    def pending(self) -> bool:
        """Some wheel is not in the lock yet: the image plan follows from a new lock."""
        return any(not s.locked for s in self.steps)


def plan_wheels(spec: Spec, images: list[str], lock: Lock | None) -> WheelPlan:
    """``plan`` and ``build``'s first phase: the wheels the closure of ``images`` (all
    when empty) builds from source, each reused or built, against wheels.lock as read
    (``lock``). Unknown image names are refused here, before any engine is contacted."""
    return _plan(spec, lock, set(needed_by(spec, [spec.resolve(n) for n in images])))


def realize_planned(spec: Spec, engine: Engine, plan: WheelPlan, files: LockFiles,
                    progress: Progress | None = None) -> WheelsOutcome:
    """``build``'s first phase: fetch the prebuilt wheels by URL this machine lacks (a
    dead link fails here, before hours of building), realize the planned wheels, and
    re-lock when the lock does not record every wheel the spec builds (its
    ``relocked``: that lock step's outcome; None: no lock written). ``files``: the locks
    the plan was made from."""
    progress = progress or Progress()
    prebuilt = fetched_wheels(spec)
    fetch_wheels(spec, prebuilt, progress, strict=True)
    if not plan.steps:
        return WheelsOutcome([])
    return _realize(spec, engine, plan, files, relock=True, progress=progress)


def _realize(spec: Spec, engine: Engine, plan: WheelPlan, files: LockFiles, *, relock: bool,
             progress: Progress) -> WheelsOutcome:
    """Realize the plan's steps (reuse the stored wheels it found, build the others);
    with ``relock``, run the lock step when wheels.lock does not record every wheel the
    spec builds as realized (the derivations and lock files handed on, not planned or
    read again), else say which wheels the lock lacks."""
    done = realize_wheels(spec, engine, [(s.derivation, s.record) for s in plan.steps],
                          progress)
    realized = {o.derivation.name: WheelStep(o.derivation, o.record,
                                             is_locked(files.previous, o.derivation, o.record))
                for o in done}
    now = [realized.get(s.derivation.name, s) for s in plan.all_steps]
    if relock and any(not s.locked for s in now):
        progress.say("locking the newly built wheels")
        return WheelsOutcome(done, lockflow.lock_from(
            spec, files, [(s.derivation, s.record) for s in now], check=False,
            upgrade=False, progress=progress))
    return WheelsOutcome(done, unlocked=tuple(n for n, s in realized.items() if not s.locked))


@dataclass(frozen=True)
class WheelsOutcome:
    wheels: list[WheelOutcome]
    relocked: lockflow.LockOutcome | None = None  # the lock step that recorded newly built wheels
    unlocked: tuple[str, ...] = ()  # wheels the lock does not record yet (no re-lock asked)


def build_wheels(spec: Spec, engine: Engine, names: list[str], *, relock: bool = False,
                 progress: Progress | None = None) -> WheelsOutcome:
    """Realize the wheels ``names`` (reuse or build each); with ``relock``, run the lock
    step when wheels.lock does not record the derivations now built."""
    files = read_lock_files(spec)
    return _realize(spec, engine, _plan(spec, files.previous, set(names)), files,
                    relock=relock, progress=progress or Progress())


@dataclass(frozen=True)
class CheckOutcome:
    pairs: list[tuple[WheelRecord, WheelRecord]]  # (stored, built again)

    @property
    def differ(self) -> list[str]:
        return [a.name for a, b in self.pairs if a.sha256 != b.sha256]

    def error(self) -> ImagebuildError | None:
        if not self.differ:
            return None
        return NotReproducible(
            f"building {', '.join(self.differ)} again from the same inputs gave other bytes",
            hint="compare the two wheels (e.g. with diffoscope; the rebuild's log ends "
                 "in .check.log); the stored wheel is kept")


def check_wheels(spec: Spec, engine: Engine, names: list[str],
                 progress: Progress | None = None) -> CheckOutcome:
    """Build the wheels ``names`` again from the same inputs, into a scratch store and
    without the compiler cache, and pair each stored record with the rebuild's: equal
    sha256 means the build is reproducible. The stored wheels are not touched; a wheel
    not built yet is refused."""
    progress = progress or Progress()
    store = WheelStore(spec.wheel_store)
    out = []
    for d in wheel_plan(spec, names):
        stored = store.lookup(d.input_hash)
        if stored is None:
            raise LockError(f"{d.name} (derivation {d.hash12}) is not built yet: nothing to "
                            f"check against", hint=f"imagebuild build-wheels {d.name}")
        scratch = spec.state_dir / "tmp" / f"check-{d.hash12}"
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            again = build_wheel(spec, engine, WheelStore(scratch), d, progress,
                                prefix=f"[check] {d.name}",
                                logfile=spec.state_dir / "logs" /
                                f"wheel-{d.name}-{d.hash12}.check.log", use_ccache=False)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        out.append((stored, again))
    return CheckOutcome(out)


# -- a branch or a tag, pinned ---------------------------------------------------------------

_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/+-]{0,199}\Z")
PLACEHOLDER_COMMIT = "0" * 40  # stands in while the spec is read for the wheel's URL


@dataclass(frozen=True)
class RefResolution:
    name: str
    ref: str  # as asked: main, v0.6.12, a short commit
    old: str  # the commit: value the spec had (a placeholder, perhaps)
    new: str  # the full commit it names now

    @property
    def changed(self) -> bool:
        return self.old != self.new


def resolve_request(args: list[str], wheels: list[str], check: bool
                    ) -> list[tuple[str, str]]:
    """The ``NAME=REF`` pairs of ``build-wheels --resolve``, checked: REF can never reach
    git as an option or a revision expression; resolving builds nothing, so it takes no
    WHEEL and no --check."""
    if wheels or check:
        raise SpecError("--resolve pins commits and builds nothing: name no WHEEL and no "
                        "--check with it", hint="resolve first, then run build-wheels")
    out = []
    for arg in args:
        name, eq, ref = arg.partition("=")
        if (not eq or not name or not _REF.match(ref) or ".." in ref
                or ref.endswith((".lock", "/"))):
            raise SpecError(f"--resolve {arg!r}: expected NAME=REF, a branch, a tag or a "
                            f"commit (letters, digits, . _ / + -)",
                            hint="for example: imagebuild build-wheels --resolve vllm=main")
        out.append((str(canonicalize_name(name)), ref))
    return out


def resolve_refs(spec_file: str | None, refs: list[tuple[str, str]],
                 progress: Progress | None = None) -> list[RefResolution]:
    """``build-wheels --resolve NAME=REF``: each REF (a branch, a tag) turned into the
    full commit it names now, through the wheel's git mirror (fetched first: a branch
    moves), and written into the spec's ``commit:`` of that wheel; the spec is written
    once, after every REF resolved, and only if a commit changed. A placeholder commit
    (the real spec's ``<the full 40-digit id ...>``) is fine: that is what this is for."""
    progress = progress or Progress()
    spec_path = Path(spec_file or DEFAULT_SPEC).absolute()
    try:
        text = spec_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{spec_path}: cannot read the spec: {exc}") from None
    out: list[RefResolution] = []
    for name, ref in refs:
        probe = with_wheel_commit(text, spec_path, name, PLACEHOLDER_COMMIT)[2]
        build = probe.built[name]
        mirror = mirror_path(probe, build.git)
        progress.say(f"{name}: fetching {build.git}")
        done = git_mirror(build.git, mirror)
        if done.code != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            raise WheelBuildFailed(f"{name}: fetching {build.git} failed: {tail}",
                                   hint="check the URL and the network; git never prompts "
                                        "here, so a private repository needs an ssh key")
        commit = git_rev_parse(mirror, ref)
        if commit is None:
            raise SpecError(f"{name}: {build.git} has no branch, tag or commit {ref!r}",
                            hint=f"git ls-remote {build.git} lists its branches and tags")
        text, old, _spec = with_wheel_commit(text, spec_path, name, commit)
        out.append(RefResolution(name, ref, old, commit))
    if any(r.changed for r in out):
        try:
            atomic_write_text(spec_path, text)
        except OSError as exc:
            raise SpecError(f"cannot write {spec_path}: {exc.strerror or exc}") from None
    return out
