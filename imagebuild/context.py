"""What the workflows share: the ``Context`` every operation but render and lock reads
(the spec with its locks, checked against each other), the backup store of a spec, the
derivations of some images, and the workers an operation is asked to reach.

Below every workflow module (ops, lockflow, shipping, lifecycle, wheelops), which stand
side by side on it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from .closure import ClosureLock, Locks
from .derivation import Derivation, plan
from .distribute import Worker
from .engine_ssh import SshEngine
from .errors import (
    ImagebuildError,
    MirrorError,
    SpecError,
    reason,
)
from .fsutil import atomic_write_text
from .locking import checked, read_lock_files
from .mirror import MirrorResult, copy_to_mirror
from .progress import Progress
from .promote import Gate
from .remote import Target
from .spec import Spec, SshLocation, did_you_mean, load_spec
from .store import BackupDir, SshDir, open_store
from .untrusted import loads_json
from .wheelplan import wheel_plan

MIRROR_DAMAGE = "mirror-damage.json"  # in the state directory
_HEX64 = re.compile(r"[0-9a-f]{64}")


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
    """The spec and its locks, read and checked against each other (``locking.checked``)."""
    spec = load_spec(spec_path)
    return Context(spec, checked(spec, read_lock_files(spec), wheel_plan(spec)))


def backup_store(spec: Spec) -> BackupDir:
    if spec.backups is None:
        raise SpecError(f"{spec.path}: the spec has no backups section",
                        hint="add backups: {directory: ~/control-workspace/docker-images}")
    if isinstance(spec.backups.location, SshLocation):
        spec.cluster.require()  # its ssh config comes with the cluster
    return open_store(spec.backups, spec.cluster.ssh_config)


def mirror_stores(spec: Spec) -> list[BackupDir]:
    """The mirrors of the backup store (``backups.mirror``)."""
    if spec.backups is None:
        return []
    if spec.backups.mirrors:
        spec.cluster.require()  # their ssh config comes with the cluster
    return [SshDir(loc, spec.cluster.ssh_config) for loc in spec.backups.mirrors]


def update_mirrors(spec: Spec, store: BackupDir, names: list[str], progress: Progress
                   ) -> list[MirrorResult]:
    """After a backup: each mirror brought up to date with the generations of ``names``
    (and the blobs ``backup --check --mirror`` found damaged there sent again). A mirror
    that fails is a warning and its result's error, never a lost local backup."""
    out = []
    for mirror in mirror_stores(spec):
        damaged = frozenset(read_mirror_damage(spec).get(str(mirror), []))
        assert spec.backups is not None  # mirrors are part of it
        try:
            result = copy_to_mirror(store, mirror, names, spec.backups.keep, progress, damaged)
        except (ImagebuildError, OSError) as exc:
            why = reason(exc)
            progress.say(f"  WARNING: mirror {mirror} not brought up to date: {why}; the "
                         f"backup in {store} is complete")
            out.append(MirrorResult(str(mirror), error=why))
            continue
        if damaged:
            record_mirror_damage(spec, str(mirror), [])
        progress.say(f"  mirror {mirror}: {result.blobs_sent} blob(s) sent "
                     f"({result.bytes_sent / 1e6:,.1f} MB), "
                     f"{len(result.generations)} generation(s) put in place")
        out.append(result)
    return out


def mirror_error(mirrors: list[MirrorResult]) -> MirrorError | None:
    """The error of the mirrors that could not be brought up to date (exit 13)."""
    failed = [m for m in mirrors if m.error]
    if not failed:
        return None
    return MirrorError("; ".join(f"mirror {m.where}: {m.error}" for m in failed)
                       + "; the backups on this side are written and intact",
                       hint="bring the mirror host back and run 'imagebuild backup': it "
                            "sends what the mirror lacks")


def read_mirror_damage(spec: Spec) -> dict[str, list[str]]:
    """The blobs ``backup --check --mirror`` last found damaged, per mirror."""
    try:
        data = loads_json((spec.state_dir / MIRROR_DAMAGE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): [str(d) for d in v if isinstance(d, str) and _HEX64.fullmatch(d)]
            for k, v in data.items() if isinstance(v, list)}


def record_mirror_damage(spec: Spec, mirror: str, digests: list[str]) -> None:
    data = read_mirror_damage(spec)
    data[mirror] = sorted(digests)
    atomic_write_text(spec.state_dir / MIRROR_DAMAGE, json.dumps(data, indent=2) + "\n")


def plan_images(ctx: Context, images: list[str]) -> list[Derivation]:
    """The closure of ``images`` in build order, with input hashes. No engine."""
    return plan(ctx.spec, ctx.lock, images)


def select_workers(spec: Spec, arg: str | None) -> list[Worker]:
    """``--workers N`` (the first N), ``--workers w1,w3`` (by name), or all of them."""
    spec.cluster.require()
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


def workers_for(spec: Spec, arg: str | None) -> list[Worker]:
    """``select_workers``, except that a spec without workers gives none when none were
    asked for (status and prune then look at the head only)."""
    if arg is None and not spec.cluster.workers and spec.cluster.unavailable is None:
        return []
    return select_workers(spec, arg)


