"""The workflows that keep what was built: ``status``, ``prune`` and ``rollback``.

Same layer as ops.py, shipping.py and wheelops.py (one function per command, typed
inputs and results, arguments checked before any engine is contacted). The GC roots
they read and repair are roots.py's; ``latest`` moves only through promote.py.

``prune`` removes only what imagebuild manages and nothing holds: images labelled with
a spec image's name that are neither a root nor ``latest``, dangling images of ours, and
holders of images the spec no longer has. Never a root, never another program's image,
never a backup file. There is no ``-a``: an engine's every unused image is not
imagebuild's to remove (that is how the field lost vllm-node-mimo).
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Literal

from .backup import Backup, backups_of, restore_backup
from .build import find_existing
from .context import (
    Context,
    backup_store,
    mirror_stores,
    plan_images,
    record_mirror_damage,
)
from .distribute import Worker
from .engine import ContainerInfo, Engine, Snapshot
from .errors import (
    ImagebuildError,
    ImageNotFound,
    MirrorError,
    SpecError,
    VerifyFailed,
    reason,
)
from .fsutil import atomic_write_text
from .image import ImageInfo
from .layerstore import BLOBS, StoreCheck, check_store
from .mirror import MirrorState, mirror_state
from .naming import (
    HASH12,
    IMAGE_LABEL,
    LATEST,
    ROOT_LABEL,
    ROOT_TAG_LABEL,
    hash12,
    hash_tag,
    input_hash,
    latest_tag,
    short_id,
    split_ref,
)
from .progress import Progress
from .promote import Promotion, promote
from .roots import plan_roots, root
from .shipping import distribute as distribute_op
from .shipping import request_for
from .store import BackupDir
from .untrusted import loads_json
from .verify import image_checks, passing_record
from .wheelstore import WheelStoreState, prune_store, store_state

WorkerImage = Literal["up to date", "stale", "missing", "unrooted", "unreachable",
                      "no head image"]


def _snapshots(workers: list[Worker]) -> dict[str, Snapshot | ImagebuildError]:
    """Every worker's snapshot (one ssh round trip each, in parallel); a worker that
    fails gives its error instead."""

    def one(w: Worker) -> Snapshot | ImagebuildError:
        try:
            return w.engine.snapshot()
        except ImagebuildError as exc:
            return exc
        except Exception as exc:  # a worker's failure is its own
            return ImagebuildError(f"{w.name}: {type(exc).__name__}: {exc}")

    if not workers:
        return {}
    with ThreadPoolExecutor(max_workers=len(workers)) as pool:
        return dict(zip([w.name for w in workers], pool.map(one, workers), strict=True))


def _held(holders: tuple[ContainerInfo, ...] | list[ContainerInfo], name: str,
          image_id: str) -> set[str]:
    """The tags of ``name`` that running holders keep on ``image_id``."""
    return {h.labels.get(ROOT_TAG_LABEL, "") for h in holders
            if h.labels.get(ROOT_LABEL) == name and h.running and h.image_id == image_id}


# -- status ----------------------------------------------------------------------------------


def worker_image(name: str, head_latest: ImageInfo | None,
                 snap: Snapshot | ImagebuildError) -> WorkerImage:
    """What a worker holds of ``name``, judged by content (pure)."""
    if isinstance(snap, ImagebuildError):
        return "unreachable"
    if head_latest is None:
        return "no head image"
    theirs = next((i for i in snap.images if latest_tag(name) in i.tags), None)
    if theirs is None:
        same = next((i for i in snap.images if i.fingerprint == head_latest.fingerprint),
                    None)
        return "unrooted" if same is not None else "missing"
    if theirs.fingerprint != head_latest.fingerprint:
        return "stale"
    return "up to date" if LATEST in _held(snap.holders, name, theirs.id) else "unrooted"


def _other_id(name: str, head_latest: ImageInfo | None,
              snap: Snapshot | ImagebuildError) -> bool:
    """Whether the worker's ``latest`` is the head's content under another image ID."""
    if isinstance(snap, ImagebuildError) or head_latest is None:
        return False
    theirs = next((i for i in snap.images if latest_tag(name) in i.tags), None)
    return (theirs is not None and theirs.fingerprint == head_latest.fingerprint
            and theirs.id != head_latest.id)


@dataclass(frozen=True)
class BackupStatus:
    where: str | None  # the current tar, None: no backup
    size: int = 0
    generations: int = 0  # older generations kept beside it
    written: str = ""  # when it was written (and hashed)
    matches_latest: bool = False  # it holds exactly the head's latest
    checked: str = ""  # when its bytes were last checked against the sidecar
    check_ok: bool | None = None  # that check's result (None: never checked)


@dataclass(frozen=True)
class ImageStatus:
    name: str
    derivation: str | None  # hash12 of the spec's current derivation; None: unresolved
    built: bool  # that derivation is on the head
    latest: str | None  # short ID of NAME:latest on the head
    latest_hash: str | None  # hash12 it was built from
    verified_at: str | None  # its passing record against the current checks
    checks: tuple[str, ...]
    rooted: bool  # head holders keep latest and its hash tag
    hash_tag_present: bool  # NAME:<hash12> still tags it (docker prune -a strips it)
    backup: BackupStatus
    workers: dict[str, WorkerImage] = field(default_factory=dict)
    # workers whose latest has the head's content under another image ID (a worker on
    # the other image store): a launcher that compares image IDs across nodes refuses it
    other_id: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StatusReport:
    images: list[ImageStatus]
    unreachable: dict[str, str]  # worker -> why
    seconds: float
    mirrors: list[MirrorState] = field(default_factory=list)  # with --check-backups
    wheels: WheelStoreState | None = None  # the wheel store (None: the spec has none)

    def to_json(self) -> dict[str, object]:
        return {"images": [asdict(i) for i in self.images],
                "unreachable": self.unreachable, "seconds": round(self.seconds, 3),
                "mirrors": [asdict(m) for m in self.mirrors],
                "wheels": asdict(self.wheels) if self.wheels is not None else None}


def _read_checks(ctx: Context) -> dict[str, dict[str, object]]:
    path = ctx.spec.state_dir / "backup-checks.json"
    try:
        data = loads_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _backup_status(store: BackupDir | None, name: str, latest: ImageInfo | None,
                   checks: dict[str, dict[str, object]]) -> BackupStatus:
    if store is None:
        return BackupStatus(where=None)
    found = backups_of(store, name)
    if not found:
        return BackupStatus(where=None)
    current = found[0]
    where = f"{store}/{current.key}"
    rec = checks.get(where) or {}
    ok = rec.get("ok") if rec.get("image_id") == current.image_id else None
    return BackupStatus(
        where=where, size=current.size, generations=len(found) - 1, written=current.created,
        matches_latest=latest is not None and current.fingerprint == latest.fingerprint,
        checked=str(rec.get("checked_at") or "") if ok is not None else "",
        check_ok=bool(ok) if ok is not None else None)


def check_backups(ctx: Context, progress: Progress, images: list[str] | None = None
                  ) -> StoreCheck:
    """``backup --check``: hash every blob of the backup store where it lies and compare
    it with its name; each image's backups are marked ok or damaged in the state
    directory, for ``status`` to show. The whole store is checked: naming images is
    refused (before anything is read)."""
    if images:
        raise SpecError("backup --check checks the whole store; name no image",
                        hint="imagebuild backup --check")
    store = backup_store(ctx.spec)
    blobs = store.files(BLOBS)
    total = sum(st.size for st in blobs.values())
    progress.say(f"checking {len(blobs)} blobs in {store} ({total / 1e9:.2f} GB)")
    meter = progress.meter("checking blobs", total)
    result = check_store(store, store.sha256, meter.add, blobs)
    bad = {*result.damaged, *result.missing}
    results: dict[str, dict[str, object]] = {}
    for name in ctx.spec.images:
        for b in backups_of(store, name):
            ok = b.gen is not None and not (b.gen.blobs() & bad)
            if b.tar is not None:  # a tar from before the store: hashed whole
                ok = store.sha256(b.key) == b.tar.sha256
            results[f"{store}/{b.key}"] = {
                "image_id": b.image_id, "ok": ok,
                "checked_at": datetime.now(UTC).isoformat(timespec="seconds")}
    atomic_write_text(ctx.spec.state_dir / "backup-checks.json",
                      json.dumps(results, indent=2, sort_keys=True) + "\n")
    return result


@dataclass(frozen=True)
class MirrorChecks:
    """``backup --check --mirror``: each mirror's blobs hashed where they lie."""

    checks: list[tuple[str, StoreCheck | None, str | None]]  # (mirror, check, unreachable)

    def lines(self) -> list[str]:
        out = []
        for where, check, why in self.checks:
            out += ([f"{where}: {ln}" for ln in check.lines()] if check is not None
                    else [f"{where}: UNREACHABLE: {why}"])
        if any(c is not None and not c.ok for _w, c, _y in self.checks):
            out.append("the next 'imagebuild backup' sends the damaged and missing blobs "
                       "again and assembles the generations that use them anew")
        return out

    def error(self) -> ImagebuildError | None:
        bad = [w for w, c, why in self.checks if why is not None or (c and not c.ok)]
        if not bad:
            return None
        return MirrorError(f"mirror(s) {', '.join(bad)} damaged or unreachable; the "
                           f"backup store on this side is not affected",
                           hint="run 'imagebuild backup' to repair a reachable mirror")


def check_mirrors(ctx: Context, progress: Progress) -> MirrorChecks:
    """Hash every blob of each mirror on its own host (``sha256sum`` there) and record
    the damaged and missing ones, which the next copy to that mirror sends again."""
    stores = mirror_stores(ctx.spec)
    if not stores:
        raise SpecError(f"{ctx.spec.path}: backups.mirror names no mirror",
                        hint="add backups: {mirror: ssh://control-node/path}")
    out: list[tuple[str, StoreCheck | None, str | None]] = []
    for mirror in stores:
        try:
            blobs = mirror.files(BLOBS)
            total = sum(st.size for st in blobs.values())
            progress.say(f"checking {len(blobs)} blobs in {mirror} ({total / 1e9:.2f} GB)")
            check = check_store(mirror, mirror.sha256, None, blobs)
        except (ImagebuildError, OSError) as exc:
            out.append((str(mirror), None, reason(exc)))
            continue
        record_mirror_damage(ctx.spec, str(mirror), [*check.damaged, *check.missing])
        out.append((str(mirror), check, None))
    return MirrorChecks(out)


def status(ctx: Context, engine: Engine, workers: list[Worker], *,
           check: bool = False, progress: Progress | None = None) -> StatusReport:
    """One table's worth: each image's derivation, latest, record, roots and backup, and
    what every worker holds of it (by content; one ssh round trip per worker)."""
    progress = progress or Progress()
    started = time.monotonic()
    spec = ctx.spec
    store = backup_store(spec) if spec.backups is not None else None
    if check:
        check_backups(ctx, progress)
    checks = _read_checks(ctx)
    with ThreadPoolExecutor(max_workers=1) as pool:
        remote = pool.submit(_snapshots, workers)
        derivations = {d.name: d for d in plan_images(ctx, [])}
        holders = engine.holders(ROOT_LABEL)
        rows: list[ImageStatus] = []
        latest: dict[str, ImageInfo | None] = {}
        for name in spec.images:
            d = derivations[name]
            info = engine.inspect(latest_tag(name))
            latest[name] = info
            record = passing_record(spec, ctx.lock, name, info) if info else None
            h = input_hash(info) if info else None
            held = _held(holders, name, info.id) if info else set()
            rows.append(ImageStatus(
                name=name, derivation=d.hash12 if d.input_hash else None,
                built=bool(d.input_hash) and find_existing(engine, d) is not None,
                latest=short_id(info.id) if info else None,
                latest_hash=hash12(h) if h else None,
                verified_at=record.checked_at if record else None,
                checks=tuple(c.name for c in image_checks(spec, name, ctx.lock)),
                rooted=info is not None and {LATEST, hash12(h) if h else LATEST} <= held,
                hash_tag_present=info is not None and (
                    hash_tag(name, info) is None or hash_tag(name, info) in info.tags),
                backup=_backup_status(store, name, info, checks)))
        snaps = remote.result()
    for row in rows:
        row.workers.update({w: worker_image(row.name, latest[row.name], s)
                            for w, s in snaps.items()})
        row.other_id.extend(w for w, s in snaps.items()
                            if _other_id(row.name, latest[row.name], s))
    unreachable = {w: s.message for w, s in snaps.items() if isinstance(s, ImagebuildError)}
    mirrors = ([mirror_state(store, m) for m in mirror_stores(spec)]
               if check and store is not None else [])
    return StatusReport(rows, unreachable, time.monotonic() - started, mirrors,
                        store_state(ctx.spec, ctx.lock) if _has_wheel_store(ctx) else None)


def _has_wheel_store(ctx: Context) -> bool:
    """The spec builds wheels, or a wheel store is there (the spec built or fetched some)."""
    return bool(ctx.spec.built) or ctx.spec.wheel_store.exists()


# -- prune -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PruneItem:
    kind: Literal["tag", "image", "holder"]
    ref: str  # the tag, image ID or holder name removed
    size: int  # bytes it frees once shared layers are counted once (0 for a tag/holder)
    why: str


def _unique_sizes(doomed: list[ImageInfo], kept: list[ImageInfo]) -> dict[str, int]:
    """What removing each doomed image frees: its size less that of the largest image
    that stays (or is counted before it) whose layers are a prefix of its own. Pure."""
    out: dict[str, int] = {}
    counted: list[ImageInfo] = list(kept)
    for img in sorted(doomed, key=lambda i: len(i.diff_ids)):
        base = max((k.size for k in counted
                    if k.diff_ids and img.diff_ids[:len(k.diff_ids)] == k.diff_ids), default=0)
        out[img.id] = max(img.size - base, 0)
        counted.append(img)
    return out


def prune_plan(names: set[str], snap: Snapshot, keep: int) -> list[PruneItem]:
    """What ``imagebuild prune`` removes from one engine: its images of ``names`` that
    are neither a root nor ``latest``, and holders that are not (or no longer) roots.
    Pure; the roots are judged as ``root`` would leave them."""
    items: list[PruneItem] = []
    holders = list(snap.holders)
    for h in holders:
        owner = h.labels.get(ROOT_LABEL, "")
        if owner not in names:
            items.append(PruneItem("holder", h.name, 0,
                                   f"holds an image of {owner or '?'}, which the spec no "
                                   f"longer has"))
    keep_ids: set[str] = set()
    for name in names:
        latest = next((i for i in snap.images if latest_tag(name) in i.tags), None)
        if latest is None:
            continue
        keep_ids.add(latest.id)
        tags = {i.id: i.tags for i in snap.images}
        plan = plan_roots(name, latest, holders, keep, tags, refresh=False)
        for h in plan.remove:
            if (h.name, h.image_ref) not in plan.start and h.image_id != latest.id:
                items.append(PruneItem("holder", h.name, 0,
                                       f"an older generation of {name} than the {keep} kept"))
        dropped = {h.id for h in plan.remove}
        keep_ids |= {h.image_id for h in holders
                     if h.labels.get(ROOT_LABEL) == name and h.id not in dropped
                     and h.running}
    ours = [i for i in snap.images if i.labels.get(IMAGE_LABEL) in names]
    parents = {i.parent for i in snap.images if i.parent}
    doomed = [i for i in ours if i.id not in keep_ids and (i.tags or i.id not in parents)]
    kept = [i for i in snap.images if i.id in keep_ids]
    sizes = _unique_sizes(doomed, kept)
    for img in doomed:
        name = img.labels[IMAGE_LABEL]
        mine = [t for t in img.tags if split_ref(t)[0] == name]
        others = [t for t in img.tags if t not in mine]
        for t in mine:
            items.append(PruneItem("tag", t, 0 if others or t != mine[-1] else sizes[img.id],
                                   f"a generation of {name} that is not a root"))
        if not img.tags:
            items.append(PruneItem("image", img.id, sizes[img.id],
                                   f"an untagged (dangling) image of {name}"))
    return items


@dataclass(frozen=True)
class NodePrune:
    node: str
    items: list[PruneItem]
    reclaimed: int | None  # bytes, measured (None: a dry run)
    error: str = ""
    repaired: int = 0  # root holders restarted and tags put back first


@dataclass(frozen=True)
class PruneOutcome:
    nodes: list[NodePrune]
    dry_run: bool
    wheels: WheelStoreState | None = None  # the wheel store's removed (or removable) part

    def error(self) -> ImagebuildError | None:
        from .errors import RemoteError

        failed = [n for n in self.nodes if n.error]
        if not failed:
            return None
        return RemoteError("prune failed on " + ", ".join(n.node for n in failed) + ": "
                           + "; ".join(n.error for n in failed),
                           hint="the other nodes were pruned; run the same command again")


ALL_SPELLINGS = re.compile(r"^(-[A-Za-z]*a[A-Za-z]*|--all(=.*)?|--all-.*|--everything)\Z")


def refuse_all(args: list[str]) -> None:
    """``imagebuild prune -a`` (``--all``, ``-af`` ...) is refused: say why, and what to
    run instead."""
    spelled = next((a for a in args if ALL_SPELLINGS.match(a)), None)
    filters = [(["--filter"] if i and args[i - 1] == "--filter" else []) + [a]
               for i, a in enumerate(args) if "dangling=false" in a.replace(" ", "")]
    if spelled is None and not filters:
        return
    said = spelled or " ".join(filters[0])  # as typed: --filter dangling=false
    raise SpecError(
        f"imagebuild prune {said}: refused. 'prune -a' means 'remove every "
        f"image no container uses'. On the cluster that is how vllm-node-mimo was lost: "
        f"'docker image prune -a' deleted the idle image with nothing to restore it from.",
        hint="run 'imagebuild prune' (add --dry-run to see what goes): it removes only "
             "imagebuild's images that are neither a GC root nor latest, and never a "
             "backup. To drop a root, move latest (build or rollback) or lower "
             "backups.keep.")


def _prune_node(node: str, engine: Engine, names: list[str], keep: int,
                dry_run: bool) -> NodePrune:
    try:
        snap = engine.snapshot()
        repaired = 0
        if not dry_run:
            for name in names:  # put roots right first (restart holders, put tags back)
                latest = next((i for i in snap.images if latest_tag(name) in i.tags), None)
                if latest is not None:
                    plan = root(engine, name, latest, keep, refresh=False,
                                holders=[h for h in snap.holders
                                         if h.labels.get(ROOT_LABEL) == name])
                    repaired += len(plan.start) + len(plan.retag)
            snap = engine.snapshot()
        items = prune_plan(set(names), snap, keep)
        if dry_run:
            return NodePrune(node, items, None, repaired=repaired)
        before = engine.disk_usage()
        done: list[PruneItem] = []
        for item in sorted(items, key=lambda i: i.kind != "holder"):  # holders first
            try:
                if item.kind == "holder":
                    engine.remove_container(item.ref)
                else:
                    engine.remove_image(item.ref)
            except ImagebuildError as exc:
                if "conflict" not in exc.message:
                    raise
                continue  # in use after all (a parent of another image): it stays
            done.append(item)
        return NodePrune(node, done, max(before - engine.disk_usage(), 0),
                         repaired=repaired)
    except ImagebuildError as exc:
        return NodePrune(node, [], None, error=exc.message)


def prune(ctx: Context, engine: Engine, workers: list[Worker], *, dry_run: bool = False,
          progress: Progress | None = None) -> PruneOutcome:
    """Remove what is not a root, on the head and on ``workers`` (in parallel)."""
    progress = progress or Progress()
    names = list(ctx.spec.images)
    keep = ctx.gate.keep
    nodes = [("head", engine), *((w.name, w.engine) for w in workers)]
    progress.say(("would prune" if dry_run else "pruning") + " "
                 + ", ".join(n for n, _ in nodes))
    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        results = list(pool.map(lambda ne: _prune_node(ne[0], ne[1], names, keep, dry_run),
                                nodes))
    wheels = (prune_store(ctx.spec, ctx.lock, dry_run=dry_run)
              if _has_wheel_store(ctx) else None)
    return PruneOutcome(results, dry_run, wheels)


# -- rollback --------------------------------------------------------------------------------


_HASH12 = re.compile(rf"^[0-9a-f]{{{HASH12}}}\Z")


@dataclass(frozen=True)
class Generation:
    hash12: str
    where: Literal["engine", "backup"]
    image_id: str | None  # on the head (where == "engine")
    tar: str | None  # its backup's key in the store (where == "backup")


def generations_of(name: str, current: ImageInfo | None, holders: list[ContainerInfo],
                   backups: list[Backup]) -> list[Generation]:
    """Older generations of ``name`` a rollback can go to, newest first: the rooted
    ones on the head, then those only in backups. Pure."""
    now = hash12(input_hash(current) or "") if current else ""
    seen: set[str] = {now}
    out: list[Generation] = []
    for h in sorted(holders, key=lambda h: h.created, reverse=True):
        tag = h.labels.get(ROOT_TAG_LABEL, "")
        if h.labels.get(ROOT_LABEL) == name and _HASH12.match(tag) and tag not in seen:
            seen.add(tag)
            out.append(Generation(tag, "engine", h.image_id, None))
    for b in backups:
        if b.input_hash and hash12(b.input_hash) not in seen:
            seen.add(hash12(b.input_hash))
            out.append(Generation(hash12(b.input_hash), "backup", None, b.key))
    return out


@dataclass(frozen=True)
class RollbackOutcome:
    name: str
    previous: str | None  # short ID latest pointed at
    generation: Generation
    promotion: Promotion
    restored: bool  # it came back from a backup
    distributed: object | None = None  # shipping.DistributeOutcome when --workers

    def error(self) -> ImagebuildError | None:
        if not self.promotion.passed:
            return VerifyFailed(f"{self.name} {self.generation.hash12} failed its checks: "
                                f"latest was not moved; do NOT distribute it")
        err = getattr(self.distributed, "error", None)
        return err() if callable(err) else None


def check_hash12(to: str | None) -> str | None:
    """``--to`` is the 12 hex digits of a generation's input hash (checked before any
    engine is contacted)."""
    if to is not None and not _HASH12.match(to):
        raise SpecError(f"--to {to!r}: expected the 12 hex digits of a generation's input "
                        f"hash (NAME:<hash12>)", hint="see 'imagebuild status'")
    return to


def rollback(ctx: Context, engine: Engine, name: str, to: str | None,
             workers: list[Worker] | None = None,
             progress: Progress | None = None) -> RollbackOutcome:
    """Move ``NAME:latest`` back to the previous generation (or ``to``), restoring it
    from its backup if the engine lost it; the gate applies; with ``workers`` they
    follow."""
    progress = progress or Progress()
    current = engine.inspect(latest_tag(name))
    store = backup_store(ctx.spec) if ctx.spec.backups is not None else None
    backups = backups_of(store, name) if store is not None else []
    gens = generations_of(name, current, engine.holders(f"{ROOT_LABEL}={name}"), backups)
    if to is not None:
        gens = [g for g in gens if g.hash12 == to]
    if not gens:
        known = ", ".join(g.hash12 for g in generations_of(
            name, current, engine.holders(f"{ROOT_LABEL}={name}"), backups)) or "none"
        raise ImageNotFound(f"{name}: no {'generation ' + to if to else 'older generation'} "
                            f"to roll back to (on this head or in its backups: {known})",
                            hint="imagebuild status shows the generations kept")
    gen = gens[0]
    image = engine.inspect(gen.image_id) if gen.image_id else None
    if image is None and gen.where == "engine":
        image = engine.inspect(f"{name}:{gen.hash12}")
    restored = False
    if image is None:
        source = gen.tar or next((b.key for b in backups
                                  if b.input_hash and hash12(b.input_hash) == gen.hash12),
                                 None)
        if store is None or source is None:
            raise ImageNotFound(f"{name}:{gen.hash12} is not on this head and not in a backup")
        progress.say(f"{name}: {gen.hash12} is not on this head; restoring it from "
                     f"{store}/{source}")
        image = restore_backup(engine, store, source, progress, expect_image=name).info
        restored = True
    progress.say(f"{name}: rolling back to {gen.hash12} ({short_id(image.id)})")
    promotion = promote(ctx.gate, engine, name, image, progress)
    outcome = RollbackOutcome(name, short_id(current.id) if current else None, gen,
                              promotion, restored)
    if not promotion.passed or not workers:
        return outcome
    req = request_for(ctx, [name], workers)
    return RollbackOutcome(name, outcome.previous, gen, promotion, restored,
                           distribute_op(ctx, engine, req, progress))
