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
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from packaging.utils import canonicalize_name

from .archive import ArchiveIndex
from .backup import (
    BackupResult,
    RestoreResult,
    backups_of,
    find_backup,
    generation_archive,
    local_tar,
    read_sidecar,
    restore_backup,
    write_backup,
    write_backups,
)
from .build import BuildReport, Step, decide, execute
from .closure import (
    ClosureLock,
    Locks,
    changes,
    format_closure,
    install_set,
    parse_closure,
    read_closure,
)
from .derivation import Derivation, plan
from .distribute import Item, Outcome, Worker
from .distribute import distribute as fan_out
from .engine import Engine, ImageInfo
from .engine_ssh import SshEngine
from .errors import (
    BackupError,
    ImagebuildError,
    ImageNotFound,
    LockError,
    RemoteError,
    SpecError,
    VerifyFailed,
)
from .fsutil import atomic_write_text
from .lock import check_matches, compute_lock, format_lock, read_lock
from .locking import lock_image, read_previous, stale_reason
from .naming import hash_tag, latest_tag, short_id
from .progress import Progress
from .promote import Gate, Promotion, promote
from .publish import NOT_STARTED, PublishResult, client_for, ensure_registry, publish
from .remote import Target, git_show_head
from .render import RenderResult, check_rendered, write_rendered
from .spec import Spec, did_you_mean, load_spec
from .store import BackupDir, LocalDir, open_store
from .verify import VerifyRecord, image_checks, passing_record, require_verified, verify_image
from .wheelplan import wheel_plan
from .wheelstore import locked_built_wheels, wheel_view


@dataclass(frozen=True)
class Context:
    """What every workflow but render and lock reads: the spec, its wheels' lock and the
    closure lock of every image."""

    spec: Spec
    lock: Locks

    @property
    def closures(self) -> Mapping[str, ClosureLock]:
        return self.lock.closures

    @property
    def gate(self) -> Gate:
        return Gate(self.spec, self.lock)

    def names(self, images: list[str]) -> list[str]:
        """Full names of the images asked for (short names work), or every image."""
        return [self.spec.resolve(n) for n in images] or list(self.spec.images)


def load(spec_path: str | None) -> Context:
    """The spec and its lock, the lock checked against the spec: a command never builds,
    serves or checks against a lock that pins other wheels than the spec declares."""
    spec = load_spec(spec_path)
    lock = read_lock(spec.lock_path)
    check_matches(lock, [(d.filename, d.index) for d in spec.wheels], spec.path,
                  built={d.name: d.input_hash for d in wheel_plan(spec)})
    wheels = {w.name: w for w in lock.wheels}
    closures: dict[str, ClosureLock] = {}
    for name in spec.images:
        closure = read_closure(spec.closure_lock_path(name), name)
        why = stale_reason(spec, wheels, closure)
        if why is not None:
            raise LockError(f"{closure.path} is out of date: {why}",
                            hint="run 'imagebuild lock' and commit locks/")
        closures[name] = closure
    return Context(spec, Locks(lock.path, lock.wheels, closures))


def backup_store(spec: Spec) -> BackupDir:
    if spec.backups is None:
        raise SpecError(f"{spec.path}: the spec has no backups section",
                        hint="add backups: {directory: ~/control-workspace/docker-images}")
    return open_store(spec.backups, spec.cluster.ssh_config)


# -- render and lock -------------------------------------------------------------------------


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
    warnings: tuple[str, ...] = ()
    closures: tuple[ClosureOutcome, ...] = ()


def lock(spec: Spec, *, check: bool, upgrade: bool | list[str],
         progress: Progress | None = None) -> LockOutcome:
    """Hash every declared wheel into wheels.lock and resolve every image's closure into
    locks/pylock.<image>.toml (or, ``check``, refuse a stale lock). ``upgrade``: True
    moves everything to the newest the indexes offer, a list of names moves only those;
    otherwise every existing pin stays. Every file is computed before any is written."""
    previous = None
    warnings: list[str] = []
    if spec.lock_path.exists():
        try:
            previous = read_lock(spec.lock_path)
        except LockError as exc:
            warnings.append(f"ignoring the existing lock: {exc.message}")
    decls = [(d.filename, d.index) for d in spec.wheels]
    built, built_notes = locked_built_wheels(spec, previous)
    result = compute_lock(spec.wheels_dir, decls, previous, upgrade=upgrade, built=built)
    try:
        spec_name = str(spec.path.relative_to(spec.lock_path.parent))
    except ValueError:
        spec_name = spec.path.name
    text = format_lock(result.wheels, spec_name)
    current = _current_text(spec.lock_path)
    unresolved = sum(1 for w in result.wheels if w.sha256 is None)

    wheels = {w.name: w for w in result.wheels}
    closures: list[tuple[ClosureLock, ClosureLock | None, str]] = []
    made: dict[str, ClosureLock] = {}
    with wheel_view(spec, result.wheels) as links:
        for name in spec.closure(None):
            if progress is not None:
                progress.say(f"locking the closure of {name}")
            path = spec.closure_lock_path(name)
            prev = read_previous(path, name)
            parent = spec.images[name].parent
            made[name] = lock_image(spec, wheels, name, made[parent] if parent else None,
                                    prev, upgrade, wheel_dir=links)
            closures.append((made[name], prev, format_closure(made[name], spec.path.name)))
    if isinstance(upgrade, list):
        locked = {p.name for c, _p, _t in closures for p in c.packages}
        unknown = [n for n in upgrade if canonicalize_name(n) not in locked]
        if unknown and all(c.unresolved is None for c, _p, _t in closures):
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
            (*built_notes, *result.notes), tuple(warnings),
            tuple(ClosureOutcome(c.image, c.path, len(c.packages), c.unresolved,
                                 state_of(c.path, t), _moved(prev, c))
                  for c, prev, t in closures))

    if check:
        stale = [str(spec.lock_path)] if current != text else []
        stale += [str(c.path) for c, _p, t in closures if _current_text(c.path) != t]
        stale += [f"{p} (no such image)" for p in strays]
        if stale:
            raise LockError(f"out of date with the spec, the wheels or the indexes: "
                            f"{', '.join(stale)}",
                            hint="run 'imagebuild lock' and commit wheels.lock and locks/")
        return outcome()
    result_outcome = outcome()
    try:
        for c, _prev, t in closures:
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


def _moved(prev: ClosureLock | None, new: ClosureLock) -> tuple[str, ...]:
    """What moved in one image's closure lock (nothing for a first lock)."""
    if prev is None or prev.unresolved is not None:
        return ()
    return tuple(changes(prev.by_name(), new.by_name()))


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


def plan_images(ctx: Context, images: list[str]) -> list[Derivation]:
    """The closure of ``images`` in build order, with input hashes. No engine."""
    return plan(ctx.spec, ctx.lock, images)


@dataclass(frozen=True)
class PlanOutcome:
    derivations: list[Derivation]
    lock_changes: dict[str, list[str]]  # image -> why a lock change rebuilds it


def plan_with_changes(ctx: Context, images: list[str]) -> PlanOutcome:
    """``imagebuild plan``: the derivations, and what a lock change since the last commit
    rebuilds. No engine."""
    derivations = plan_images(ctx, images)
    return PlanOutcome(derivations, lock_changes(ctx, derivations))


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

    @property
    def gate_failed(self) -> str | None:
        return next((n for n, p in self.promotions.items() if not p.passed), None)

    @property
    def latest_moved(self) -> list[str]:
        return [n for n, p in self.promotions.items() if p.moved]

    def error(self) -> ImagebuildError | None:
        name = self.gate_failed
        if name is None or self.report is None:
            return None
        h = hash_tag(name, self.report.images[name])
        rest = ("; images after it were not built"
                if len(self.report.images) < len(self.steps) else "")
        return VerifyFailed(
            f"{name} failed its checks: do NOT distribute it. Its tag {h} is kept for "
            f"inspection; {latest_tag(name)} was not moved{rest}",
            hint="fix the template or the wheels, then build again",
        )


def build(ctx: Context, engine: Engine, images: list[str], *, rebuild: bool = False,
          backup: bool = True, dry_run: bool = False,
          progress: Progress | None = None) -> BuildOutcome:
    """Build what is missing of the closure of ``images``, parents first; promote each
    image through the gate (a failure stops the chain) and back up the verified ones."""
    progress = progress or Progress()
    spec = ctx.spec
    derivations = plan(spec, ctx.lock, images)
    forced = ({d.name for d in derivations} if not images else set(ctx.names(images))
              ) if rebuild else set()
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
    return BackupOutcome(str(store), results)


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
    jobs: list[tuple[BackupDir, str, str | None]] = []
    if req.file is not None:
        directory, tar = local_tar(req.file)
        expect = req.names[0] if req.names else None
        sidecar = read_sidecar(directory, tar)
        if sidecar is not None and expect is None and sidecar.image not in ctx.spec.images:
            raise BackupError(f"{req.file} holds {sidecar.image}, which this spec does not "
                              f"define; nothing was loaded")
        jobs.append((directory, tar, expect))
    else:
        store = backup_store(ctx.spec)
        for n in req.names:
            found = backups_of(store, n)
            if found:
                jobs.append((store, found[0].key, n))
            elif req.named:
                raise BackupError(f"{store} holds no backup of {n}",
                                  hint="see 'imagebuild status'; use --file for a tar")
        if not jobs:
            raise BackupError(f"no backups in {store}",
                              hint="run 'imagebuild backup' (or build) first")
    done: list[Restored] = []
    for store_of_job, tar, expect in jobs:
        result = restore_backup(engine, store_of_job, tar, progress, expect_image=expect)
        if result.name not in ctx.spec.images:
            raise BackupError(f"the tar holds {result.name}, which this spec does not define")
        done.append(Restored(result, promote(ctx.gate, engine, result.name, result.info,
                                             progress)))
    return RestoreOutcome(done)


# -- distribute ------------------------------------------------------------------------------


def select_workers(spec: Spec, arg: str | None) -> list[Worker]:
    """``--workers N`` (the first N), ``--workers w1,w3`` (by name), or all of them."""
    workers = list(spec.cluster.workers)
    if not workers:
        raise SpecError(f"{spec.path}: the cluster section lists no workers")
    if arg is None:
        chosen = workers
    elif arg.isdigit():
        n = int(arg)
        if not 1 <= n <= len(workers):
            raise SpecError(f"--workers {n}: the cluster has {len(workers)} worker(s) "
                            f"({', '.join(w.name for w in workers)})",
                            hint=f"use --workers {len(workers)} or name them: --workers w1,w2")
        chosen = workers[:n]
    else:
        by_name = {w.name: w for w in workers}
        chosen = []
        for name in [x.strip() for x in arg.split(",") if x.strip()]:
            if name not in by_name:
                raise SpecError(f"--workers: unknown worker {name!r}"
                                f"{did_you_mean(name, list(by_name))}",
                                hint=f"workers: {', '.join(by_name)}")
            chosen.append(by_name[name])
        if not chosen:
            raise SpecError("--workers: no worker named", hint="--workers 3 or --workers w1,w3")
    c = spec.cluster
    return [Worker(w.name, w.address, SshEngine(Target(
        name=w.name, host=w.address, user=c.ssh_user, port=c.ssh_port,
        identity=c.ssh_identity, config=c.ssh_config))) for w in chosen]


Via = Literal["ssh", "registry"]


def workers_for(spec: Spec, arg: str | None) -> list[Worker]:
    """``select_workers``, except that a spec without workers gives none when none were
    asked for (status and prune then look at the head only)."""
    if arg is None and not spec.cluster.workers:
        return []
    return select_workers(spec, arg)


@dataclass(frozen=True)
class DistributeRequest:
    names: list[str]  # in build order
    named: bool  # the user named them (each must have a latest)
    workers: list[Worker]
    force: bool = False
    dry_run: bool = False
    via: Via = "ssh"
    why: str = ""  # how the path was chosen, for the output


def distribute_request(ctx: Context, images: list[str], workers: str | None, *,
                       force: bool = False, dry_run: bool = False,
                       via: str = "auto") -> DistributeRequest:
    """Check distribute's arguments (no engine needed)."""
    chosen = select_workers(ctx.spec, workers)
    path, why = choose_path(ctx.spec, via, len(chosen))
    return replace(request_for(ctx, images, chosen, force=force, dry_run=dry_run),
                   via=path, why=why)


def choose_path(spec: Spec, via: str, workers: int) -> tuple[Via, str]:
    """ssh or the registry: as asked, or (``auto``) the registry from the spec's
    ``registry.min_workers`` workers on. Pure."""
    reg = spec.registry
    if via == "ssh":
        return "ssh", "--via ssh"
    if via == "registry":
        if reg is None:
            raise SpecError(f"{spec.path}: --via registry, but the spec has no registry "
                            f"section",
                            hint="add registry: {address: HOST:PORT} (see the README, "
                                 "'Distributing through a registry')")
        return "registry", "--via registry"
    if via != "auto":
        raise SpecError(f"--via {via}: expected ssh, registry or auto")
    if reg is None:
        return "ssh", "no registry in the spec"
    if workers >= reg.min_workers:
        return "registry", f"{workers} workers >= registry.min_workers {reg.min_workers}"
    return "ssh", f"{workers} workers < registry.min_workers {reg.min_workers}"


def request_for(ctx: Context, images: list[str], workers: list[Worker], *,
                force: bool = False, dry_run: bool = False) -> DistributeRequest:
    """A distribution of ``images`` (all: empty) to chosen workers."""
    wanted = ctx.names(images)
    store = backup_store(ctx.spec)
    if not isinstance(store, LocalDir):
        raise SpecError(f"{ctx.spec.path}: distribute reads each image's layers from the "
                        f"backup store on this host, but backups.directory is remote",
                        hint="use a local backups.directory on the head node (it can be "
                             "copied to the control node separately)")
    order = [n for n in ctx.spec.closure(wanted) if n in wanted]
    return DistributeRequest(order, bool(images), workers, force, dry_run)


@dataclass(frozen=True)
class DistributeOutcome:
    items: list[Item]
    outcomes: list[Outcome]
    dry_run: bool
    via: Via = "ssh"
    why: str = ""
    upload: PublishResult | None = None  # via the registry: what was put there

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)

    def error(self) -> ImagebuildError | None:
        failed = sorted({o.worker for o in self.outcomes if not o.ok})
        if not failed:
            return None
        reasons = "; ".join(sorted({o.error for o in self.outcomes
                                    if o.error and o.action == "failed"}))
        return RemoteError(f"distribution failed on {', '.join(failed)}: {reasons}",
                           hint="the other workers finished; fix the cause and run the same "
                                "command again: it sends only what is still missing")


def distribute(ctx: Context, engine: Engine, req: DistributeRequest,
               progress: Progress | None = None) -> DistributeOutcome:
    """Send each verified image's ``latest`` to the workers, only the layers each lacks."""
    progress = progress or Progress()
    spec = ctx.spec
    latest = {n: engine.inspect(latest_tag(n)) for n in req.names}
    names = req.names if req.named else [n for n in req.names if latest[n] is not None]
    if not names:
        raise ImageNotFound("no image of the spec has a latest tag to distribute",
                            hint="run 'imagebuild build' first")
    store = backup_store(spec)
    assert spec.backups is not None
    items: list[Item] = []
    with contextlib.ExitStack() as opened:
        for name in names:
            info = latest[name]
            if info is None:
                raise ImageNotFound(f"{latest_tag(name)} is not present on this head node",
                                    hint=f"run 'imagebuild build {name}'")
            record = (passing_record(spec, ctx.lock, name, info) if req.force
                      else require_verified(spec, ctx.lock, name, info))
            tag = hash_tag(name, info)
            if tag is None:
                raise ImageNotFound(f"{latest_tag(name)} ({short_id(info.id)}) was not built "
                                    f"by imagebuild (it has no input-hash label)",
                                    hint=f"run 'imagebuild build {name}'")
            archive = _backup_archive(store, engine, name, info, spec.backups.keep, progress)
            opened.callback(archive.close)
            archive.check(info.fingerprint, {tag})
            items.append(Item(name=name, info=info, hash_tag=tag, record=record,
                              archive=archive))
        upload = None
        if req.via == "registry":
            items, upload = _put_into_registry(ctx, items, progress, req.dry_run)
        verb = "would send" if req.dry_run else "sending"
        progress.say(f"{verb} {', '.join(i.name for i in items)} to "
                     f"{', '.join(w.name for w in req.workers)} via {req.via} ({req.why})")
        outcomes = fan_out(req.workers, items, ctx.gate, progress, dry_run=req.dry_run)
    return DistributeOutcome(items, outcomes, req.dry_run, req.via, req.why, upload)


def _put_into_registry(ctx: Context, items: list[Item], progress: Progress, dry_run: bool
                       ) -> tuple[list[Item], PublishResult]:
    """The items' layers, configs and manifests into the spec's registry (started first
    when the spec says so); the items come back with the reference the workers pull."""
    reg = ctx.spec.registry
    assert reg is not None
    client = client_for(reg)
    try:
        started = ensure_registry(reg, client, progress, dry_run)
        parents = {i.name: ctx.spec.images[i.name].parent for i in items}
        items, result = publish(client, reg, items, progress, parents, dry_run=dry_run,
                                empty=started == NOT_STARTED)
        result.started = started
        return items, result
    finally:
        client.close()


def _backup_archive(store: BackupDir, engine: Engine, name: str, info: ImageInfo, keep: int,
                    progress: Progress) -> ArchiveIndex:
    """The local backup generation of exactly this image (written first if missing),
    its files opened once: what is sent is read through these descriptors, each checked
    against its digest as it streams."""
    found = find_backup(store, name, lambda b: b.image_id == info.id and b.gen is not None)
    if found is None:
        progress.say(f"{name}: no backup of {short_id(info.id)} yet; writing it first")
        found = write_backup(store, engine, name, info, keep, progress).backup
    return generation_archive(store, found)
