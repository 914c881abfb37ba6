"""Command line: argparse, output formatting, and errors to exit codes. Nothing else.

Each ``cmd_*`` checks its arguments through the workflow layer (``ops``) before it
touches an engine, calls one workflow, and prints its typed result. ``main_inner``
raises; ``main`` maps an ``ImagebuildError`` to its exit code (and Ctrl-C to 130) and
prints the message on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from . import __version__, lifecycle, ops, wheelops
from .build import Action, Step
from .derivation import Derivation
from .distribute import Outcome
from .engine_docker import DockerEngine
from .errors import ImagebuildError, Interrupted
from .naming import hash12, input_hash, short_id
from .ops import DistributeOutcome
from .progress import Progress
from .spec import load_spec
from .verify import table


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _json(data: object) -> None:
    json.dump(data, sys.stdout, indent=2)
    print()


# -- render, lock, plan --------------------------------------------------------------------


def cmd_render(args: argparse.Namespace) -> int:
    spec = load_spec(args.file)
    result = ops.render(spec, check=args.check)
    if args.check:
        print(f"dockerfiles are up to date ({len(spec.images)} images)")
    for p in result.written:
        print(f"wrote {_rel(p)}")
    for p in result.unchanged:
        print(f"unchanged {_rel(p)}")
    return 0


def cmd_lock(args: argparse.Namespace) -> int:
    upgrade: bool | list[str] = False if args.upgrade is None else (args.upgrade or True)
    result = ops.lock(load_spec(args.file), check=args.check, upgrade=upgrade,
                      progress=Progress(sys.stderr))
    _print_lock(result)
    return 0


def _print_lock(result: ops.LockOutcome) -> None:
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for note in result.notes:
        print(f"  {note}", file=sys.stderr)

    def line(path: Path, state: str, what: str) -> str:
        shown = "is up to date" if state == "up to date" else state
        where = _rel(path)
        return f"{where} {shown} ({what})" if state != "written" else f"wrote {where} ({what})"

    print(line(result.path, result.state, f"{result.wheels} wheels, {result.unresolved} "
                                          f"unresolved"))
    for c in result.closures:
        what = (f"{c.packages} distributions" if c.unresolved is None
                else f"unresolved: {c.unresolved}")
        print(line(c.path, c.state, what))
        for change in c.changed:
            print(f"  {change}")


def _plan_row(d: Derivation) -> dict[str, object]:
    return {
        "name": d.name,
        "parent": d.parent,
        "base": d.base,
        "input_hash": d.input_hash,
        "tag": d.tag if d.input_hash else None,
        "unresolved": list(d.unresolved),
        "context": [{"path": f.arcname, "sha256": f.sha256} for f in d.context],
        "layers": [{"group": g, "installs": list(names)} for g, names in d.layers],
    }


def _wheel_row(s: wheelops.WheelStep) -> dict[str, object]:
    d = s.derivation
    return {"name": d.name, "input_hash": d.input_hash, "action": s.action,
            "commit": d.build.commit, "patches": [name for name, _sha in d.patches],
            "builder": d.build.builder_reference, "locked": s.locked,
            "filename": s.record.filename if s.record else None,
            "sha256": s.record.sha256 if s.record else None}


def _print_wheels(plan: wheelops.WheelPlan, what: str) -> None:
    """The wheel steps (nothing when no wheel is built from source), and what a pending
    lock means for the image plan."""
    if plan.steps:
        print(f"wheels built from source ({len(plan.steps)}{what}):")
        print("\n".join(_wheel_table(plan.steps)))
    if plan.pending:
        print(PENDING)


def _wheel_table(steps: list[wheelops.WheelStep]) -> list[str]:
    width = max(len(s.derivation.name) for s in steps)
    rows = []
    for i, s in enumerate(steps, 1):
        d = s.derivation
        what = f"reuse {s.record.filename}" if s.record else \
            f"build from {d.build.commit[:12]}" + (f" + {len(d.patches)} patch(es)"
                                                    if d.patches else "")
        lock = "" if s.locked else "  (not in wheels.lock yet)"
        rows.append(f"  {i}. {d.name:<{width}}  {d.hash12}  {what}{lock}")
    return rows


PENDING = ("the image plan follows once the wheels above are built and locked: "
           "'imagebuild build' builds them, re-locks, then builds the images")


def cmd_plan(args: argparse.Namespace) -> int:
    spec = load_spec(args.file)
    wheels = wheelops.plan_wheels(spec, args.images)
    if wheels.pending:
        if args.json:
            _json({"spec": str(spec.path), "wheels": [_wheel_row(w) for w in wheels.steps],
                   "images": None, "pending": PENDING})
        else:
            _print_wheels(wheels, "")
        return 0
    ctx = ops.load(args.file)
    outcome = ops.plan_with_changes(ctx, args.images)
    derivations, changes = outcome.derivations, outcome.lock_changes
    if args.json:
        _json({"spec": str(ctx.spec.path), "wheels": [_wheel_row(w) for w in wheels.steps],
               "images": [{**_plan_row(d), "lock_changes": changes.get(d.name, [])}
                          for d in derivations]})
        return 0
    _print_wheels(wheels, "")
    width = max(len(d.name) for d in derivations)
    print(f"plan ({len(derivations)} images, in build order):")
    for i, d in enumerate(derivations, 1):
        h = hash12(d.input_hash) if d.input_hash else "unresolved  "
        origin = f"FROM {d.parent}" if d.parent else f"FROM {d.base}"
        print(f"  {i}. {d.name:<{width}}  {h}  {origin}")
        if d.layers:
            groups = [f"{g} {len(names)}" for g, names in d.layers if names]
            print(f"     {'':<{width}}  installs: " + (", ".join(groups) if groups else
                  f"nothing ({d.parent} has all of its closure)"))
        if d.name in changes:
            print(f"     {'':<{width}}  rebuilds (lock changed since the last commit): "
                  f"{', '.join(changes[d.name])}")
    missing = sorted({f for d in derivations for f in d.unresolved})
    if missing:
        print(f"\n{len(missing)} wheel hash(es) are unresolved in {_rel(ctx.spec.lock_path)}: "
              f"{', '.join(missing)}")
        print("run 'imagebuild lock' where those wheels are, then plan again")
    return 0


# -- build, verify ---------------------------------------------------------------------------


def _steps_table(steps: list[Step]) -> list[str]:
    width = max(len(s.derivation.name) for s in steps)
    rows = []
    for i, s in enumerate(steps, 1):
        d = s.derivation
        if s.action is Action.REUSE and s.image:
            what = f"reuse {short_id(s.image.id)}"
        elif s.action is Action.RESTORE:
            what = f"restore from {s.substitute_from}"
        else:
            what = "build"
        rows.append(f"  {i}. {d.name:<{width}}  {d.hash12}  {what}")
    return rows


def cmd_build_wheels(args: argparse.Namespace) -> int:
    spec = load_spec(args.file)
    names = wheelops.wheel_names(spec, args.wheels)
    if args.check:
        checked = wheelops.check_wheels(spec, DockerEngine(), names, progress=Progress())
        for a, b in checked.pairs:
            same = "reproducible" if a.sha256 == b.sha256 else "DIFFERS"
            print(f"{a.name}: {same}: stored {a.sha256[:16]}, rebuilt {b.sha256[:16]} "
                  f"({b.filename})")
        if (err := checked.error()) is not None:
            raise err
        return 0
    result = wheelops.build_wheels(spec, DockerEngine(), names, progress=Progress())
    for o in result.wheels:
        what = "built" if o.built else "reused"
        print(f"{o.record.name}: {what} {o.record.filename} (derivation "
              f"{o.derivation.hash12}, sha256 {o.record.sha256[:16]})")
    if result.unlocked:
        print(f"wheels.lock does not record {', '.join(result.unlocked)} yet: run "
              f"'imagebuild lock' and commit the locks")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    spec = load_spec(args.file)
    wheels = wheelops.plan_wheels(spec, args.images)
    if args.dry_run:
        _print_wheels(wheels, "; nothing will be done")
        if wheels.pending:
            return 0
    engine = DockerEngine()
    if not args.dry_run:
        relocked = wheelops.realize_planned(spec, engine, wheels, progress=Progress())
        if relocked is not None:
            _print_lock(relocked)
            print("the locks now record the wheels built from source: commit them")
    ctx = ops.load(args.file)
    result = ops.build(ctx, engine, args.images, rebuild=args.rebuild,
                       backup=not args.no_backup, dry_run=args.dry_run, progress=Progress())
    if result.report is None:
        print(f"build plan ({len(result.steps)} images, in order; nothing will be done):")
        print("\n".join(_steps_table(result.steps)))
        return 0
    report = result.report
    moved = result.latest_moved
    print(f"built {len(report.built)}, restored {len(report.restored)}, "
          f"reused {len(report.reused)}" + (f"; latest moved: {', '.join(moved)}" if moved else ""))
    for name, info in report.images.items():
        mark = "FAILED its checks" if name == result.gate_failed else "verified"
        h = input_hash(info)
        print(f"  {name}:{hash12(h) if h else '-'} ({short_id(info.id)}) {mark}")
    failed = result.gate_failed
    if failed is not None:
        record = result.promotions[failed].record
        if record is not None:
            print(table([record]), file=sys.stderr)
    if (err := result.error()) is not None:
        raise err
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    ctx = ops.load(args.file)
    ctx.names(args.images)
    result = ops.verify(ctx, DockerEngine(), args.images, Progress())
    print(table([v.record for v in result.checked]))
    if (err := result.error()) is not None:
        raise err
    print(f"\nall checks passed: {', '.join(v.name for v in result.checked)}")
    return 0


# -- backup, restore -------------------------------------------------------------------------


def cmd_backup(args: argparse.Namespace) -> int:
    ctx = ops.load(args.file)
    ctx.names(args.images)
    ops.backup_store(ctx.spec)
    if args.check:
        check = lifecycle.check_backups(ctx, Progress(), images=args.images)
        print("\n".join(check.lines()))
        if (err := check.error()) is not None:
            raise err
        return 0
    result = ops.backup(ctx, DockerEngine(), args.images, Progress())
    for name, r in result.results:
        state = (f"written ({r.bytes_written / 1e9:.2f} GB new of {r.backup.size / 1e9:.2f} "
                 f"GB, {r.seconds:.1f}s)" if r.written
                 else f"up to date ({r.backup.size / 1e9:.2f} GB)")
        print(f"{name}: {r.where} {state}")
        for tar in r.imported:
            print(f"{name}: imported {tar} into the layer store")
        if r.dropped:
            print(f"{name}: dropped older generations {', '.join(r.dropped)}")
    print(f"backups in {result.store}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    ctx = ops.load(args.file)
    request = ops.restore_request(ctx, args.images, args.tar)
    result = ops.restore(ctx, DockerEngine(), request, Progress())
    for r in result.restored:
        name, info = r.result.name, r.result.info
        if r.result.loaded:
            print(f"{name}: loaded {short_id(info.id)} in {r.result.seconds:.1f}s")
        else:
            print(f"{name}: already present ({short_id(info.id)}); nothing loaded")
        if r.promotion.passed:
            print(f"{name}: verified; {name}:latest -> {short_id(info.id)}")
        elif r.promotion.record is not None:
            print(table([r.promotion.record]))
    if (err := result.error()) is not None:
        raise err
    return 0


# -- distribute ------------------------------------------------------------------------------


def cmd_distribute(args: argparse.Namespace) -> int:
    ctx = ops.load(args.file)
    request = ops.distribute_request(ctx, args.images, args.workers, force=args.force,
                                     dry_run=args.dry_run, via=args.via)
    result = ops.distribute(ctx, DockerEngine(), request, Progress())
    up = result.upload
    if args.json:
        _json({"ok": result.ok, "dry_run": result.dry_run, "via": result.via,
               "why": result.why, "upload": None if up is None else up.to_json(),
               "outcomes": [_outcome_json(o) for o in result.outcomes]})
    else:
        print("\n".join([f"via {result.via} ({result.why})", *(up.lines() if up else [])]))
        for o in result.outcomes:
            print(_outcome_line(o, result.dry_run))
    if (err := result.error()) is not None:
        raise err
    return 0


def _outcome_json(o: Outcome) -> dict[str, object]:
    return {**asdict(o), "seconds": round(o.seconds, 3), "mb_per_s": round(o.mb_per_s, 1)}


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
    verb = "pulled" if o.action == "pulled" else "sent"
    return (f"{head} {verb} {o.bytes_sent / 1e6:,.1f} MB in {o.seconds:.1f}s "
            f"({o.mb_per_s:,.0f} MB/s), {skipped}{note}")


# -- status, prune, rollback ----------------------------------------------------------------


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def cmd_status(args: argparse.Namespace) -> int:
    ctx = ops.load(args.file)
    workers = ops.workers_for(ctx.spec, args.workers)
    if args.check_backups:
        ops.backup_store(ctx.spec)
    report = lifecycle.status(ctx, DockerEngine(), workers, check=args.check_backups,
                              progress=Progress())
    if args.json:
        _json(report.to_json())
        return 0
    names = [w.name for w in workers]
    rows = [["image", "derivation", "latest", "verified", "rooted", "backup", *names]]
    for i in report.images:
        derivation = (i.derivation or "unresolved") + ("" if i.built else " (not built)")
        latest = (f"{i.latest} ({i.latest_hash})" if i.latest else "-")
        verified = f"{i.verified_at} ({len(i.checks)} checks)" if i.verified_at else "NO"
        rooted = ("yes" if i.rooted else "NO") + ("" if i.hash_tag_present
                                                  else ", hash tag stripped")
        b = i.backup
        backup = "none" if b.where is None else (
            f"{b.where} {_gb(b.size)}, +{b.generations} older"
            + ("" if b.matches_latest else ", not of latest")
            + ("" if b.check_ok is None else
               f", checked {b.checked} {'ok' if b.check_ok else 'CORRUPT'}"))
        rows.append([i.name, derivation, latest, verified, rooted, backup,
                     *(i.workers.get(w, "-") for w in names)])
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(widths[c]) for c, cell in enumerate(r)).rstrip())
    for w, why in report.unreachable.items():
        print(f"{w}: unreachable: {why}")
    if any(not i.hash_tag_present or not i.rooted for i in report.images if i.latest):
        print("a root is missing or a tag was stripped (docker image prune -a keeps one tag "
              "of an image in use): 'imagebuild prune' puts roots and tags back")
    print(f"({report.seconds:.1f}s)", file=sys.stderr)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    ctx = ops.load(args.file)
    workers = ops.workers_for(ctx.spec, args.workers) if args.workers else []
    result = lifecycle.prune(ctx, DockerEngine(), workers, dry_run=args.dry_run,
                             progress=Progress())
    for node in result.nodes:
        if node.error:
            print(f"{node.node}: FAILED: {node.error}")
            continue
        if node.repaired:
            print(f"{node.node}: put back {node.repaired} root holder(s) or tag(s) first")
        for item in node.items:
            size = f" {_gb(item.size)}" if item.size else ""
            print(f"{node.node}: {'would remove' if result.dry_run else 'removed'} "
                  f"{item.kind} {item.ref}{size} ({item.why})")
        total = sum(i.size for i in node.items)
        if result.dry_run:
            print(f"{node.node}: {len(node.items)} item(s), about {_gb(total)} to reclaim")
        else:
            print(f"{node.node}: {len(node.items)} item(s) removed, "
                  f"{_gb(node.reclaimed or 0)} reclaimed")
    if (err := result.error()) is not None:
        raise err
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    ctx = ops.load(args.file)
    name = ctx.spec.resolve(args.image)
    to = lifecycle.check_hash12(args.to)
    workers = ops.select_workers(ctx.spec, args.workers) if args.workers else []
    result = lifecycle.rollback(ctx, DockerEngine(), name, to, workers, Progress())
    p = result.promotion
    if p.passed:
        print(f"{name}: latest {result.previous or '-'} -> {short_id(p.image.id)} "
              f"(generation {result.generation.hash12}"
              + (", restored from its backup" if result.restored else "") + ")")
    elif p.record is not None:
        print(table([p.record]))
    dist = result.distributed
    if isinstance(dist, DistributeOutcome):
        for o in dist.outcomes:
            print(_outcome_line(o, False))
    if (err := result.error()) is not None:
        raise err
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

    def images(s: argparse.ArgumentParser, what: str) -> None:
        s.add_argument("images", nargs="*", metavar="IMAGE", help=what)

    s = sub.add_parser("render", help="render dockerfiles/ from templates/")
    s.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 with a diff if dockerfiles/ is stale")
    s.set_defaults(func=cmd_render)

    s = sub.add_parser("lock", help="write wheels.lock (sha256 of every declared wheel) and "
                                     "locks/pylock.<image>.toml (each image's whole closure)")
    s.add_argument("--upgrade", nargs="*", metavar="PACKAGE",
                   help="move the named packages to the newest the indexes offer (every "
                        "other pin stays); with no names, everything, and re-read index "
                        "hashes")
    s.add_argument("--check", action="store_true",
                   help="write nothing; exit 2 if a lock is out of date (for CI)")
    s.set_defaults(func=cmd_lock)

    s = sub.add_parser("plan", help="show build order and input hashes (no engine needed)")
    images(s, "images (short names work)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("build-wheels", help="build the wheels declared under wheels.build "
                                            "(reused when their input hash is stored)")
    s.add_argument("wheels", nargs="*", metavar="WHEEL", help="wheels to build (default: all)")
    s.add_argument("--check", action="store_true",
                   help="build stored wheels again from the same inputs and compare sha256 "
                        "(exit 10 if any differs); the store is not changed")
    s.set_defaults(func=cmd_build_wheels)

    s = sub.add_parser("build", help="build the images (and their parents) that are not built")
    images(s, "images to build with their parents (default: all)")
    s.add_argument("--dry-run", action="store_true",
                   help="print what would be reused or built, and do nothing")
    s.add_argument("--rebuild", action="store_true",
                   help="build the named images even if their input hash exists (no cache)")
    s.add_argument("--no-backup", action="store_true",
                   help="do not back up the verified images")
    s.set_defaults(func=cmd_build)

    s = sub.add_parser("backup", help="save verified images into the layer store (each layer "
                                      "kept once)")
    images(s, "images to back up (default: every image of the spec present)")
    s.add_argument("--check", action="store_true",
                   help="hash every blob of the store against its name; name the damaged "
                        "ones and the generations that use them")
    s.set_defaults(func=cmd_backup)

    s = sub.add_parser("restore-from-tar",
                       help="load images from their backups, checked, tagged and verified")
    images(s, "images to restore (default: every image with a backup)")
    s.add_argument("--file", dest="tar", metavar="PATH",
                   help="restore this tar instead of the store (its sidecar is PATH.json)")
    s.set_defaults(func=cmd_restore)

    s = sub.add_parser("distribute",
                       help="send verified images to the workers, only the layers they lack")
    images(s, "images to send (default: every image of the spec with a latest tag)")
    s.add_argument("--workers", metavar="N|w1,w3",
                   help="the first N workers of the cluster, or workers by name (default: all)")
    s.add_argument("--force", action="store_true",
                   help="send an image that has no passing verify record (its latest does "
                        "not move on the workers)")
    s.add_argument("--dry-run", action="store_true",
                   help="print what each worker would receive; send nothing")
    s.add_argument("--via", choices=("auto", "ssh", "registry"), default="auto",
                   help="ssh: a stream per worker from this host; registry: put the images "
                        "into the spec's registry, every worker pulls; auto (default): the "
                        "registry from registry.min_workers workers on")
    s.add_argument("--json", action="store_true", help="a JSON summary on stdout")
    s.set_defaults(func=cmd_distribute)

    s = sub.add_parser("verify", help="run each image's checks (the torch gate) and record them")
    images(s, "images to verify (default: every image of the spec present locally)")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("status", help="each image: derivation, latest, verified, rooted, "
                                      "backup, and what every worker holds")
    s.add_argument("--workers", metavar="N|w1,w3", help="the workers to ask (default: all)")
    s.add_argument("--check-backups", action="store_true",
                   help="hash every blob of the backup store (as backup --check) first")
    s.add_argument("--json", action="store_true", help="the same, as JSON")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("prune", help="remove imagebuild's images that are not a GC root "
                                     "(never a root, never a backup; there is no -a)")
    s.add_argument("--workers", metavar="N|w1,w3", help="also prune these workers")
    s.add_argument("--dry-run", action="store_true",
                   help="list what would be removed, with sizes; remove nothing")
    s.set_defaults(func=cmd_prune)

    s = sub.add_parser("rollback", help="move an image's latest back to an earlier "
                                        "generation (verified; restored from backup if gone)")
    s.add_argument("image", metavar="IMAGE")
    s.add_argument("--to", metavar="HASH12", help="the generation (default: the previous one)")
    s.add_argument("--workers", metavar="N|w1,w3", help="the workers follow it")
    s.set_defaults(func=cmd_rollback)
    return p


def _command(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """The subcommand and the arguments after it (``-f SPEC`` may come first)."""
    rest = list(argv)
    while rest and rest[0].startswith("-"):
        flag = rest.pop(0)
        if flag in ("-f", "--file") and rest:
            rest.pop(0)
    return (rest[0], rest[1:]) if rest else (None, [])


def main_inner(argv: Sequence[str] | None = None) -> int:
    command, rest = _command(sys.argv[1:] if argv is None else argv)
    if command == "prune":
        lifecycle.refuse_all(rest)  # before argparse: say why -a is refused
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
