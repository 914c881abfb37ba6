"""The workflows: one function per operation a user runs, typed inputs, typed results.

``cli.py`` parses arguments, calls one of these, and formats what it returns. Every
decision lives here or below: which images an operation concerns, the gate (through
``promote``, the one path that moves ``latest``), the backup policy, which workers. An
operation validates its arguments before it touches an engine (the ``*_request``
functions need no engine), and reports progress through a ``Progress``.

Failures that end a command are raised as typed errors (errors.py). Where a command has
something to show before it fails (a build summary, a verify table, a worker table), its
result carries the failure and ``result.error()`` returns the error to raise afterwards.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .backup import (
    BackupResult,
    ExportResult,
    RestoreResult,
    backups_of,
    export_backup,
    local_tar,
    restore_backup,
    write_backups,
)
from .build import BuildReport, Step, decide, execute
from .closure import (
    ClosureLock,
    Locks,
    changes,
    install_set,
    parse_closure,
)
from .context import (
    Context,
    backup_store,
    mirror_error,
    mirror_stores,
    plan_images,
    update_mirrors,
)
from .derivation import Derivation, plan
from .engine import Engine
from .errors import (
    BackupError,
    ImagebuildError,
    ImageNotFound,
    LockError,
    RemoteError,
    SpecError,
    VerifyFailed,
    reason,
)
from .git import git_show_head
from .image import ImageInfo
from .lockflow import LockOutcome
from .locking import LockFiles, checked, read_lock_files
from .mirror import MirrorResult
from .naming import hash_tag, latest_tag, short_id
from .progress import Progress
from .promote import Promotion, promote
from .spec import Spec, load_spec
from .store import BackupDir, LocalDir
from .storelock import StoreLock
from .tarbackup import read_sidecar
from .verify import VerifyRecord, image_checks, require_verified, verify_image
from .wheelops import WheelPlan, plan_wheels, realize_planned


@dataclass(frozen=True)
class BuildPlan:
    """What ``plan`` and ``build`` start from, computed once and carried through: the
    spec, the images asked for, its lock files as read, its wheel steps (every built
    wheel's derivation, planned from that wheels.lock), and the locks checked against
    the spec (None while a wheel is pending: the image plan follows a new lock). No
    engine."""

    spec: Spec
    images: list[str]
    files: LockFiles
    wheels: WheelPlan
    locks: Locks | None


def plan_build(spec_path: str | None, images: list[str]) -> BuildPlan:
    """Read the spec and its locks, plan the wheels of ``images`` (all: empty), and,
    unless a wheel is pending, check the locks against the spec. Unknown image names and
    stale locks are refused here, before an engine is asked anything."""
    spec = load_spec(spec_path)
    files = read_lock_files(spec)
    wheels = plan_wheels(spec, images, files.previous)
    locks = None if wheels.pending else checked(spec, files, wheels.every)
    return BuildPlan(spec, images, files, wheels, locks)


@dataclass(frozen=True)
class PlanOutcome:
    spec: Spec
    wheels: WheelPlan
    derivations: list[Derivation] | None  # None: wheels pending (the plan follows a lock)
    lock_changes: dict[str, list[str]]  # image -> why a lock change rebuilds it


def plan_all(bp: BuildPlan) -> PlanOutcome:
    """``imagebuild plan``: the wheel steps, then (once every wheel is locked) the image
    derivations and what a lock change since the last commit rebuilds. No engine."""
    if bp.locks is None:
        return PlanOutcome(bp.spec, bp.wheels, None, {})
    ctx = Context(bp.spec, bp.locks)
    derivations = plan_images(ctx, bp.images)
    return PlanOutcome(bp.spec, bp.wheels, derivations, lock_changes(ctx, derivations))


def lock_changes(ctx: Context, derivations: list[Derivation]) -> dict[str, list[str]]:
    """What changed in each image's install set since its closure lock was last
    committed (git HEAD): the images a lock change rebuilds, and why. Images whose lock
    is not committed (or is unresolved either side) are left out; a child of a changed
    image rebuilds because its parent does."""
    committed: dict[str, ClosureLock | None] = {}
    for d in derivations:
        path = ctx.spec.closure_lock_path(d.name)
        text = git_show_head(path)
        try:
            committed[d.name] = (parse_closure(text.encode(), path, d.name)
                                 if text is not None else None)
        except LockError:
            committed[d.name] = None
    out: dict[str, list[str]] = {}
    for d in derivations:
        now, then = ctx.closures[d.name], committed[d.name]
        if then is None or then.unresolved is not None or now.unresolved is not None:
            continue
        img = ctx.spec.images[d.name]
        parent_now = ctx.closures[img.parent] if img.parent else None
        parent_then = committed.get(img.parent) if img.parent else None
        if img.parent is not None and (parent_then is None or parent_then.unresolved):
            continue
        moved = changes({p.name: p for p in install_set(then, parent_then)},
                        {p.name: p for p in install_set(now, parent_now)})
        if not moved and img.parent in out:
            moved = [f"its parent {img.parent} changes"]
        if moved:
            out[d.name] = moved
    return out


# -- build -----------------------------------------------------------------------------------


@dataclass
class BuildOutcome:
    steps: list[Step]
    report: BuildReport | None = None  # None: a dry run
    promotions: dict[str, Promotion] = field(default_factory=dict)
    backups: dict[str, BackupResult] = field(default_factory=dict)
    wheels: WheelPlan | None = None  # the wheel steps it started from
    relocked: LockOutcome | None = None  # the lock step that recorded newly built wheels
    mirrors: list[MirrorResult] = field(default_factory=list)

    @property
    def gate_failed(self) -> str | None:
        return next((n for n, p in self.promotions.items() if not p.passed), None)

    @property
    def latest_moved(self) -> list[str]:
        return [n for n, p in self.promotions.items() if p.moved]

    def error(self) -> ImagebuildError | None:
        name = self.gate_failed
        if name is None or self.report is None:
            return mirror_error(self.mirrors)
        h = hash_tag(name, self.report.images[name])
        rest = ("; images after it were not built"
                if len(self.report.images) < len(self.steps) else "")
        return VerifyFailed(
            f"{name} failed its checks: do NOT distribute it. Its tag {h} is kept for "
            f"inspection; {latest_tag(name)} was not moved{rest}",
            hint="fix the template or the wheels, then build again",
        )


def build(bp: BuildPlan, connect: Callable[[], Engine], *, rebuild: bool = False,
          backup: bool = True, dry_run: bool = False,
          progress: Progress | None = None) -> BuildOutcome:
    """``imagebuild build``, from its plan: realize the planned wheels and re-lock when
    the lock lacks them, then build the images (``build_images``). ``connect`` gives the
    engine, contacted only when there is something to ask it (a dry run whose wheels
    are pending never is)."""
    progress = progress or Progress()
    if dry_run and bp.wheels.pending:
        return BuildOutcome([], wheels=bp.wheels)
    # with no wheel to build, nothing re-locks: the plan has checked the locks against
    # the spec (out of date: refused, exit 2, before the engine was asked anything)
    engine = connect()
    relocked = None
    if not dry_run:
        relocked = realize_planned(bp.spec, engine, bp.wheels, bp.files, progress).relocked
    # the locks the lock step wrote, as it wrote them, or the plan's
    locks = relocked.locks if relocked is not None else bp.locks
    assert locks is not None  # a wheel the lock lacks is built, then always locked
    ctx = Context(bp.spec, locks)
    outcome = build_images(ctx, engine, bp.images, rebuild=rebuild, backup=backup,
                           dry_run=dry_run, progress=progress)
    outcome.wheels, outcome.relocked = bp.wheels, relocked
    return outcome


def build_images(ctx: Context, engine: Engine, images: list[str], *, rebuild: bool = False,
                 backup: bool = True, dry_run: bool = False,
                 progress: Progress | None = None) -> BuildOutcome:
    """Build what is missing of the closure of ``images``, parents first; promote each
    image through the gate (a failure stops the chain) and back up the verified ones."""
    progress = progress or Progress()
    spec = ctx.spec
    derivations = plan(spec, ctx.lock, images)
    forced = ({d.name for d in derivations} if not images else
              {spec.resolve(n) for n in images}) if rebuild else set()
    store = backup_store(spec) if spec.backups is not None else None
    steps = decide(engine, derivations, forced, store)
    outcome = BuildOutcome(steps)
    if dry_run:
        return outcome

    verified: list[tuple[str, ImageInfo]] = []

    def after_each(step: Step, image: ImageInfo) -> bool:
        name = step.derivation.name
        promotion = promote(ctx.gate, engine, name, image, progress)
        outcome.promotions[name] = promotion
        if not promotion.passed:
            progress.say(f"  {name}: gate failed; {latest_tag(name)} stays where it was")
            return False
        verified.append((name, image))
        return True

    def back_up() -> None:  # what passed its gate, in one save
        if store is not None and backup and verified:
            assert spec.backups is not None
            for name, result in zip([n for n, _ in verified], write_backups(
                    store, engine, verified, spec.backups.keep, progress), strict=True):
                outcome.backups[name] = result
                _say_backup(progress, name, result, spec.backups.keep)
            outcome.mirrors = update_mirrors(spec, store, [n for n, _ in verified], progress)

    try:
        outcome.report = execute(spec, engine, steps, progress=progress, rebuild=forced,
                                 store=store, after_each=after_each)
    except ImagebuildError:  # a later step failed: still back up what passed its gate
        with contextlib.suppress(ImagebuildError):
            back_up()
        raise
    back_up()
    return outcome


def _say_backup(progress: Progress, name: str, result: BackupResult, keep: int) -> None:
    if result.written:
        progress.say(f"  {name}: backup written to {result.where} "
                     f"({result.bytes_written / 1e9:.2f} GB new of "
                     f"{result.backup.size / 1e9:.2f} GB, {result.seconds:.1f}s)")
    for h12 in result.dropped:
        progress.say(f"  {name}: dropped older generation {h12} (backups.keep: {keep})")


# -- verify ----------------------------------------------------------------------------------


def current_image(ctx: Context, engine: Engine, name: str,
                  derivation: Derivation | None) -> tuple[str, ImageInfo] | None:
    """The image a command means by ``name``: the spec's current derivation if it is
    built, else ``NAME:latest``; with the reference it was found by."""
    refs = [derivation.tag] if derivation is not None and derivation.input_hash else []
    for ref in [*refs, latest_tag(name)]:
        info = engine.inspect(ref)
        if info is not None:
            return ref, info
    return None


def _present(ctx: Context, engine: Engine, images: list[str], what: str
             ) -> list[tuple[str, str, ImageInfo]]:
    """(name, ref, image) of every image asked for that is present; a named image that is
    missing is an error, an unnamed one is passed over."""
    names = ctx.names(images)
    derivations = {d.name: d for d in plan(ctx.spec, ctx.lock, names)}
    found: list[tuple[str, str, ImageInfo]] = []
    for name in names:
        hit = current_image(ctx, engine, name, derivations.get(name))
        if hit is None:
            if images:
                raise ImageNotFound(f"{name}: no image to {what} (neither its current "
                                    f"derivation nor {latest_tag(name)} is present)",
                                    hint=f"run 'imagebuild build {name}'")
            continue
        found.append((name, *hit))
    if not found:
        raise ImageNotFound("none of the spec's images is present in the engine",
                            hint="run 'imagebuild build' first")
    return found


@dataclass(frozen=True)
class Verified:
    name: str
    ref: str  # what was checked: NAME:<hash12>, or NAME:latest when that is not built
    stale: bool  # checked NAME:latest because the current derivation is not built
    record: VerifyRecord


@dataclass(frozen=True)
class VerifyOutcome:
    checked: list[Verified]

    def error(self) -> ImagebuildError | None:
        failed = [v.name for v in self.checked if not v.record.passed]
        if not failed:
            return None
        return VerifyFailed(f"{', '.join(failed)} failed verification: do NOT distribute",
                            hint="see the expected and got columns above")


def verify(ctx: Context, engine: Engine, images: list[str],
           progress: Progress | None = None) -> VerifyOutcome:
    """Run every check of each image (the torch gate first) and record the results."""
    progress = progress or Progress()
    checked: list[Verified] = []
    for name, ref, info in _present(ctx, engine, images, "verify"):
        stale = ref == latest_tag(name)
        progress.say(f"verifying {ref} ({short_id(info.id)}): "
                     f"{len(image_checks(ctx.spec, name, ctx.lock))} checks"
                     + (" (its current derivation is not built)" if stale else ""))
        checked.append(Verified(name, ref, stale,
                                verify_image(ctx.spec, ctx.lock, engine, name, info)))
    return VerifyOutcome(checked)


# -- backup and restore ----------------------------------------------------------------------


@dataclass(frozen=True)
class BackupOutcome:
    store: str
    results: list[tuple[str, BackupResult]]
    mirrors: list[MirrorResult] = field(default_factory=list)

    def error(self) -> ImagebuildError | None:
        return mirror_error(self.mirrors)


def backup(ctx: Context, engine: Engine, images: list[str],
           progress: Progress | None = None) -> BackupOutcome:
    """A backup of each verified image present (the named ones must be present)."""
    progress = progress or Progress()
    store = backup_store(ctx.spec)
    assert ctx.spec.backups is not None
    present = [(name, info) for name, _ref, info in _present(ctx, engine, images, "back up")]
    for name, info in present:
        require_verified(ctx.spec, ctx.lock, name, info)
    written = write_backups(store, engine, present, ctx.spec.backups.keep, progress)
    results = [(name, r) for (name, _), r in zip(present, written, strict=True)]
    mirrors = update_mirrors(ctx.spec, store, [n for n, _ in present], progress)
    return BackupOutcome(str(store), results, mirrors)


@dataclass(frozen=True)
class RestoreRequest:
    """What to restore: tars of the backup store by image name, or one tar by path."""

    names: list[str]
    named: bool  # the user named them: each must have a backup
    file: Path | None = None


def restore_request(ctx: Context, images: list[str], file: str | None) -> RestoreRequest:
    """Check restore-from-tar's arguments (no engine needed)."""
    if file is None:
        backup_store(ctx.spec)  # refuses a spec without backups
        return RestoreRequest(ctx.names(images), bool(images))
    if len(images) > 1:
        raise SpecError("--file restores one tar; name at most one image",
                        hint="imagebuild restore-from-tar --file PATH [IMAGE]")
    path = Path(file)
    if not path.is_file():
        raise BackupError(f"{path} does not exist")
    return RestoreRequest([ctx.spec.resolve(images[0])] if images else [], bool(images), path)


@dataclass(frozen=True)
class Restored:
    result: RestoreResult
    promotion: Promotion


@dataclass(frozen=True)
class RestoreOutcome:
    restored: list[Restored]

    def error(self) -> ImagebuildError | None:
        failed = [r.result.name for r in self.restored if not r.promotion.passed]
        if not failed:
            return None
        return VerifyFailed(f"{', '.join(failed)} restored but failed verification: "
                            f"latest was not moved; do NOT distribute")


def restore(ctx: Context, engine: Engine, req: RestoreRequest,
            progress: Progress | None = None) -> RestoreOutcome:
    """Load each backup (checked against its sidecar), then promote it through the gate."""
    progress = progress or Progress()
    # per image, where its backup is: (store, key) in order of preference
    jobs: list[tuple[str | None, list[tuple[BackupDir, str]]]] = []
    if req.file is not None:
        directory, tar = local_tar(req.file)
        expect = req.names[0] if req.names else None
        sidecar = read_sidecar(directory, tar)
        if sidecar is not None and expect is None and sidecar.image not in ctx.spec.images:
            raise BackupError(f"{req.file} holds {sidecar.image}, which this spec does not "
                              f"define; nothing was loaded")
        jobs.append((expect, [(directory, tar)]))
    else:
        store = backup_store(ctx.spec)
        stores = [store, *mirror_stores(ctx.spec)]
        for n in req.names:
            sources = _sources(stores, n, progress)
            if sources:
                jobs.append((n, sources))
            elif req.named:
                raise BackupError(f"{store} holds no backup of {n}"
                                  + (" (nor does any mirror)" if len(stores) > 1 else ""),
                                  hint="see 'imagebuild status'; use --file for a tar")
        if not jobs:
            raise BackupError(f"no backups in {store}",
                              hint="run 'imagebuild backup' (or build) first")
    done: list[Restored] = []
    for expect, sources in jobs:
        result = _restore_first(engine, sources, expect, req.file is None, progress)
        if result.name not in ctx.spec.images:
            raise BackupError(f"the tar holds {result.name}, which this spec does not define")
        done.append(Restored(result, promote(ctx.gate, engine, result.name, result.info,
                                             progress)))
    return RestoreOutcome(done)




def _sources(stores: list[BackupDir], name: str, progress: Progress
             ) -> list[tuple[BackupDir, str]]:
    """Where the newest backup of ``name`` is: the store, then each mirror that holds
    one (an unreachable mirror is passed over, and said)."""
    out = []
    for i, st in enumerate(stores):
        try:
            found = backups_of(st, name)
        except (ImagebuildError, OSError) as exc:
            if i == 0:
                raise
            progress.say(f"  mirror {st} passed over: {reason(exc)}")
            continue
        if found:
            out.append((st, found[0].key))
    return out


def _restore_first(engine: Engine, sources: list[tuple[BackupDir, str]],
                   expect: str | None, lock: bool, progress: Progress) -> RestoreResult:
    """The first of ``sources`` that restores; a damaged or missing backup falls back to
    the next (a mirror), the first error raised when none does. A restore from a store
    holds its shared lock: no prune removes what it reads."""
    first: ImagebuildError | None = None
    for st, key in sources:
        try:
            with (StoreLock(st, "shared", f"a restore of {expect or key}") if lock
                  else contextlib.nullcontext()):
                return restore_backup(engine, st, key, progress, expect_image=expect)
        except (BackupError, RemoteError) as exc:
            if first is None:
                first = exc
            if (st, key) != sources[-1]:
                progress.say(f"  {st}/{key}: {exc.message.splitlines()[0]}; trying the "
                             f"next copy")
    assert first is not None
    raise first


@dataclass(frozen=True)
class ExportRequest:
    """What to write out: each image's generation (the current one, or ``generation``)
    and where (a file for one image, else a directory)."""

    names: list[str]
    dest: Path
    generation: str | None = None
    every: bool = False  # --all: the images without a backup are passed over, and named


def export_request(ctx: Context, images: list[str], *, every: bool, output: str | None,
                   generation: str | None) -> ExportRequest:
    """Check export's arguments (no engine, no store contacted)."""
    if not images and not every:
        raise SpecError("name the images to export, or --all",
                        hint="imagebuild export mimo   (or: imagebuild export --all -o DIR)")
    if images and every:
        raise SpecError("--all exports every image: name none with it")
    names = list(ctx.spec.images) if every else ctx.names(images)
    if generation is not None and (len(names) != 1
                                   or not re.fullmatch(r"[0-9a-f]{12}", generation)):
        raise SpecError(f"--generation {generation}: give one image and a generation's "
                        f"12 hex digits", hint="'imagebuild status' and the store's "
                                               "images/<name>/ list the generations")
    dest = Path(output or ".")
    if len(names) > 1 and not dest.is_dir():
        raise SpecError(f"-o {dest}: several images go into a directory, which this is not",
                        hint="create it first, or export one image to a file")
    store = backup_store(ctx.spec)
    target = dest if dest.is_dir() else dest.parent
    if isinstance(store, LocalDir) and target.resolve() == store.directory.resolve():
        raise SpecError(f"-o {dest}: that is the backup store, which would import the tar "
                        f"(and remove it) at its next backup",
                        hint="export to another directory")
    return ExportRequest(names, dest, generation, every)


@dataclass(frozen=True)
class ExportOutcome:
    store: str
    results: list[ExportResult]
    without_backup: list[str] = field(default_factory=list)  # --all passed these over


def export(ctx: Context, req: ExportRequest, progress: Progress | None = None
           ) -> ExportOutcome:
    """Write each image's generation out as a plain ``docker save`` tar with its sidecar,
    every blob checked as it passes (no engine is needed)."""
    progress = progress or Progress()
    store = backup_store(ctx.spec)
    chosen = []
    passed_over = []
    for name in req.names:
        found = [b for b in backups_of(store, name) if b.gen is not None]
        if req.generation is not None:
            found = [b for b in found if b.gen is not None and b.gen.hash12 == req.generation]
        if not found and req.every:
            passed_over.append(name)
            continue
        if not found:
            which = f"generation {req.generation} of {name}" if req.generation else name
            raise BackupError(f"{store} holds no backup of {which}",
                              hint="see 'imagebuild status'; 'imagebuild backup' writes one")
        chosen.append(found[0])
    if not chosen:
        raise BackupError(f"{store} holds no backup of any image of the spec",
                          hint="'imagebuild backup' (or build) writes them")
    results = []
    with StoreLock(store, "shared", f"an export of {', '.join(req.names)}"):
        for b in chosen:
            dest = req.dest / f"{b.image}.tar" if req.dest.is_dir() else req.dest
            progress.say(f"  exporting {store}/{b.key} to {dest}")
            results.append(export_backup(store, b, dest, progress))
    return ExportOutcome(str(store), results, passed_over)
