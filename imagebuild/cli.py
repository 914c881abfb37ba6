"""Command line: argparse, dispatch, and errors to exit codes. Nothing else.

Each ``cmd_*`` checks its arguments through the workflow layer before it touches an
engine, calls one workflow, and prints what ``output.py`` makes of its typed result. ``main_inner``
raises; ``main`` maps an ``ImagebuildError`` to its exit code (and Ctrl-C to 130) and
prints the message on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from . import __version__, adopt, context, lifecycle, lockflow, ops, output, shipping, wheelops
from .engine_docker import DockerEngine
from .errors import ImagebuildError, Interrupted
from .output import Shown
from .progress import Progress
from .spec import load_spec


def _show(shown: Shown | list[str] | str) -> None:
    if isinstance(shown, str):
        print(shown)
        return
    out, err = (shown.out, shown.err) if isinstance(shown, Shown) else (shown, [])
    if out:
        print("\n".join(out))
    if err:
        print("\n".join(err), file=sys.stderr)


def _raise(result: object) -> int:
    """The error a result carries (printed first), raised; else 0."""
    error = getattr(result, "error", None)
    if callable(error) and (err := error()) is not None:
        raise err
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    spec = load_spec(args.file)
    _show(output.render_lines(lockflow.render(spec, check=args.check), args.check,
                              len(spec.images)))
    return 0


def cmd_lock(args: argparse.Namespace) -> int:
    upgrade: bool | list[str] = False if args.upgrade is None else (args.upgrade or True)
    result = lockflow.lock(load_spec(args.file), check=args.check, upgrade=upgrade,
                           progress=Progress(sys.stderr), allow_unresolved=args.allow_unresolved)
    _show(output.lock_json(result) if args.json else output.lock_shown(result))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    result = ops.plan_all(ops.plan_build(args.file, args.images))
    _show(output.plan_json(result) if args.json else output.plan_lines(result))
    return 0


def cmd_build_wheels(args: argparse.Namespace) -> int:
    if args.resolve:
        _show(output.resolve_lines(wheelops.resolve_refs(
            args.file, wheelops.resolve_request(args.resolve, args.wheels, args.check),
            Progress())))
        return 0
    spec = load_spec(args.file)
    names = wheelops.wheel_names(spec, args.wheels)
    if args.check:
        checked = wheelops.check_wheels(spec, DockerEngine(), names, progress=Progress())
        _show(output.wheel_check_lines(checked))
        return _raise(checked)
    _show(output.wheels_lines(wheelops.build_wheels(spec, DockerEngine(), names,
                                                    progress=Progress())))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    planned = ops.plan_build(args.file, args.images)
    result = ops.build(planned, DockerEngine, rebuild=args.rebuild, backup=not args.no_backup,
                       dry_run=args.dry_run, progress=Progress())
    _show(output.build_json(result, args.dry_run) if args.json
          else output.build_shown(result, args.dry_run))
    return _raise(result)


def cmd_verify(args: argparse.Namespace) -> int:
    ctx = context.load(args.file)
    ctx.names(args.images)
    result = ops.verify(ctx, DockerEngine(), args.images, Progress())
    _show(output.verify_json(result) if args.json else output.verify_lines(result))
    return _raise(result)


def cmd_backup(args: argparse.Namespace) -> int:
    ctx = context.load(args.file)
    ctx.names(args.images)
    context.backup_store(ctx.spec)
    if args.check:
        check = (lifecycle.check_mirrors(ctx, Progress()) if args.mirror
                 else lifecycle.check_backups(ctx, Progress(), images=args.images))
        _show(check.lines())
        return _raise(check)
    result = ops.backup(ctx, DockerEngine(), args.images, Progress())
    _show(output.backup_json(result) if args.json else output.backup_lines(result))
    return _raise(result)


def cmd_restore(args: argparse.Namespace) -> int:
    ctx = context.load(args.file)
    if args.adopt:
        req = adopt.adopt_request(ctx, args.images, tar=args.tar, from_tar=True)
        return _adopted(adopt.adopt(ctx, DockerEngine(), req, Progress()), args.json)
    request = ops.restore_request(ctx, args.images, args.tar)
    result = ops.restore(ctx, DockerEngine(), request, Progress())
    _show(output.restore_json(result) if args.json else output.restore_lines(result))
    return _raise(result)


def cmd_export(args: argparse.Namespace) -> int:
    ctx = context.load(args.file)
    request = ops.export_request(ctx, args.images, every=args.all, output=args.output,
                                 generation=args.generation)
    result = ops.export(ctx, request, Progress())
    _show(output.export_json(result) if args.json else output.export_lines(result))
    return 0


def cmd_adopt(args: argparse.Namespace) -> int:
    ctx = context.load(args.file)
    req = adopt.adopt_request(ctx, [args.name], ref=args.ref)
    return _adopted(adopt.adopt(ctx, DockerEngine(), req, Progress()), args.json)


def _adopted(result: adopt.AdoptOutcome, as_json: bool) -> int:
    _show(output.adopt_json(result) if as_json else output.adopt_lines(result))
    return _raise(result)


def cmd_distribute(args: argparse.Namespace) -> int:
    ctx = context.load(args.file)
    request = shipping.distribute_request(ctx, args.images, args.workers, force=args.force,
                                          dry_run=args.dry_run, via=args.via)
    result = shipping.distribute(ctx, DockerEngine(), request, Progress())
    _show(output.distribute_json(result) if args.json else output.distribute_lines(result))
    return _raise(result)


def cmd_status(args: argparse.Namespace) -> int:
    ctx = context.load(args.file)
    workers = context.workers_for(ctx.spec, args.workers)
    if args.check_backups:
        context.backup_store(ctx.spec)
    report = lifecycle.status(ctx, DockerEngine(), workers, check=args.check_backups,
                              progress=Progress())
    _show(output.json_text(report.to_json()) if args.json
          else output.status_shown(report, [w.name for w in workers]))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    ctx = context.load(args.file)
    workers = context.workers_for(ctx.spec, args.workers) if args.workers else []
    result = lifecycle.prune(ctx, DockerEngine(), workers, dry_run=args.dry_run,
                             progress=Progress())
    _show(output.prune_json(result) if args.json else output.prune_lines(result))
    return _raise(result)


def cmd_rollback(args: argparse.Namespace) -> int:
    ctx = context.load(args.file)
    name = ctx.spec.resolve(args.image)
    to = lifecycle.check_hash12(args.to)
    workers = context.select_workers(ctx.spec, args.workers) if args.workers else []
    result = lifecycle.rollback(ctx, DockerEngine(), name, to, workers, Progress())
    _show(output.rollback_json(name, result) if args.json
          else output.rollback_lines(name, result))
    return _raise(result)


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
                   help="write nothing; exit 2 if a lock is out of date or anything in it is "
                        "unresolved (for CI)")
    s.add_argument("--allow-unresolved", action="store_true",
                   help="with --check: pass with unresolved hashes (a CI machine without the "
                        "wheels), saying so loudly; still fails on a stale lock")
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
    s.add_argument("--resolve", action="append", default=[], metavar="NAME=REF",
                   help="pin a branch or tag: write the full commit REF names now into the "
                        "spec's commit: of wheel NAME (repeatable; builds nothing)")
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
    s.add_argument("--mirror", action="store_true",
                   help="with --check: check the mirrors (backups.mirror) instead, each on "
                        "its own host; the next backup repairs what it finds")
    s.set_defaults(func=cmd_backup)

    s = sub.add_parser("restore-from-tar",
                       help="load images from their backups, checked, tagged and verified")
    images(s, "images to restore (default: every image with a backup)")
    s.add_argument("--file", dest="tar", metavar="PATH",
                   help="restore this tar instead of the store (its sidecar is PATH.json)")
    s.add_argument("--adopt", action="store_true",
                   help="a tar without a sidecar (docker save by hand): load it quarantined, "
                        "run the named image's checks, and only if they pass make it that "
                        "image's latest, rooted and backed up")
    s.set_defaults(func=cmd_restore)

    s = sub.add_parser("adopt", help="bring an image built outside imagebuild under it: "
                                     "checked, then latest, rooted, backed up")
    s.add_argument("ref", metavar="IMAGE_REF", help="the image in the engine (name:tag or ID)")
    s.add_argument("--as", dest="name", metavar="NAME", required=True,
                   help="the spec's image it becomes a generation of")
    s.set_defaults(func=cmd_adopt)

    s = sub.add_parser("export", help="write images out of the backup store as plain "
                                      "docker save tars (NAME.tar + a sidecar)")
    images(s, "images to export")
    s.add_argument("--all", action="store_true",
                   help="every image of the spec that has a backup")
    s.add_argument("-o", "--output", metavar="PATH",
                   help="the tar (one image) or a directory (default: ./NAME.tar)")
    s.add_argument("--generation", metavar="HASH12",
                   help="an older generation of the one image named (default: current)")
    s.set_defaults(func=cmd_export)

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
    for name in ("lock", "build", "verify", "backup", "restore-from-tar", "export", "adopt",
                 "prune", "rollback"):
        sub.choices[name].add_argument("--json", action="store_true",
                                       help="the result as one JSON document on stdout")
    # -f also after the command (imagebuild render --check -f SPEC); absent there, the one
    # before it (or the default) stands. restore-from-tar's --file names a tar: there the
    # spec goes before the command
    for name, command in sub.choices.items():
        if name != "restore-from-tar":
            command.add_argument("-f", "--file", metavar="SPEC", default=argparse.SUPPRESS,
                                 help="the spec file (default: ./imagebuild.yaml)")
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
