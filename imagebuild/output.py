"""What the commands print: result lines, tables and JSON, from the workflows' typed
results. Pure: nothing here decides, reads a file or talks to an engine; ``cli.py``
prints what these return (``Shown``: lines for stdout and for stderr)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .adopt import AdoptOutcome
from .build import Action, Step
from .derivation import Derivation
from .distribute import Outcome
from .lifecycle import PruneOutcome, RollbackOutcome, StatusReport
from .lockflow import LockOutcome
from .mirror import MirrorResult
from .naming import hash12, input_hash, short_id
from .ops import (
    BackupOutcome,
    BuildOutcome,
    ExportOutcome,
    PlanOutcome,
    RestoreOutcome,
    VerifyOutcome,
)
from .promote import Promotion
from .render import RenderResult
from .shipping import DistributeOutcome
from .verify import VerifyRecord, table
from .wheelops import CheckOutcome, RefResolution, WheelPlan, WheelsOutcome, WheelStep
from .wheelstore import WheelStoreState


@dataclass
class Shown:
    """What a command prints: ``out`` on stdout, ``err`` on stderr, in order."""

    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)

    def extend(self, other: Shown) -> Shown:
        self.out += other.out
        self.err += other.err
        return self


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def json_text(data: object) -> str:
    return json.dumps(data, indent=2)


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows of cells as left-aligned columns."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return ["  ".join(cell.ljust(widths[c]) for c, cell in enumerate(r)).rstrip()
            for r in rows]


# -- render, lock, plan --------------------------------------------------------------------


def render_lines(result: RenderResult, check: bool, images: int) -> list[str]:
    head = [f"dockerfiles are up to date ({images} images)"] if check else []
    return [*head, *(f"wrote {rel(p)}" for p in result.written),
            *(f"unchanged {rel(p)}" for p in result.unchanged)]


def lock_shown(result: LockOutcome) -> Shown:
    shown = Shown(err=[f"warning: {w}" for w in result.warnings]
                  + [f"  {note}" for note in result.notes])

    def line(path: Path, state: str, what: str) -> str:
        shown_state = "is up to date" if state == "up to date" else state
        where = rel(path)
        return (f"{where} {shown_state} ({what})" if state != "written"
                else f"wrote {where} ({what})")

    shown.out.append(line(result.path, result.state,
                          f"{result.wheels} wheels, {result.unresolved} unresolved"))
    for c in result.closures:
        what = (f"{c.packages} distributions" if c.unresolved is None
                else f"unresolved: {c.unresolved}")
        shown.out.append(line(c.path, c.state, what))
        shown.out += [f"  {change}" for change in c.changed]
    if result.allowed_unresolved and (result.unresolved or result.unresolved_closures):
        shown.err.append(f"WARNING: --allow-unresolved: {result.unresolved} wheel hash(es) "
                         f"and {result.unresolved_closures} image closure(s) are unresolved; "
                         f"no image can be built from these locks until someone locks them "
                         f"where the wheels are")
    return shown


PENDING = ("the image plan follows once the wheels above are built and locked: "
           "'imagebuild build' builds them, re-locks, then builds the images")


def plan_row(d: Derivation) -> dict[str, object]:
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


def wheel_row(s: WheelStep) -> dict[str, object]:
    d = s.derivation
    return {"name": d.name, "input_hash": d.input_hash, "action": s.action,
            "commit": d.build.commit, "patches": [name for name, _sha in d.patches],
            "builder": d.build.builder_reference, "locked": s.locked,
            "filename": s.record.filename if s.record else None,
            "sha256": s.record.sha256 if s.record else None}


def wheel_plan_lines(plan: WheelPlan, what: str) -> list[str]:
    """The wheel steps (nothing when no wheel is built from source), and what a pending
    lock means for the image plan."""
    out: list[str] = []
    if plan.steps:
        width = max(len(s.derivation.name) for s in plan.steps)
        out.append(f"wheels built from source ({len(plan.steps)}{what}):")
        for i, s in enumerate(plan.steps, 1):
            d = s.derivation
            action = f"reuse {s.record.filename}" if s.record else (
                f"build from {d.build.commit[:12]}"
                + (f" + {len(d.patches)} patch(es)" if d.patches else ""))
            lock = "" if s.locked else "  (not in wheels.lock yet)"
            out.append(f"  {i}. {d.name:<{width}}  {d.hash12}  {action}{lock}")
    if plan.pending:
        out.append(PENDING)
    return out


def plan_json(p: PlanOutcome) -> str:
    wheels = [wheel_row(w) for w in p.wheels.steps]
    if p.derivations is None:
        return json_text({"spec": str(p.spec.path), "wheels": wheels, "images": None,
                          "pending": PENDING})
    return json_text({"spec": str(p.spec.path), "wheels": wheels,
                      "images": [{**plan_row(d), "lock_changes": p.lock_changes.get(d.name, [])}
                                 for d in p.derivations]})


def plan_lines(p: PlanOutcome) -> list[str]:
    out = wheel_plan_lines(p.wheels, "")
    if p.derivations is None:
        return out
    derivations, changes = p.derivations, p.lock_changes
    width = max(len(d.name) for d in derivations)
    out.append(f"plan ({len(derivations)} images, in build order):")
    for i, d in enumerate(derivations, 1):
        h = hash12(d.input_hash) if d.input_hash else "unresolved  "
        origin = f"FROM {d.parent}" if d.parent else f"FROM {d.base}"
        out.append(f"  {i}. {d.name:<{width}}  {h}  {origin}")
        if d.layers:
            groups = [f"{g} {len(names)}" for g, names in d.layers if names]
            out.append(f"     {'':<{width}}  installs: " + (", ".join(groups) if groups else
                       f"nothing ({d.parent} has all of its closure)"))
        if d.name in changes:
            out.append(f"     {'':<{width}}  rebuilds (lock changed since the last commit): "
                       f"{', '.join(changes[d.name])}")
    missing = sorted({f for d in derivations for f in d.unresolved})
    if missing:
        files = [m for m in missing if m.endswith("(declared file, not found)")]
        locked = [m for m in missing if m not in files]
        if locked:
            out += [f"\n{len(locked)} input(s) unresolved in the locks "
                    f"({rel(p.spec.lock_path)}, locks/): {', '.join(locked)}",
                    "run 'imagebuild lock' where the wheels are, then plan again"]
        if files:
            out += [f"\n{len(files)} declared file(s) missing: {', '.join(files)}",
                    "put them in place (see the image's files: in the spec), then plan again"]
    return out


# -- wheels, build, verify -------------------------------------------------------------------


def wheels_lines(result: WheelsOutcome) -> list[str]:
    out = [f"{o.record.name}: {'built' if o.built else 'reused'} {o.record.filename} "
           f"(derivation {o.derivation.hash12}, sha256 {o.record.sha256[:16]})"
           for o in result.wheels]
    if result.unlocked:
        out.append(f"wheels.lock does not record {', '.join(result.unlocked)} yet: run "
                   f"'imagebuild lock' and commit the locks")
    return out


def resolve_lines(resolved: list[RefResolution]) -> list[str]:
    out = [f"{r.name}: {r.ref} is {r.new}" + (f" (was {r.old})" if r.changed else
                                               " (the spec has it already)")
           for r in resolved]
    changed = [r.name for r in resolved if r.changed]
    if changed:
        out.append(f"wrote the spec: build them with 'imagebuild build-wheels "
                   f"{' '.join(changed)}' (or 'imagebuild build'), then commit the spec "
                   f"and the locks")
    return out


def wheel_check_lines(checked: CheckOutcome) -> list[str]:
    return [f"{a.name}: {'reproducible' if a.sha256 == b.sha256 else 'DIFFERS'}: stored "
            f"{a.sha256[:16]}, rebuilt {b.sha256[:16]} ({b.filename})"
            for a, b in checked.pairs]


def steps_table(steps: list[Step]) -> list[str]:
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


def build_shown(result: BuildOutcome, dry_run: bool) -> Shown:
    shown = Shown()
    if dry_run and result.wheels is not None:
        shown.out += wheel_plan_lines(result.wheels, "; nothing will be done")
    if result.relocked is not None:
        shown.extend(lock_shown(result.relocked))
        shown.out.append("the locks now record the wheels built from source: commit them")
    if result.report is None:
        if result.steps:
            shown.out.append(f"build plan ({len(result.steps)} images, in order; nothing "
                             f"will be done):")
            shown.out += steps_table(result.steps)
        return shown
    report, moved = result.report, result.latest_moved
    shown.out.append(f"built {len(report.built)}, restored {len(report.restored)}, "
                     f"reused {len(report.reused)}"
                     + (f"; latest moved: {', '.join(moved)}" if moved else ""))
    for name, info in report.images.items():
        mark = "FAILED its checks" if name == result.gate_failed else "verified"
        h = input_hash(info)
        shown.out.append(f"  {name}:{hash12(h) if h else '-'} ({short_id(info.id)}) {mark}")
    shown.out += mirror_lines(result.mirrors)
    failed = result.gate_failed
    if failed is not None and (record := result.promotions[failed].record) is not None:
        shown.err.append(table([record]))
    return shown


def verify_lines(result: VerifyOutcome) -> list[str]:
    out = [table([v.record for v in result.checked])]
    if result.error() is None:
        out.append(f"\nall checks passed: {', '.join(v.name for v in result.checked)}")
    return out


# -- backup, restore, distribute -------------------------------------------------------------


def backup_lines(result: BackupOutcome) -> list[str]:
    out = []
    for name, r in result.results:
        state = (f"written ({r.bytes_written / 1e9:.2f} GB new of {r.backup.size / 1e9:.2f} "
                 f"GB, {r.seconds:.1f}s)" if r.written
                 else f"up to date ({r.backup.size / 1e9:.2f} GB)")
        out.append(f"{name}: {r.where} {state}")
        out += [f"{name}: imported {tar} into the layer store" for tar in r.imported]
        if r.dropped:
            out.append(f"{name}: dropped older generations {', '.join(r.dropped)}")
    out.append(f"backups in {result.store}")
    return out + mirror_lines(result.mirrors)


def mirror_lines(mirrors: list[MirrorResult]) -> list[str]:
    out = []
    for m in mirrors:
        if m.error:
            out.append(f"mirror {m.where}: NOT up to date: {m.error}")
            continue
        out.append(f"mirror {m.where}: up to date ({m.blobs_sent} blob(s), "
                   f"{m.bytes_sent / 1e6:,.1f} MB sent, {len(m.generations)} generation(s) "
                   f"put in place" + (f", {len(m.dropped)} pruned" if m.dropped else "")
                   + f", {m.seconds:.1f}s)")
    return out


def restore_lines(result: RestoreOutcome) -> list[str]:
    out = []
    for r in result.restored:
        name, info = r.result.name, r.result.info
        out.append(f"{name}: loaded {short_id(info.id)} in {r.result.seconds:.1f}s"
                   if r.result.loaded else
                   f"{name}: already present ({short_id(info.id)}); nothing loaded")
        if r.promotion.passed:
            out.append(f"{name}: verified; {name}:latest -> {short_id(info.id)}")
        elif r.promotion.record is not None:
            out.append(table([r.promotion.record]))
    return out


def adopt_lines(result: AdoptOutcome) -> list[str]:
    p = result.promotion
    name = result.name
    if not p.passed:
        out = [f"{name}: {result.source} ({short_id(result.adopted.id)}) NOT adopted: its "
               f"checks failed; latest unmoved, nothing recorded"]
        return out + ([table([p.record])] if p.record is not None else [])
    assert result.image is not None
    out = [f"{name}: adopted {result.source} ({short_id(result.adopted.id)}) as generation "
           f"{hash12(input_hash(result.image) or '')} ({short_id(result.image.id)}), "
           f"verified; {name}:latest -> {short_id(result.image.id)}"]
    if result.backup is not None:
        out.append(f"{name}: backup {result.backup.where}")
    return out


def export_lines(result: ExportOutcome) -> list[str]:
    out = []
    for r in result.results:
        rate = r.size / 1e6 / max(r.seconds, 1e-6)
        out.append(f"{r.image}: generation {r.generation} -> {r.path} ({gb(r.size)} in "
                   f"{r.seconds:.1f}s, {rate:,.0f} MB/s), sha256 {r.sha256[:12]}, sidecar "
                   f"{r.path.name}.json")
    out += [f"{n}: no backup in {result.store}; not exported" for n in result.without_backup]
    if result.results:
        out.append("load one with plain 'docker load -i FILE' on any node, or checked "
                   "against its sidecar with 'imagebuild restore-from-tar --file FILE'")
    return out


def outcome_json(o: Outcome) -> dict[str, object]:
    return {**asdict(o), "seconds": round(o.seconds, 3), "mb_per_s": round(o.mb_per_s, 1)}


def outcome_line(o: Outcome, dry_run: bool) -> str:
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


def distribute_json(result: DistributeOutcome) -> str:
    up = result.upload
    return json_text({"ok": result.ok, "dry_run": result.dry_run, "via": result.via,
                      "why": result.why, "upload": None if up is None else up.to_json(),
                      "outcomes": [outcome_json(o) for o in result.outcomes]})


def distribute_lines(result: DistributeOutcome) -> list[str]:
    up = result.upload
    return [f"via {result.via} ({result.why})", *(up.lines() if up else []),
            *(outcome_line(o, result.dry_run) for o in result.outcomes)]


# -- status, prune, rollback -----------------------------------------------------------------


def status_shown(report: StatusReport, workers: list[str]) -> Shown:
    rows = [["image", "derivation", "latest", "verified", "rooted", "backup", *workers]]
    for i in report.images:
        derivation = (i.derivation or "unresolved") + ("" if i.built else " (not built)")
        latest = (f"{i.latest} ({i.latest_hash})" if i.latest else "-")
        verified = f"{i.verified_at} ({len(i.checks)} checks)" if i.verified_at else "NO"
        rooted = ("yes" if i.rooted else "NO") + ("" if i.hash_tag_present
                                                  else ", hash tag stripped")
        b = i.backup
        backup = "none" if b.where is None else (
            f"{b.where} {gb(b.size)}, +{b.generations} older"
            + ("" if b.matches_latest else ", not of latest")
            + ("" if b.check_ok is None else
               f", checked {b.checked} {'ok' if b.check_ok else 'CORRUPT'}"))
        rows.append([i.name, derivation, latest, verified, rooted, backup,
                     *(i.workers.get(w, "-") + ("*" if w in i.other_id else "")
                       for w in workers)])
    out = aligned(rows)
    out += [f"{w}: unreachable: {why}" for w, why in report.unreachable.items()]
    out += [f"mirror {m.where}: {m.state}" for m in report.mirrors]
    out += wheel_store_lines(report.wheels)
    if any(i.other_id for i in report.images):
        out.append("* the head's content under another image ID (that worker uses the "
                   "other image store): a launcher that compares image IDs across nodes "
                   "refuses it; compare by content, or keep one image store on every node")
    if any(not i.hash_tag_present or not i.rooted for i in report.images if i.latest):
        out.append("a root is missing or a tag was stripped (docker image prune -a keeps one "
                   "tag of an image in use): 'imagebuild prune' puts roots and tags back")
    return Shown(out, [f"({report.seconds:.1f}s)"])


def wheel_store_lines(state: WheelStoreState | None) -> list[str]:
    if state is None:
        return []
    out = [f"wheel store {state.root}: {len(state.wheels)} wheel(s), {gb(state.size)}: "
           f"{state.count('locked')} locked, {state.count('built, not locked')} built but "
           f"not locked, {len(state.unreferenced)} referred to by nothing"]
    out += [f"  {w.filename} ({w.sha256[:12]}, {gb(w.size)}): {w.use}" for w in state.wheels]
    if state.unreferenced or state.leftovers:
        out.append(f"  'imagebuild prune' removes the {len(state.unreferenced)} wheel(s) "
                   f"nothing refers to ({gb(sum(w.size for w in state.unreferenced))})"
                   + (f" and {len(state.leftovers)} unfinished build(s)"
                      if state.leftovers else ""))
    return out


def prune_lines(result: PruneOutcome) -> list[str]:
    out = []
    for node in result.nodes:
        if node.error:
            out.append(f"{node.node}: FAILED: {node.error}")
            continue
        if node.repaired:
            out.append(f"{node.node}: put back {node.repaired} root holder(s) or tag(s) "
                       f"first")
        for item in node.items:
            size = f" {gb(item.size)}" if item.size else ""
            out.append(f"{node.node}: {'would remove' if result.dry_run else 'removed'} "
                       f"{item.kind} {item.ref}{size} ({item.why})")
        total = sum(i.size for i in node.items)
        out.append(f"{node.node}: {len(node.items)} item(s), about {gb(total)} to reclaim"
                   if result.dry_run else
                   f"{node.node}: {len(node.items)} item(s) removed, "
                   f"{gb(node.reclaimed or 0)} reclaimed")
    w = result.wheels
    if w is not None:
        verb = "would remove" if result.dry_run else "removed"
        out += [f"wheel store: {verb} {x.filename} ({x.sha256[:12]}, {gb(x.size)}): no lock "
                f"or current derivation refers to it" for x in w.wheels]
        out += [f"wheel store: {verb} {p} (a build that never finished)" for p in w.leftovers]
        out.append(f"wheel store: {len(w.wheels)} wheel(s) {verb}, {gb(w.size)}")
    return out


def rollback_lines(name: str, result: RollbackOutcome) -> list[str]:
    out = []
    p = result.promotion
    if p.passed:
        out.append(f"{name}: latest {result.previous or '-'} -> {short_id(p.image.id)} "
                   f"(generation {result.generation.hash12}"
                   + (", restored from its backup" if result.restored else "") + ")")
    elif p.record is not None:
        out.append(table([p.record]))
    if isinstance(result.distributed, DistributeOutcome):
        out += [outcome_line(o, False) for o in result.distributed.outcomes]
    return out


# -- --json: one document per command, a stable shape (README, "Machine-readable output") --


def _check_rows(record: VerifyRecord | None) -> list[dict[str, object]]:
    return [{"check": r.check, "kind": r.kind, "expected": r.expected, "got": r.got,
             "passed": r.passed, "hint": r.hint} for r in (record.results if record else ())]


def _checks_json(record: VerifyRecord) -> dict[str, object]:
    return {"image": record.image, "image_id": record.image_id, "passed": record.passed,
            "checked_at": record.checked_at, "checks": _check_rows(record)}


def _mirrors_json(mirrors: list[MirrorResult]) -> list[dict[str, object]]:
    return [{"where": m.where, "ok": not m.error, "error": m.error or None} for m in mirrors]


def verify_json(result: VerifyOutcome) -> str:
    return json_text({"ok": result.error() is None,
                      "images": [_checks_json(v.record) for v in result.checked]})


def lock_json(result: LockOutcome) -> str:
    return json_text({
        "ok": True, "state": result.state, "path": str(result.path), "wheels": result.wheels,
        "unresolved": result.unresolved, "allowed_unresolved": result.allowed_unresolved,
        "notes": list(result.notes), "warnings": list(result.warnings),
        "closures": [{"image": c.image, "path": str(c.path), "state": c.state,
                      "packages": c.packages, "unresolved": c.unresolved,
                      "changed": list(c.changed)} for c in result.closures]})


def build_json(result: BuildOutcome, dry_run: bool) -> str:
    report = result.report
    images = []
    for step in result.steps:
        d = step.derivation
        info = report.images.get(d.name) if report is not None else None
        promotion = result.promotions.get(d.name)
        backup = result.backups.get(d.name)
        images.append({
            "name": d.name, "input_hash": d.input_hash, "planned": step.action.value,
            "done": (None if report is None else "built" if d.name in report.built
                     else "restored" if d.name in report.restored
                     else "reused" if d.name in report.reused else "not reached"),
            "image_id": info.id if info is not None else None,
            "verified": promotion.passed if promotion is not None else None,
            "latest_moved": bool(promotion and promotion.moved),
            "backup": None if backup is None else {
                "where": backup.where, "written": backup.written,
                "bytes_written": backup.bytes_written}})
    return json_text({
        "ok": result.error() is None, "dry_run": dry_run,
        "wheels": [wheel_row(w) for w in result.wheels.steps] if result.wheels else [],
        "relocked": result.relocked is not None,
        "images": images,
        "mirrors": _mirrors_json(result.mirrors)})


def prune_json(result: PruneOutcome) -> str:
    w = result.wheels
    return json_text({
        "ok": result.error() is None, "dry_run": result.dry_run,
        "nodes": [{"node": n.node, "error": n.error or None, "repaired": n.repaired,
                   "reclaimed": n.reclaimed,
                   "items": [{"kind": i.kind, "ref": i.ref, "size": i.size, "why": i.why}
                             for i in n.items]} for n in result.nodes],
        "wheel_store": None if w is None else {
            "wheels": [{"filename": x.filename, "sha256": x.sha256, "size": x.size}
                       for x in w.wheels],
            "unfinished_builds": list(w.leftovers)}})


def backup_json(result: BackupOutcome) -> str:
    return json_text({
        "ok": result.error() is None, "store": result.store,
        "images": [{"name": name, "where": r.where, "written": r.written,
                    "bytes_written": r.bytes_written, "size": r.backup.size,
                    "imported": list(r.imported), "dropped": list(r.dropped)}
                   for name, r in result.results],
        "mirrors": _mirrors_json(result.mirrors)})


def _promotion_json(p: Promotion) -> dict[str, object]:
    return {"image_id": p.image.id, "verified": p.passed, "latest_moved": p.moved,
            "checks": _check_rows(p.record)}


def restore_json(result: RestoreOutcome) -> str:
    return json_text({
        "ok": result.error() is None,
        "images": [{"name": r.result.name, "loaded": r.result.loaded,
                    "seconds": round(r.result.seconds, 3), **_promotion_json(r.promotion)}
                   for r in result.restored]})


def rollback_json(name: str, result: RollbackOutcome) -> str:
    d = result.distributed
    return json_text({
        "ok": result.error() is None, "name": name, "previous": result.previous,
        "generation": result.generation.hash12, "from": result.generation.where,
        "restored": result.restored, **_promotion_json(result.promotion),
        "distributed": (json.loads(distribute_json(d)) if isinstance(d, DistributeOutcome)
                        else None)})


def export_json(result: ExportOutcome) -> str:
    return json_text({
        "ok": True, "store": result.store, "without_backup": list(result.without_backup),
        "images": [{"name": r.image, "path": str(r.path), "generation": r.generation,
                    "size": r.size, "sha256": r.sha256} for r in result.results]})


def adopt_json(result: AdoptOutcome) -> str:
    return json_text({
        "ok": result.error() is None, "name": result.name, "source": result.source,
        "adopted_id": result.adopted.id, **_promotion_json(result.promotion),
        "generation": (hash12(input_hash(result.image) or "") if result.image is not None
                       else None),
        "backup": None if result.backup is None else {
            "where": result.backup.where, "written": result.backup.written}})
