"""Command line: one thin function per subcommand.

``main_inner`` raises; ``main`` only maps ``ImagebuildError`` to its exit code (and
Ctrl-C to 130) and prints the message on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .backup import (
    BackupResult,
    RestoreResult,
    backup_image,
    find_backup,
    remote_backup_image,
    remote_restore,
    restore_tar,
    tar_path,
)
from .build import Progress, Step, decide, execute
from .derivation import HASH_LABEL, Derivation, plan
from .distribute import ArchiveIndex, Item, Outcome, distribute
from .engine import Engine, ImageInfo
from .errors import (
    BackupError,
    ImagebuildError,
    ImageNotFound,
    Interrupted,
    LockError,
    RemoteError,
    SpecError,
    VerifyFailed,
)
from .lock import atomic_write_text, compute_lock, format_lock, read_lock
from .remote import RemoteDir, Target
from .render import check_rendered, write_rendered
from .spec import Spec, did_you_mean, load_spec
from .verify import passing_record, require_verified, table, verify_image


def _spec(args: argparse.Namespace) -> Spec:
    return load_spec(args.file)


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# -- render --------------------------------------------------------------------------------


def cmd_render(args: argparse.Namespace) -> int:
    spec = _spec(args)
    if args.check:
        check_rendered(spec)
        print(f"dockerfiles are up to date ({len(spec.images)} images)")
        return 0
    result = write_rendered(spec)
    for p in result.written:
        print(f"wrote {_rel(p)}")
    for p in result.unchanged:
        print(f"unchanged {_rel(p)}")
    return 0


# -- lock ----------------------------------------------------------------------------------


def cmd_lock(args: argparse.Namespace) -> int:
    spec = _spec(args)
    previous = None
    if spec.lock_path.is_file():
        try:
            previous = read_lock(spec.lock_path)
        except LockError as exc:
            print(f"warning: ignoring the existing lock: {exc.message}", file=sys.stderr)
    decls = [(d.filename, d.index) for d in spec.wheels]
    result = compute_lock(spec.wheels_dir, decls, previous, upgrade=args.upgrade)
    try:
        spec_name = str(spec.path.relative_to(spec.lock_path.parent))
    except ValueError:
        spec_name = spec.path.name
    text = format_lock(result.wheels, spec_name)
    for note in result.notes:
        print(f"  {note}", file=sys.stderr)
    current = spec.lock_path.read_text(encoding="utf-8") if spec.lock_path.is_file() else None
    unresolved = sum(1 for w in result.wheels if w.sha256 is None)
    if args.check:
        if current != text:
            raise LockError(f"{spec.lock_path} is out of date with the spec or the wheels",
                            hint="run 'imagebuild lock' and commit wheels.lock")
        print(f"{_rel(spec.lock_path)} is up to date ({len(result.wheels)} wheels, "
              f"{unresolved} unresolved)")
        return 0
    if current == text:
        print(f"{_rel(spec.lock_path)} unchanged ({len(result.wheels)} wheels, "
              f"{unresolved} unresolved)")
    else:
        atomic_write_text(spec.lock_path, text)
        print(f"wrote {_rel(spec.lock_path)} ({len(result.wheels)} wheels, "
              f"{unresolved} unresolved)")
    return 0


# -- plan ----------------------------------------------------------------------------------


def _plan_row(d: Derivation) -> dict[str, object]:
    return {
        "name": d.name,
        "parent": d.parent,
        "base": d.base,
        "input_hash": d.input_hash,
        "tag": d.tag if d.input_hash else None,
        "unresolved": list(d.unresolved),
        "context": [{"path": f.arcname, "sha256": f.sha256} for f in d.context],
    }


def cmd_plan(args: argparse.Namespace) -> int:
    spec = _spec(args)
    lock = read_lock(spec.lock_path)
    derivations = plan(spec, lock, args.images)
    if args.json:
        json.dump({"spec": str(spec.path), "images": [_plan_row(d) for d in derivations]},
                  sys.stdout, indent=2)
        print()
        return 0
    width = max(len(d.name) for d in derivations)
    print(f"plan ({len(derivations)} images, in build order):")
    for i, d in enumerate(derivations, 1):
        h = d.input_hash[:12] if d.input_hash else "unresolved  "
        origin = f"FROM {d.parent}" if d.parent else f"FROM {d.base}"
        print(f"  {i}. {d.name:<{width}}  {h}  {origin}")
    missing = sorted({f for d in derivations for f in d.unresolved})
    if missing:
        print(f"\n{len(missing)} wheel hash(es) are unresolved in {_rel(spec.lock_path)}: "
              f"{', '.join(missing)}")
        print("run 'imagebuild lock' where those wheels are, then plan again")
    return 0


# -- build ---------------------------------------------------------------------------------


def _steps_table(steps: list[Step]) -> list[str]:
    width = max(len(s.derivation.name) for s in steps)
    rows = []
    for i, s in enumerate(steps, 1):
        d = s.derivation
        if s.action == "reuse" and s.image:
            what = f"reuse {s.image.id[7:19]}"
        elif s.action == "restore":
            what = f"restore from {s.substitute}"
        else:
            what = "build"
        rows.append(f"  {i}. {d.name:<{width}}  {d.hash12}  {what}")
    return rows


def cmd_build(args: argparse.Namespace) -> int:
    spec = _spec(args)
    lock = read_lock(spec.lock_path)
    derivations = plan(spec, lock, args.images)
    rebuild = {spec.resolve(n) for n in args.images} if args.rebuild else set()
    if args.rebuild and not args.images:
        rebuild = {d.name for d in derivations}
    engine = Engine()
    steps = decide(engine, derivations, rebuild, _local_backups(spec))
    if args.dry_run:
        print(f"build plan ({len(steps)} images, in order; nothing will be done):")
        print("\n".join(_steps_table(steps)))
        return 0
    progress = Progress()

    def gate(name: str, info: ImageInfo) -> bool:
        record = passing_record(spec, lock, name, info)
        if record is not None:
            progress.say(f"  {name}: verified {record.checked_at} (record reused)")
            return True
        progress.say(f"  {name}: verifying ({len(spec.images[name].checks)} checks)")
        record = verify_image(spec, lock, engine, name, info)
        if not record.passed:
            progress.say(table([record]))
        return record.passed

    def after_gate(name: str, info: ImageInfo) -> None:
        if spec.backups is None or args.no_backup:
            return
        result = _backup(spec, engine, name, info, progress.say)
        if result.written:
            progress.say(f"  {name}: backup written to {result.where} "
                         f"({result.sidecar.size / 1e9:.2f} GB, {result.seconds:.1f}s)")

    report = execute(spec, engine, steps, progress=progress, rebuild=rebuild, gate=gate,
                     after_gate=after_gate)
    print(f"built {len(report.built)}, restored {len(report.restored)}, "
          f"reused {len(report.reused)}"
          + (f"; latest moved: {', '.join(report.latest_moved)}" if report.latest_moved else ""))
    for name, info in report.images.items():
        mark = "FAILED its checks" if name in report.gate_failed else "verified"
        print(f"  {name}:{info.labels.get(HASH_LABEL, '')[:12]} ({info.id[7:19]}) {mark}")
    if report.gate_failed:
        name = report.gate_failed[0]
        raise VerifyFailed(
            f"{name} failed its checks: do NOT distribute it. Its tag "
            f"{name}:{report.images[name].labels.get(HASH_LABEL, '')[:12]} is kept for "
            f"inspection; {name}:latest was not moved"
            + ("; images after it were not built" if report.images.keys() != set(
                d.name for d in derivations) else ""),
            hint="fix the template or the wheels, then build again",
        )
    return 0


# -- backups -------------------------------------------------------------------------------


def _local_backups(spec: Spec) -> Path | None:
    if spec.backups is None or spec.backups.directory.startswith("ssh://"):
        return None
    return Path(spec.backups.directory)


def _backup_store(spec: Spec) -> Path | RemoteDir:
    if spec.backups is None:
        raise SpecError(f"{spec.path}: the spec has no backups section",
                        hint="add backups: {directory: ~/control-workspace/docker-images}")
    directory = _local_backups(spec)
    if directory is None:
        return RemoteDir.parse(spec.backups.directory, spec.cluster.ssh_config)
    return directory


def _backup(spec: Spec, engine: Engine, name: str, info: ImageInfo,
            report: Callable[[str], None]) -> BackupResult:
    require_verified(spec, read_lock(spec.lock_path), name, info)
    assert spec.backups is not None
    store = _backup_store(spec)
    if isinstance(store, RemoteDir):
        return remote_backup_image(engine, name, info, store, spec.backups.keep, report)
    return backup_image(engine, name, info, store, spec.backups.keep, report)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def cmd_backup(args: argparse.Namespace) -> int:
    spec = _spec(args)
    lock = read_lock(spec.lock_path)
    names = [spec.resolve(n) for n in args.images] or list(spec.images)
    store = _backup_store(spec)
    derivations = {d.name: d for d in plan(spec, lock, names)}
    engine = Engine()
    done = 0
    for name in names:
        found = _current_image(spec, engine, name, derivations)
        if found is None:
            if args.images:
                raise ImageNotFound(f"{name}: no image to back up",
                                    hint=f"run 'imagebuild build {name}'")
            continue
        _ref, info = found
        result = _backup(spec, engine, name, info, _say)
        state = "written" if result.written else "up to date"
        print(f"{name}: {result.where} {state} ({result.sidecar.size / 1e9:.2f} GB, "
              f"sha256 {result.sidecar.sha256[:16]}...)")
        done += 1
    if not done:
        raise ImageNotFound("none of the spec's images is present in the engine",
                            hint="run 'imagebuild build' first")
    print(f"backups in {store}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    spec = _spec(args)
    lock = read_lock(spec.lock_path)
    engine = Engine()
    restore: Callable[[str | None], RestoreResult]
    jobs: list[str | None]
    if args.tar:
        if len(args.images) > 1:
            raise SpecError("--file restores one tar; name at most one image")
        tar = Path(args.tar)
        if not tar.is_file():
            raise BackupError(f"{tar} does not exist")
        jobs = [spec.resolve(args.images[0]) if args.images else None]

        def restore(name: str | None) -> RestoreResult:
            return restore_tar(engine, tar, _say, expect_image=name)
    else:
        store = _backup_store(spec)
        names = [spec.resolve(n) for n in args.images] or list(spec.images)
        if isinstance(store, RemoteDir):
            rdir = store
            jobs = list(names)

            def restore(name: str | None) -> RestoreResult:
                assert name is not None
                return remote_restore(engine, rdir, rdir.file(f"{name}.tar"), _say,
                                      expect_image=name)
        else:
            directory = store
            missing = [tar_path(directory, n) for n in names
                       if not tar_path(directory, n).is_file()]
            if args.images and missing:  # named: every one must be there
                raise BackupError(f"{missing[0]} does not exist",
                                  hint="list the backups directory; use --file for "
                                       "another tar")
            jobs = [n for n in names if tar_path(directory, n) not in missing]
            if not jobs:
                raise BackupError(f"no backups in {directory}",
                                  hint="run 'imagebuild backup' (or build) first")

            def restore(name: str | None) -> RestoreResult:
                assert name is not None
                return restore_tar(engine, tar_path(directory, name), _say, expect_image=name)
    failed = []
    for job in jobs:
        result = restore(job)
        image = result.name
        if image not in spec.images:
            raise BackupError(f"the tar holds {image}, which this spec does not define")
        if not result.loaded:
            print(f"{image}: already present ({result.info.id[7:19]}); nothing loaded")
        else:
            print(f"{image}: loaded {result.info.id[7:19]} in {result.seconds:.1f}s")
        record = None if result.loaded else passing_record(spec, lock, image, result.info)
        if record is None:
            record = verify_image(spec, lock, engine, image, result.info)
        if not record.passed:
            print(table([record]))
            failed.append(image)
            continue
        engine.tag(result.info.id, image, "latest")
        print(f"{image}: verified; {image}:latest -> {result.info.id[7:19]}")
    if failed:
        raise VerifyFailed(f"{', '.join(failed)} restored but failed verification: "
                           f"latest was not moved; do NOT distribute")
    return 0


# -- distribute ----------------------------------------------------------------------------


def _select_workers(spec: Spec, arg: str | None) -> list[Target]:
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
    return [Target.of(spec.cluster, w) for w in chosen]


def _backup_tar_of(spec: Spec, engine: Engine, name: str, info: ImageInfo) -> Path:
    """The local backup tar of exactly this image, written first if missing."""
    directory = _local_backups(spec)
    if directory is None:
        raise SpecError(f"{spec.path}: distribute reads each image's backup tar on this "
                        f"host, but backups.directory is remote",
                        hint="use a local backups.directory on the head node (it can be "
                             "copied to the control node separately)")
    tar = find_backup(directory, name, lambda sc: sc.image_id == info.id)
    if tar is not None:
        return tar
    assert spec.backups is not None
    _say(f"{name}: no backup of {info.id[7:19]} yet; writing it first")
    return Path(backup_image(engine, name, info, directory, spec.backups.keep, _say).where)


def cmd_distribute(args: argparse.Namespace) -> int:
    spec = _spec(args)
    lock = read_lock(spec.lock_path)
    targets = _select_workers(spec, args.workers)
    engine = Engine()
    wanted = [spec.resolve(n) for n in args.images] or list(spec.images)
    latest = {n: engine.inspect(f"{n}:latest") for n in wanted}
    names = wanted if args.images else [n for n in wanted if latest[n] is not None]
    if not names:
        raise ImageNotFound("no image of the spec has a latest tag to distribute",
                            hint="run 'imagebuild build' first")
    items: list[Item] = []
    for name in [n for n in spec.closure(names) if n in names]:
        info = latest[name]
        if info is None:
            raise ImageNotFound(f"{name}:latest is not present on this head node",
                                hint=f"run 'imagebuild build {name}'")
        if not args.force:
            require_verified(spec, lock, name, info)
        tar = _backup_tar_of(spec, engine, name, info)
        label = info.labels.get(HASH_LABEL)
        hash_tag = f"{name}:{label[:12] if label else info.id[7:19]}"
        items.append(Item(name=name, info=info, hash_tag=hash_tag,
                          archive=ArchiveIndex.read(tar)))
    progress = Progress()
    sent: dict[str, int] = {t.name: 0 for t in targets}
    last = [0.0]

    def on_bytes(worker: str, n: int) -> None:
        sent[worker] = n
        now = time.monotonic()
        if now - last[0] >= (0.5 if progress.tty else 10.0):
            last[0] = now
            progress.live("  ".join(f"{w} {b / 1e6:,.0f} MB" for w, b in sent.items()))

    verb = "would send" if args.dry_run else "sending"
    _say(f"{verb} {', '.join(i.name for i in items)} to {', '.join(t.name for t in targets)}")
    outcomes = distribute(targets, items, on_bytes, dry_run=args.dry_run)
    progress.end_live()
    if args.json:
        json.dump({"ok": all(o.ok for o in outcomes), "dry_run": args.dry_run,
                   "outcomes": [_outcome_json(o) for o in outcomes]}, sys.stdout, indent=2)
        print()
    else:
        for o in outcomes:
            print(_outcome_line(o, args.dry_run))
    failed = sorted({o.worker for o in outcomes if not o.ok})
    if failed:
        reasons = "; ".join(sorted({o.error for o in outcomes if o.error and not o.ok
                                    and o.action == "failed"}))
        raise RemoteError(f"distribution failed on {', '.join(failed)}: {reasons}",
                          hint="the other workers finished; fix the cause and run the same "
                               "command again: it sends only what is still missing")
    return 0


def _outcome_json(o: Outcome) -> dict[str, object]:
    return {"worker": o.worker, "address": o.address, "store": o.store, "image": o.image,
            "action": o.action, "layers_total": o.layers_total,
            "layers_skipped": o.layers_skipped, "bytes_planned": o.bytes_planned,
            "bytes_sent": o.bytes_sent, "seconds": round(o.seconds, 3),
            "mb_per_s": round(o.mb_per_s, 1), "ok": o.ok, "error": o.error, "note": o.note}


def _outcome_line(o: Outcome, dry_run: bool) -> str:
    head = f"{o.worker:<6} {o.image:<16}"
    if not o.ok:
        return f"{head} FAILED: {o.error}"
    if o.action == "up to date":
        return f"{head} up to date (nothing sent)"
    skipped = f"{o.layers_skipped}/{o.layers_total} layers skipped"
    if dry_run:
        return f"{head} would send {o.bytes_planned / 1e6:,.1f} MB ({o.action}, {skipped})"
    note = f" [{o.note}]" if o.note else ""
    return (f"{head} sent {o.bytes_sent / 1e6:,.1f} MB in {o.seconds:.1f}s "
            f"({o.mb_per_s:,.0f} MB/s), {skipped}{note}")


# -- verify --------------------------------------------------------------------------------


def _current_image(spec: Spec, engine: Engine, name: str,
                   derivations: dict[str, Derivation]) -> tuple[str, ImageInfo] | None:
    """The image to check: the spec's current derivation if present, else NAME:latest."""
    d = derivations.get(name)
    refs = ([d.tag] if d is not None and d.input_hash else []) + [f"{name}:latest"]
    for ref in refs:
        info = engine.inspect(ref)
        if info is not None:
            return ref, info
    return None


def cmd_verify(args: argparse.Namespace) -> int:
    spec = _spec(args)
    lock = read_lock(spec.lock_path)
    names = [spec.resolve(n) for n in args.images] or list(spec.images)
    derivations = {d.name: d for d in plan(spec, lock, names)}
    engine = Engine()
    targets: list[tuple[str, str, ImageInfo]] = []
    for name in names:
        found = _current_image(spec, engine, name, derivations)
        if found is None:
            if args.images:
                raise ImageNotFound(f"{name}: no image to verify (neither its current "
                                    f"derivation nor {name}:latest is present)",
                                    hint=f"run 'imagebuild build {name}'")
            continue
        targets.append((name, *found))
    if not targets:
        raise ImageNotFound("none of the spec's images is present in the engine",
                            hint="run 'imagebuild build' first")
    records = []
    for name, ref, info in targets:
        note = ""
        if ref.endswith(":latest") and derivations[name].input_hash:
            note = f" (its current derivation {derivations[name].tag} is not built)"
        print(f"verifying {ref} ({info.id[7:19]}): {len(spec.images[name].checks)} checks"
              + note, file=sys.stderr)
        records.append(verify_image(spec, lock, engine, name, info))
    print(table(records))
    failed = [r.image for r in records if not r.passed]
    if failed:
        raise VerifyFailed(f"{', '.join(failed)} failed verification: do NOT distribute",
                           hint="see the expected and got columns above")
    print(f"\nall checks passed: {', '.join(r.image for r in records)}")
    return 0


# -- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imagebuild",
        description="Declarative, input-addressed builds of the vLLM cluster images.",
    )
    p.add_argument("-f", "--file", metavar="SPEC", default=None,
                   help="the spec file (default: ./imagebuild.yaml)")
    p.add_argument("--version", action="version", version=f"imagebuild {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("render", help="render dockerfiles/ from templates/")
    s.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 with a diff if dockerfiles/ is stale")
    s.set_defaults(func=cmd_render)

    s = sub.add_parser("lock", help="write wheels.lock (sha256 of every declared wheel)")
    s.add_argument("--upgrade", action="store_true",
                   help="re-read index hashes even for wheels already locked")
    s.add_argument("--check", action="store_true",
                   help="write nothing; exit 2 if wheels.lock is out of date")
    s.set_defaults(func=cmd_lock)

    s = sub.add_parser("plan", help="show build order and input hashes (no engine needed)")
    s.add_argument("images", nargs="*", metavar="IMAGE", help="images (short names work)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("build", help="build the images (and their parents) that are not built")
    s.add_argument("images", nargs="*", metavar="IMAGE",
                   help="images to build with their parents (default: all)")
    s.add_argument("--dry-run", action="store_true",
                   help="print what would be reused or built, and do nothing")
    s.add_argument("--rebuild", action="store_true",
                   help="build the named images even if their input hash exists (no cache)")
    s.add_argument("--no-backup", action="store_true",
                   help="do not write tar backups of the verified images")
    s.set_defaults(func=cmd_build)

    s = sub.add_parser("backup", help="write tar backups of verified images (NAME.tar + .json)")
    s.add_argument("images", nargs="*", metavar="IMAGE",
                   help="images to back up (default: every image of the spec present)")
    s.set_defaults(func=cmd_backup)

    s = sub.add_parser("restore-from-tar",
                       help="load images from their backup tars, checked, tagged and verified")
    s.add_argument("images", nargs="*", metavar="IMAGE",
                   help="images to restore (default: every image with a backup)")
    s.add_argument("--file", dest="tar", metavar="PATH",
                   help="restore this tar (its sidecar is PATH.json)")
    s.set_defaults(func=cmd_restore)

    s = sub.add_parser("distribute",
                       help="send verified images to the workers, only the layers they lack")
    s.add_argument("images", nargs="*", metavar="IMAGE",
                   help="images to send (default: every image of the spec with a latest tag)")
    s.add_argument("--workers", metavar="N|w1,w3",
                   help="the first N workers of the cluster, or workers by name (default: all)")
    s.add_argument("--force", action="store_true",
                   help="send an image that has no passing verify record (not recommended)")
    s.add_argument("--dry-run", action="store_true",
                   help="print what each worker would receive; send nothing")
    s.add_argument("--json", action="store_true", help="a JSON summary on stdout")
    s.set_defaults(func=cmd_distribute)

    s = sub.add_parser("verify", help="run each image's checks (the torch gate) and record them")
    s.add_argument("images", nargs="*", metavar="IMAGE",
                   help="images to verify (default: every image of the spec present locally)")
    s.set_defaults(func=cmd_verify)
    return p


def main_inner(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = main_inner(argv)
    except KeyboardInterrupt:
        err: ImagebuildError = Interrupted("interrupted")
        print(f"imagebuild: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except ImagebuildError as err:
        print(f"imagebuild: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except BrokenPipeError:  # stdout closed early (| head): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    sys.exit(code)
