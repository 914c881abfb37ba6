"""The distribute workflow: each verified image's ``latest`` to the workers, only the
layers each lacks, over ssh or through the spec's registry (``choose_path``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Literal

from .archive import ArchiveIndex
from .backup import (
    find_backup,
    generation_archive,
    write_backup,
)
from .context import Context, backup_store, select_workers
from .distribute import Item, Outcome, Worker
from .distribute import distribute as fan_out
from .engine import Engine
from .errors import (
    ImagebuildError,
    ImageNotFound,
    RemoteError,
    SpecError,
)
from .image import ImageInfo
from .naming import hash_tag, latest_tag, short_id
from .progress import Progress
from .publish import NOT_STARTED, PublishResult, client_for, ensure_registry, publish
from .spec import Spec
from .store import BackupDir
from .verify import passing_record, require_verified

Via = Literal["ssh", "registry"]


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
    """The backup generation of exactly this image (written first if missing), in a
    store on this host (its files opened once, sent with sendfile) or on another (read
    over ssh as it is sent); every file checked against its digest as it streams."""
    found = find_backup(store, name, lambda b: b.image_id == info.id and b.gen is not None)
    if found is None:
        progress.say(f"{name}: no backup of {short_id(info.id)} yet; writing it first")
        found = write_backup(store, engine, name, info, keep, progress).backup
    return generation_archive(store, found)
