"""The workflows (build, promote, backup, restore, distribute) against the in-memory
engine: no daemon. The integration tier runs the same paths on real engines."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from imagebuild import context, lifecycle, lockflow, ops, output, shipping
from imagebuild.backup import (
    backups_of,
    export_backup,
    restore_backup,
    write_backup,
)
from imagebuild.build import Action, decide, execute
from imagebuild.distribute import Worker
from imagebuild.engine import RunResult
from imagebuild.errors import (
    BackupError,
    ImageNotFound,
    LockError,
    NotVerified,
    RemoteError,
    SpecError,
    VerifyFailed,
)
from imagebuild.image import ImageInfo
from imagebuild.layerstore import BLOBS, list_generations
from imagebuild.naming import ADOPTED_LABEL, hash12, hash_tag, input_hash, latest_tag
from imagebuild.progress import Progress, Quiet
from imagebuild.promote import promote
from imagebuild.store import LocalDir
from imagebuild.verify import image_checks, passing_record

from ..fake_engine import FakeEngine, ok
from .conftest import SPEC, Stack

NAMES = ["vllm-node", "vllm-node-tf5", "vllm-node-mimo"]
GOOD = "2.11.0+cu130 13.0"
CPU = "2.10.0+cpu None"
WITH_BACKUPS = SPEC + """\
backups:
  directory: backups
  keep: 2
cluster:
  workers:
    - {name: w1, address: 10.0.0.1}
    - {name: w2, address: 10.0.0.2}
"""


def torch_prints(text: str):  # type: ignore[no-untyped-def]
    def respond(image: ImageInfo, cmd: list[str]) -> RunResult:
        return ok(text)
    return respond


def damage(store: LocalDir, name: str, layer: int, at: int | None = None) -> Path:
    """Flip one bit of a layer blob of ``name``'s newest generation in ``store`` (at byte
    ``at``, the middle by default); returns the blob."""
    gen = backups_of(store, name)[0].gen
    assert gen is not None
    blob = store.directory / BLOBS / str(gen.files[gen.layer_files[layer]][0])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 1
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    return blob


def lose(e: FakeEngine, image_id: str) -> None:
    """The image is gone, holders and all (as after docker rm -f and docker rmi)."""
    for c in [c for c in e.containers.values() if c.image_id == image_id]:
        e.remove_container(c.id)
    e.remove_image(image_id)


def head(**kw: object) -> FakeEngine:
    e = FakeEngine(name="head", responder=torch_prints(GOOD), **kw)  # type: ignore[arg-type]
    e.add_base("example/base:1", [b"debian" * 4000, b"cuda" * 8000])
    return e


@pytest.fixture
def ctx(stack: Stack) -> context.Context:
    stack.write_spec(WITH_BACKUPS)
    return context.load(str(stack.spec_path))


def _touch_template(stack: Stack, name: str, text: str) -> None:
    tpl = stack.root / "templates" / f"{name}.Dockerfile.j2"
    tpl.write_text(tpl.read_text() + f"# {text}\n")


# -- build and promote ---------------------------------------------------------------------------


def test_build_realizes_the_closure_gates_it_and_then_reuses_it(ctx: context.Context) -> None:
    e = head()
    result = ops.build_images(ctx, e, ["mimo"], progress=Quiet())
    assert result.error() is None
    assert e.builds == NAMES and result.latest_moved == NAMES
    report = result.report
    assert report is not None and report.built == NAMES
    node, tf5, mimo = (report.images[n] for n in NAMES)
    assert tf5.diff_ids[:len(node.diff_ids)] == node.diff_ids  # built FROM its parent
    assert mimo.diff_ids[:len(tf5.diff_ids)] == tf5.diff_ids
    for name in NAMES:
        info = report.images[name]
        assert e.require(latest_tag(name)).id == info.id
        assert hash_tag(name, info) in e.require(info.id).tags
    # the spec's checks, then the automatic closure check of each image: what every
    # image installed is exactly its lock
    listing = image_checks(ctx.spec, "vllm-node", ctx.lock)[-1].run
    assert e.checks_run == [(node.id, tuple(ctx.spec.checks["torch-gate"].run)),
                            (node.id, listing), (tf5.id, listing), (mimo.id, listing)]
    records = {r.image: r for r in (p.record for p in result.promotions.values()) if r}
    assert [r.got for r in records["vllm-node-mimo"].results] == [
        "all 6 installed as locked"]
    assert sorted(result.backups) == sorted(NAMES)
    store = LocalDir(ctx.spec.root / "backups")
    assert all(backups_of(store, n)[0].gen is not None for n in NAMES)
    # the three were saved in one call (node's layers come once), parents first
    assert e.saves == [tuple(hash_tag(n, e.require(f"{n}:latest")) for n in NAMES)]
    written = [result.backups[n].bytes_written for n in NAMES]
    assert written[0] > written[1] > 0 and written[2] > 0  # each new blob counted once
    again = ops.build_images(ctx, e, ["mimo"], progress=Quiet())
    assert e.builds == NAMES  # no build call the second time
    assert again.report is not None and again.report.reused == NAMES
    assert again.latest_moved == [] and len(e.checks_run) == 4  # the record was reused
    assert all(not b.written for b in again.backups.values())


def test_dry_run_and_rebuild(ctx: context.Context) -> None:
    e = head()
    dry = ops.build_images(ctx, e, ["tf5"], dry_run=True, progress=Quiet())
    assert dry.report is None and [s.action for s in dry.steps] == [Action.BUILD] * 2
    assert e.builds == [] and e.inspect("vllm-node:latest") is None
    ops.build_images(ctx, e, ["tf5"], progress=Quiet())
    ops.build_images(ctx, e, ["tf5"], rebuild=True, progress=Quiet())
    assert e.builds == ["vllm-node", "vllm-node-tf5", "vllm-node-tf5"]


def test_a_failing_gate_stops_the_chain_and_latest_stays(stack: Stack,
                                                        ctx: context.Context) -> None:
    e = head()
    ops.build_images(ctx, e, ["mimo"], progress=Quiet())
    good = e.require("vllm-node:latest").id
    _touch_template(stack, "vllm-node", "a new derivation")
    e.responder = torch_prints(CPU)
    ctx = context.load(str(stack.spec_path))
    result = ops.build_images(ctx, e, ["mimo"], progress=Quiet())
    assert result.gate_failed == "vllm-node" and result.latest_moved == []
    assert e.builds == [*NAMES, "vllm-node"]  # tf5 and mimo were not built on top of it
    assert e.require("vllm-node:latest").id == good
    err = result.error()
    assert isinstance(err, VerifyFailed) and err.exit_code == 1
    assert "do NOT distribute" in err.message and "images after it were not built" in err.message
    bad = result.promotions["vllm-node"].image
    assert hash_tag("vllm-node", bad) in e.require(bad.id).tags  # kept for inspection
    assert "vllm-node" not in result.backups


def test_decide_restores_a_missing_derivation_from_its_backup(ctx: context.Context) -> None:
    e = head()
    first = ops.build_images(ctx, e, ["mimo"], progress=Quiet())
    assert first.report is not None
    mimo = first.report.images["vllm-node-mimo"]
    lose(e, mimo.id)
    store = LocalDir(ctx.spec.root / "backups")
    steps = decide(e, context.plan_images(ctx, ["mimo"]), set(), store)
    assert [s.action for s in steps] == [Action.REUSE, Action.REUSE, Action.RESTORE]
    h12 = hash_tag("vllm-node-mimo", mimo).split(":")[1]  # type: ignore[union-attr]
    assert steps[2].substitute == f"images/vllm-node-mimo/{h12}"
    again = ops.build_images(ctx, e, ["mimo"], progress=Quiet())
    assert again.report is not None and again.report.restored == ["vllm-node-mimo"]
    assert e.require("vllm-node-mimo:latest").id == mimo.id and e.builds == NAMES


def test_execute_alone_never_moves_latest(ctx: context.Context) -> None:
    e = head()
    steps = decide(e, context.plan_images(ctx, ["tf5"]), set())
    report = execute(ctx.spec, e, steps, progress=Quiet(), after_each=lambda s, i: False)
    assert report.built == ["vllm-node"] and report.stopped_after == "vllm-node"
    assert e.inspect("vllm-node:latest") is None


def test_promote_reuses_a_record_and_moves_latest_only_when_it_passes(
        ctx: context.Context) -> None:
    e = head()
    ops.build_images(ctx, e, ["node"], backup=False, progress=Quiet())
    image = e.require("vllm-node:latest")
    runs = len(e.checks_run)
    again = promote(ctx.gate, e, "vllm-node", image, Quiet())
    assert again.passed and not again.verified_now and not again.moved
    assert len(e.checks_run) == runs
    # a new image that fails: the checks run, latest stays
    e.responder = torch_prints(CPU)
    other = e.add_base("example/other:1", [b"other"])
    failed = promote(ctx.gate, e, "vllm-node", other, Quiet())
    assert failed.verified_now and not failed.passed and not failed.moved
    assert e.require("vllm-node:latest").id == image.id


def test_a_workers_copy_is_promoted_on_the_heads_record_of_the_same_content(
        ctx: context.Context) -> None:
    e = head()
    ops.build_images(ctx, e, ["node"], backup=False, progress=Quiet())
    image = e.require("vllm-node:latest")
    record = passing_record(ctx.spec, ctx.lock, "vllm-node", image)
    assert record is not None
    worker = FakeEngine(name="w1", store="containerd")
    worker.load(e.save(hash_tag("vllm-node", image) or ""))
    copy = worker.require(hash_tag("vllm-node", image) or "")
    assert copy.id != image.id and copy.fingerprint == image.fingerprint
    p = promote(ctx.gate, worker, "vllm-node", copy, Quiet(), evidence=record, run_checks=False)
    assert p.passed and p.moved and worker.checks_run == []
    assert worker.require("vllm-node:latest").id == copy.id
    # evidence of other content counts for nothing, and a worker never runs the checks
    other = FakeEngine(name="w2")
    base = other.add_base("example/base:1", [b"x"])
    p = promote(ctx.gate, other, "vllm-node", base, Quiet(), evidence=record, run_checks=False)
    assert not p.passed and not p.moved and other.checks_run == []
    assert other.inspect("vllm-node:latest") is None


# -- backups and restore -------------------------------------------------------------------------


def test_restore_checks_the_tar_loads_it_and_promotes_it(ctx: context.Context) -> None:
    e = head()
    ops.build_images(ctx, e, ["tf5"], progress=Quiet())
    tf5 = e.require("vllm-node-tf5:latest")
    lose(e, tf5.id)
    request = ops.restore_request(ctx, ["tf5"], None)
    result = ops.restore(ctx, e, request, Quiet())
    assert result.error() is None
    [r] = result.restored
    assert r.result.loaded and r.promotion.passed and r.promotion.moved
    assert e.require("vllm-node-tf5:latest").id == tf5.id
    assert hash_tag("vllm-node-tf5", tf5) in e.require(tf5.id).tags
    again = ops.restore(ctx, e, request, Quiet())
    assert not again.restored[0].result.loaded and e.loads == 1  # present: a no-op


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: (size, mtime)."""
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in root.rglob("*") if not p.is_dir()}


def _as_tar(ctx: context.Context, name: str, dest: Path) -> Path:
    """The current generation of ``name`` written out as a tar backup from before the
    layer store (``NAME.tar`` + its sidecar), as an older imagebuild wrote them (and as
    ``export`` writes them)."""
    store = LocalDir(ctx.spec.root / "backups")
    export_backup(store, backups_of(store, name)[0], dest, Quiet())
    return dest


def test_backup_check_names_the_damaged_blob_and_refuses_named_images(
        ctx: context.Context) -> None:
    from imagebuild import lifecycle

    e = head()
    ops.build_images(ctx, e, ["tf5"], progress=Quiet())
    with pytest.raises(SpecError, match="checks the whole store; name no image"):
        lifecycle.check_backups(ctx, Quiet(), images=["node"])
    check = lifecycle.check_backups(ctx, Quiet())
    assert check.ok and check.lines()[-1] == "every blob matches its digest"
    store = LocalDir(ctx.spec.root / "backups")
    gen = backups_of(store, "vllm-node")[0].gen
    assert gen is not None
    blob = store.directory / BLOBS / str(gen.files[gen.layer_files[0]][0])
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes() + b"x")
    check = lifecycle.check_backups(ctx, Quiet())
    err = check.error()
    assert err is not None and err.exit_code == 8
    [line] = [ln for ln in check.lines() if ln.startswith("DAMAGED")]
    assert blob.name[:12] in line and "vllm-node " in line and "vllm-node-tf5 " in line
    status = json.loads((ctx.spec.state_dir / "backup-checks.json").read_text())
    assert not any(r["ok"] for r in status.values())  # both generations use that blob


def test_a_damaged_layer_is_refused_and_nothing_is_loaded(ctx: context.Context) -> None:
    e = head()
    ops.build_images(ctx, e, ["node"], progress=Quiet())
    node = e.require("vllm-node:latest")
    damage(LocalDir(ctx.spec.root / "backups"), "vllm-node", 0)
    lose(e, node.id)
    with pytest.raises(BackupError, match=r"damaged.*nothing was loaded.*vllm-node "):
        ops.restore(ctx, e, ops.restore_request(ctx, ["node"], None), Quiet())
    assert e.inspect(node.id) is None


@pytest.mark.parametrize("swap", ["fifo", "symlink to /dev/zero"])
def test_a_generation_file_that_is_not_a_file_is_refused_at_once(
        ctx: context.Context, swap: str) -> None:
    """A FIFO in place of a layer would hold restore forever; manifest.json as a link to
    /dev/zero would fill memory: each is refused as not a regular file (exit 8), and
    nothing is loaded."""
    e = head()
    ops.build_images(ctx, e, ["node"], progress=Quiet())
    node = e.require("vllm-node:latest")
    store = LocalDir(ctx.spec.root / "backups")
    gen = backups_of(store, "vllm-node")[0].gen
    assert gen is not None
    where = store.directory / gen.key
    name = gen.layer_files[0] if swap == "fifo" else "manifest.json"
    (where / name).unlink()
    if swap == "fifo":
        os.mkfifo(where / name)
    else:
        os.symlink("/dev/zero", where / name)
    lose(e, node.id)
    with pytest.raises(BackupError) as info:
        ops.restore(ctx, e, ops.restore_request(ctx, ["node"], None), Quiet())
    assert info.value.exit_code == 8
    # its size (0) is not the recorded one: refused before a byte is read from it
    assert f"{name} is damaged" in info.value.message and "got 0 bytes" in info.value.message
    assert e.inspect(node.id) is None


def test_tar_backups_from_before_the_store_restore_and_are_imported(ctx: context.Context) -> None:
    e = head()
    ops.build_images(ctx, e, ["node"], progress=Quiet())
    node = e.require("vllm-node:latest")
    root = ctx.spec.root / "backups"
    _as_tar(ctx, "vllm-node", root / "vllm-node.tar")
    for p in [root / "images", root / "blobs"]:
        shutil.rmtree(p)
    store = LocalDir(root)
    [old] = backups_of(store, "vllm-node")
    assert old.tar is not None and old.gen is None
    lose(e, node.id)
    result = ops.restore(ctx, e, ops.restore_request(ctx, ["node"], None), Quiet())
    assert result.error() is None and e.require("vllm-node:latest").id == node.id
    [(_, r)] = ops.backup(ctx, e, ["node"], Quiet()).results
    assert r.written and r.imported == ("vllm-node.tar",)
    assert not (root / "vllm-node.tar").exists()
    assert not (root / "vllm-node.tar.json").exists()
    [now] = backups_of(store, "vllm-node")
    assert now.gen is not None and now.image_id == node.id


def test_export_writes_a_plain_tar_that_loads_anywhere_and_restores_checked(
        ctx: context.Context, tmp_path: Path) -> None:
    e = head()
    ops.build_images(ctx, e, ["tf5"], progress=Quiet())
    tf5 = e.require("vllm-node-tf5:latest")
    out = tmp_path / "out"
    out.mkdir()
    result = ops.export(ctx, ops.export_request(ctx, ["tf5"], every=False, output=str(out),
                                                generation=None), Quiet())
    [r] = result.results
    tar = out / "vllm-node-tf5.tar"
    assert r.path == tar and r.size == tar.stat().st_size
    assert r.sha256 == hashlib.sha256(tar.read_bytes()).hexdigest()
    assert sorted(os.listdir(out)) == ["vllm-node-tf5.tar", "vllm-node-tf5.tar.json"]
    # plain docker load, on either image store: the same content
    for store in ("classic", "containerd"):
        other = FakeEngine(name="other", store=store)
        with tar.open("rb") as f:
            other.load(iter(lambda: f.read(1 << 16), b""))
        assert [i.fingerprint for i in other.images.values()].count(tf5.fingerprint) == 1
    # restore-from-tar --file checks it against its sidecar, then the gate
    lose(e, tf5.id)
    done = ops.restore(ctx, e, ops.restore_request(ctx, [], str(tar)), Quiet())
    assert done.error() is None and e.require("vllm-node-tf5:latest").id == tf5.id
    # --all to a directory; one image to a file of another name
    every = ops.export(ctx, ops.export_request(ctx, [], every=True, output=str(out),
                                               generation=None), Quiet())
    assert [x.image for x in every.results] == ["vllm-node", "vllm-node-tf5"]
    assert every.without_backup == ["vllm-node-mimo"]  # never built: passed over, named
    one = tmp_path / "node-backup.tar"
    ops.export(ctx, ops.export_request(ctx, ["node"], every=False, output=str(one),
                                       generation=None), Quiet())
    assert one.is_file() and (tmp_path / "node-backup.tar.json").is_file()


def test_export_refuses_bad_arguments_and_leaves_nothing_when_a_blob_is_damaged(
        ctx: context.Context, tmp_path: Path) -> None:
    e = head()
    ops.build_images(ctx, e, ["node"], progress=Quiet())

    def request(images: list[str], *, every: bool = False, output: str | None = None,
                generation: str | None = None) -> ops.ExportRequest:
        return ops.export_request(ctx, images, every=every, output=output,
                                  generation=generation)

    with pytest.raises(SpecError, match="or --all"):
        request([])
    with pytest.raises(SpecError, match="directory"):
        request([], every=True, output=str(tmp_path / "x.tar"))
    with pytest.raises(SpecError, match="12 hex digits"):
        request(["node"], generation="latest")
    with pytest.raises(SpecError, match="backup store"):
        request(["node"], output=str(ctx.spec.root / "backups"))
    out = tmp_path / "exports"
    out.mkdir()
    with pytest.raises(BackupError, match="no backup of generation 000000000000"):
        ops.export(ctx, request(["node"], output=str(out),
                                generation="000000000000"), Quiet())
    damage(LocalDir(ctx.spec.root / "backups"), "vllm-node", -1)
    with pytest.raises(BackupError, match=r"damaged.*vllm-node "):
        ops.export(ctx, request(["node"], output=str(out)), Quiet())
    assert os.listdir(out) == []  # no tar, no sidecar, no partial file


def _field_tar(e: FakeEngine, ref: str, dest: Path) -> Path:
    """A tar as the field saves its images: plain docker save of ``ref``, no sidecar."""
    with dest.open("wb") as f:
        for chunk in e.save(ref):
            f.write(chunk)
    return dest


def test_a_field_tar_is_adopted_only_through_its_gate(ctx: context.Context,
                                                      tmp_path: Path) -> None:
    from imagebuild import adopt, lifecycle

    e = head()
    ops.build_images(ctx, e, ["node"], progress=Quiet())
    built = e.require("vllm-node:latest")
    tar = _field_tar(e, "vllm-node:latest", tmp_path / "vllm-node.tar")
    lose(e, built.id)
    # without --adopt: refused, and the refusal says what --adopt does
    with pytest.raises(BackupError, match="no readable sidecar") as err:
        ops.restore(ctx, e, ops.restore_request(ctx, [], str(tar)), Quiet())
    assert "--adopt" in err.value.hint
    # a gate that fails (a CPU torch): latest unmoved, nothing recorded or left tagged
    e.responder = torch_prints(CPU)
    store = LocalDir(ctx.spec.root / "backups")
    before = [b.key for b in backups_of(store, "vllm-node")]
    req = adopt.adopt_request(ctx, [], tar=str(tar), from_tar=True)
    assert req.name == "vllm-node"  # from the tar's own tag
    failed = adopt.adopt(ctx, e, req, Quiet())
    assert isinstance(failed.error(), VerifyFailed) and failed.image is None
    assert e.inspect("vllm-node:latest") is None
    assert not any(t.startswith("vllm-node:") for i in e.images.values() for t in i.tags)
    assert e.inspect(built.id) is None  # what the tar brought in is gone again
    assert [b.key for b in backups_of(store, "vllm-node")] == before
    # a gate that passes: latest, a generation of its own (never a derivation of the
    # spec), rooted, backed up
    e.responder = torch_prints(GOOD)
    done = adopt.adopt(ctx, e, req, Quiet())
    assert done.error() is None and done.image is not None
    assert done.adopted.fingerprint == built.fingerprint
    latest = e.require("vllm-node:latest")
    assert latest.id == done.image.id and latest.labels[ADOPTED_LABEL] == built.fingerprint
    h12 = hash12(input_hash(latest) or "")
    assert f"vllm-node:{h12}" in latest.tags and h12 != hash12(input_hash(built) or "")
    assert not any("adopt-" in t for i in e.images.values() for t in i.tags)
    assert done.backup is not None
    assert backups_of(store, "vllm-node")[0].input_hash == input_hash(latest)
    # a build of the spec never takes it for its derivation (it restores its own)
    ops.build_images(ctx, e, ["node"], progress=Quiet())
    assert input_hash(e.require("vllm-node:latest")) == input_hash(built)
    # and rollback returns to it
    back = lifecycle.rollback(ctx, e, "vllm-node", h12)
    assert back.error() is None and e.require("vllm-node:latest").id == latest.id


def test_an_image_in_the_engine_is_adopted_by_reference(ctx: context.Context) -> None:
    from imagebuild import adopt

    e = head()
    ops.build_images(ctx, e, ["node"], progress=Quiet())
    node = e.require("vllm-node:latest")
    e.tag(node.id, "field/vllm-node", "2026-06")
    with pytest.raises(SpecError, match="--as NAME"):
        adopt.adopt_request(ctx, [], ref="field/vllm-node:2026-06")
    with pytest.raises(ImageNotFound):
        adopt.adopt(ctx, e, adopt.adopt_request(ctx, ["node"], ref="field/missing:1"),
                    Quiet())
    done = adopt.adopt(ctx, e, adopt.adopt_request(ctx, ["node"],
                                                   ref="field/vllm-node:2026-06"), Quiet())
    assert done.error() is None and done.image is not None
    assert e.require("vllm-node:latest").id == done.image.id
    assert "field/vllm-node:2026-06" in e.require(node.id).tags  # the field's tag stays
    again = adopt.adopt(ctx, e, adopt.adopt_request(ctx, ["node"],
                                                    ref="field/vllm-node:2026-06"), Quiet())
    assert again.image is not None and again.image.id == done.image.id  # idempotent


def test_restore_of_a_tar_the_spec_does_not_define_is_refused_before_loading(
        ctx: context.Context, tmp_path: Path) -> None:
    e = head()
    ops.build_images(ctx, e, ["node"], progress=Quiet())
    tar = _as_tar(ctx, "vllm-node", tmp_path / "vllm-node.tar")
    foreign = tmp_path / "other.tar"
    foreign.write_bytes(tar.read_bytes())
    sidecar = json.loads((tar.parent / (tar.name + ".json")).read_text())
    sidecar["image"] = "someone-elses-image"
    (tmp_path / "other.tar.json").write_text(json.dumps(sidecar))
    lose(e, e.require("vllm-node:latest").id)
    with pytest.raises(BackupError, match="which this spec does not define; nothing was"):
        ops.restore(ctx, e, ops.restore_request(ctx, [], str(foreign)), Quiet())
    assert e.loads == 0
    with pytest.raises(BackupError, match="is a backup of someone-elses-image, not vllm-node"):
        ops.restore(ctx, e, ops.restore_request(ctx, ["node"], str(foreign)), Quiet())


def test_backup_refuses_an_unverified_image_and_keeps_generations(ctx: context.Context,
                                                                  stack: Stack) -> None:
    e = head()
    ops.build_images(ctx, e, ["node"], backup=False, progress=Quiet())
    for record in (ctx.spec.state_dir / "verified").glob("*.json"):
        record.unlink()
    with pytest.raises(NotVerified):
        ops.backup(ctx, e, ["node"], Quiet())
    store = LocalDir(ctx.spec.root / "backups")
    assert not store.directory.exists() or _tree(store.directory) == {}
    built = []
    for i in range(3):
        _touch_template(stack, "vllm-node", f"generation {i}")
        ctx = context.load(str(stack.spec_path))
        ops.build_images(ctx, e, ["node"], progress=Quiet())
        built.append(e.require("vllm-node:latest").id)
    kept = list_generations(store, "vllm-node")  # keep: 2 = the current and one more
    assert [g.image_id for g in kept] == built[:0:-1]
    linked = {str(d) for g in kept for d, _ in g.files.values()}
    assert set(os.listdir(store.directory / BLOBS)) == linked  # the first one's are gone


def test_a_backup_beside_another_writer_keeps_older_generations_for_later(
        stack: Stack, ctx: context.Context) -> None:
    """Another run writing into the store (its shared lock, alive) stops this backup's
    pruning (it needs the store to itself), never the backup; the next backup alone
    prunes. Two runs assembling the same generation at once keep one."""
    import io
    import socket

    from imagebuild.progress import Progress
    from imagebuild.storelock import LOCKS

    e = head()
    store = LocalDir(ctx.spec.root / "backups")
    other = store.directory / LOCKS / f"shared.{socket.gethostname()}-1.abcd1234"
    built = []
    for i in range(3):
        _touch_template(stack, "vllm-node", f"generation {i}")
        ctx = context.load(str(stack.spec_path))
        if i == 2:
            other.parent.mkdir(parents=True, exist_ok=True)
            other.write_text('{"what": "a backup of vllm-node-mimo"}\n')
        ops.build_images(ctx, e, ["node"], backup=False, progress=Quiet())
        built.append(e.require("vllm-node:latest").id)
        said = io.StringIO()
        ops.backup(ctx, e, ["node"], Progress(said))
    assert "older generations kept for now" in said.getvalue()
    assert "a backup of vllm-node-mimo" in said.getvalue()
    assert len(list_generations(store, "vllm-node")) == 3  # keep is 2: one pruned later
    other.unlink()
    ops.backup(ctx, e, ["node"], Quiet())
    assert [g.image_id for g in list_generations(store, "vllm-node")] == built[:0:-1]
    assert list((store.directory / LOCKS).iterdir()) == []
    # the same generation assembled by another run between this one's steps: kept
    gen = list_generations(store, "vllm-node")[0]
    real_rename = LocalDir.rename

    def beaten(self: LocalDir, src: str, dst: str) -> None:
        shutil.copytree(self.directory / src, self.directory / dst, copy_function=os.link)
        real_rename(self, src, dst)

    from imagebuild.layerstore import assemble

    LocalDir.rename = beaten  # type: ignore[method-assign]
    try:
        assemble(store, gen, current=True)
    finally:
        LocalDir.rename = real_rename  # type: ignore[method-assign]
    assert list_generations(store, "vllm-node")[0] == gen
    assert not [d for d in os.listdir(store.directory / "images" / "vllm-node")
                if d.endswith(".partial")]


def test_a_mirror_gets_only_what_it_lacks_checked_on_both_sides(
        stack: Stack, ctx: context.Context, tmp_path: Path) -> None:
    from imagebuild.layerstore import check_store, sidecar_path
    from imagebuild.mirror import copy_to_mirror, mirror_state

    e = head()
    ops.build_images(ctx, e, ["tf5"], progress=Quiet())
    store = LocalDir(ctx.spec.root / "backups")
    mirror = LocalDir(tmp_path / "mirror")
    names = ["vllm-node", "vllm-node-tf5"]
    assert mirror_state(store, mirror).state == "behind by 2 generations"
    first = copy_to_mirror(store, mirror, names, 2, Quiet())
    blobs = set(os.listdir(store.directory / BLOBS))
    assert set(os.listdir(mirror.directory / BLOBS)) == blobs
    assert first.blobs_sent == len(blobs) and len(first.generations) == 2
    for n in names:
        [gen] = list_generations(store, n)
        assert (mirror.directory / sidecar_path(n, gen.hash12)).read_text() == (
            store.directory / sidecar_path(n, gen.hash12)).read_text()
    assert mirror_state(store, mirror).state == "current"
    # restorable from the mirror alone
    other = head()
    key = backups_of(mirror, "vllm-node-tf5")[0].key
    assert restore_backup(other, mirror, key, Quiet()).info.fingerprint == e.require(
        "vllm-node-tf5:latest").fingerprint
    # again: nothing to send; a new generation: only its new blobs
    assert copy_to_mirror(store, mirror, names, 2, Quiet()).blobs_sent == 0
    _touch_template(stack, "vllm-node-tf5", "a new generation")
    ctx = context.load(str(stack.spec_path))
    ops.build_images(ctx, e, ["tf5"], progress=Quiet())
    new = set(os.listdir(store.directory / BLOBS)) - blobs
    again = copy_to_mirror(store, mirror, names, 2, Quiet())
    assert again.blobs_sent == len(new) and again.generations == [
        f"vllm-node-tf5 {list_generations(store, 'vllm-node-tf5')[0].hash12}"]
    # a blob damaged on the mirror: found by its check, sent again and relinked
    [gen] = [g for g in list_generations(mirror, "vllm-node") if g]
    bad = str(gen.files[gen.layer_files[0]][0])
    blob = mirror.directory / BLOBS / bad
    os.chmod(blob, 0o644)
    raw = bytearray(blob.read_bytes())
    raw[10] ^= 1
    blob.write_bytes(bytes(raw))
    found = check_store(mirror, mirror.sha256)
    assert list(found.damaged) == [bad]
    fixed = copy_to_mirror(store, mirror, names, 2, Quiet(), frozenset(found.damaged))
    assert fixed.blobs_sent == 1 and check_store(mirror, mirror.sha256).ok
    key = backups_of(mirror, "vllm-node")[0].key
    assert restore_backup(head(), mirror, key, Quiet()).info.id == e.require(
        "vllm-node:latest").id
    # a blob that arrives as other bytes is not kept (hashed on the mirror's side)
    shutil.rmtree(tmp_path / "mirror")
    mirror = LocalDir(tmp_path / "mirror")
    mirror.sha256 = lambda name, meter=None: "0" * 64  # type: ignore[method-assign]
    with pytest.raises(BackupError, match="arrived as sha256 000000000000"):
        copy_to_mirror(store, mirror, names, 2, Quiet())
    assert os.listdir(mirror.directory / BLOBS) == []
    assert os.listdir(mirror.directory / "blobs" / ".incoming") == []


def test_a_backup_killed_half_way_is_cleaned_up_but_a_live_one_is_spared(
        ctx: context.Context) -> None:
    import socket

    e = head()
    ops.build_images(ctx, e, ["node"], backup=False, progress=Quiet())
    image = e.require("vllm-node:latest")
    directory = ctx.spec.root / "backups"
    host = socket.gethostname()
    incoming = directory / "blobs" / ".incoming"
    incoming.mkdir(parents=True)
    dead = incoming / f"{host}-999999999-3"
    alive = incoming / f"{host}-1-3"  # pid 1 is always running
    partial = directory / "images" / "vllm-node" / f".aaaaaaaaaaaa.{host}-999999999.partial"
    partial.mkdir(parents=True)
    for p in (dead, alive):
        p.write_bytes(b"half")
    write_backup(LocalDir(directory), e, "vllm-node", image, 2, Quiet())
    assert not dead.exists() and alive.exists() and not partial.exists()


def test_a_failing_save_leaves_the_previous_backup_and_no_partial(ctx: context.Context) -> None:
    e = head()
    ops.build_images(ctx, e, ["node"], progress=Quiet())
    image = e.require("vllm-node:latest")
    store = LocalDir(ctx.spec.root / "backups")
    before = _tree(store.directory)

    class Failing(FakeEngine):
        def save(self, *refs: str):  # type: ignore[no-untyped-def, override]
            yield b"x" * 1000
            raise OSError(28, "No space left on device")

    failing = Failing(images=e.images, blobs=e.blobs)
    changed = ImageInfo(id="sha256:" + "f" * 64, tags=(), labels=image.labels,
                        diff_ids=image.diff_ids, size=1, created="", config=image.config)
    with pytest.raises(BackupError, match="No space left on device; the previous"):
        write_backup(store, failing, "vllm-node", changed, 2, Quiet())
    assert _tree(store.directory) == before


def test_restore_backup_refuses_a_tar_without_a_sidecar(tmp_path: Path) -> None:
    (tmp_path / "x.tar").write_bytes(b"tar")
    with pytest.raises(BackupError, match="no readable sidecar"):
        restore_backup(head(), LocalDir(tmp_path), "x.tar", Quiet())


# -- distribute ----------------------------------------------------------------------------------


def _workers(*engines: FakeEngine) -> list[Worker]:
    return [Worker(e.name, f"10.0.0.{i}", e) for i, e in enumerate(engines, 1)]


def _request(ctx: context.Context, workers: list[Worker], images: list[str] | None = None,
             force: bool = False) -> shipping.DistributeRequest:
    names = ctx.names(images or [])
    return shipping.DistributeRequest(names, bool(images), workers, force=force)


def test_distribute_sends_each_worker_only_what_it_lacks(ctx: context.Context) -> None:
    e = head()
    ops.build_images(ctx, e, ["mimo"], progress=Quiet())
    w1, c1 = FakeEngine(name="w1"), FakeEngine(name="c1", store="containerd")
    result = shipping.distribute(ctx, e, _request(ctx, _workers(w1, c1)), Quiet())
    assert result.error() is None
    by = {(o.worker, o.image): o for o in result.outcomes}
    for w in (w1, c1):
        assert by[(w.name, "vllm-node")].action == "whole archive"
        for name in ("vllm-node-tf5", "vllm-node-mimo"):
            o = by[(w.name, name)]
            assert o.action == "partial" and o.layers_skipped >= 3 and o.latest_moved
        for name in NAMES:
            mine = e.require(latest_tag(name))
            theirs = w.require(latest_tag(name))
            assert theirs.fingerprint == mine.fingerprint
            assert hash_tag(name, mine) in theirs.tags
            assert w.checks_run == []  # judged by the head's record, never re-run
    assert "OCI layout" in by[("c1", "vllm-node-mimo")].note
    assert by[("w1", "vllm-node-mimo")].bytes_sent < by[("w1", "vllm-node")].bytes_sent
    loads = (w1.loads, c1.loads)
    again = shipping.distribute(ctx, e, _request(ctx, _workers(w1, c1)), Quiet())
    assert all(o.action == "up to date" and o.bytes_sent == 0 for o in again.outcomes)
    assert (w1.loads, c1.loads) == loads


def test_one_broken_worker_fails_alone(ctx: context.Context) -> None:
    e = head()
    ops.build_images(ctx, e, ["tf5"], progress=Quiet())
    w1, w2 = FakeEngine(name="w1"), FakeEngine(name="w2", broken="connection refused")
    result = shipping.distribute(ctx, e, _request(ctx, _workers(w1, w2)), Quiet())
    err = result.error()
    assert isinstance(err, RemoteError) and err.exit_code == 9
    assert "distribution failed on w2" in err.message and "connection refused" in err.message
    assert all(o.ok for o in result.outcomes if o.worker == "w1")
    assert w1.require("vllm-node-tf5:latest") is not None


def test_a_copy_whose_content_differs_is_untagged_and_later_images_are_skipped(
        ctx: context.Context) -> None:
    e = head()
    ops.build_images(ctx, e, ["tf5"], progress=Quiet())

    class Tampering(FakeEngine):
        def _register(self, config, diff_ids, tags):  # type: ignore[no-untyped-def]
            config["config"]["Env"] = ["TAMPERED=1"]
            return super()._register(config, diff_ids, tags)

    w = Tampering(name="w1")
    result = shipping.distribute(ctx, e, _request(ctx, _workers(w)), Quiet())
    node, tf5 = result.outcomes
    assert node.action == "failed" and "content fingerprint differs" in node.error
    assert tf5.action == "skipped" and not tf5.ok
    assert all(not any(t.startswith("vllm-node") for t in i.tags) for i in w.images.values())


def test_forced_images_travel_but_their_latest_does_not_move(ctx: context.Context) -> None:
    e = head()
    ops.build_images(ctx, e, ["node"], progress=Quiet())
    for record in (ctx.spec.state_dir / "verified").glob("*.json"):
        record.unlink()
    w = FakeEngine(name="w1")
    with pytest.raises(NotVerified):
        shipping.distribute(ctx, e, _request(ctx, _workers(w)), Quiet())
    result = shipping.distribute(ctx, e, _request(ctx, _workers(w), force=True), Quiet())
    [o] = result.outcomes
    assert o.ok and not o.latest_moved and "not verified" in o.note
    node = e.require("vllm-node:latest")
    assert w.inspect(hash_tag("vllm-node", node) or "") is not None
    assert w.inspect("vllm-node:latest") is None


def test_distribute_of_a_named_image_without_latest_is_refused(ctx: context.Context) -> None:
    e = head()
    with pytest.raises(ImageNotFound, match="no image of the spec has a latest tag"):
        shipping.distribute(ctx, e, _request(ctx, _workers(FakeEngine(name="w1"))), Quiet())
    with pytest.raises(ImageNotFound, match="vllm-node-tf5:latest is not present"):
        shipping.distribute(ctx, e, _request(ctx, _workers(FakeEngine(name="w1")), ["tf5"]),
                       Quiet())


# -- arguments are checked before any engine is contacted -----------------------------------------


@pytest.mark.parametrize("argv, says", [
    (["restore-from-tar", "--file", "x.tar", "node", "tf5"], "--file restores one tar"),
    (["build", "nope"], "unknown image 'nope'"),
    (["verify", "mimoo"], "did you mean 'mimo'"),
    (["distribute", "--workers", "5"], "the cluster has 2 worker(s)"),
    (["distribute", "--workers", "w9"], "unknown worker 'w9'"),
])
def test_usage_errors_exit_2_before_the_engine_is_contacted(
        ctx: context.Context, argv: list[str], says: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from imagebuild import cli

    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine-here.sock")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["-f", str(ctx.spec.path), *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert says in err and "cannot reach the Docker engine" not in err


@pytest.mark.parametrize("dry_run", [False, True])
def test_build_refuses_a_stale_lock_before_the_engine_is_contacted(
        stack: Stack, dry_run: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from imagebuild import cli

    stack.write_spec(SPEC.replace('requires: ["transformers>=4.57,<5"]',
                                  'requires: ["transformers>=4.57,<5", "numpy"]'))
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine-here.sock")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["-f", str(stack.spec_path), "build", *(["--dry-run"] if dry_run else [])])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err  # not 4: the engine was never asked
    assert "out of date" in err and "cannot reach the Docker engine" not in err


def test_a_plan_with_wheels_still_to_build_refuses_a_stale_lock_before_building_them(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock records the wheel (nothing will re-lock), the wheel store lacks it: the
    stale lock is refused by the plan, before the engine is asked or a wheel is built
    (hours, for vllm), not after."""
    from imagebuild.wheelops import WheelPlan, WheelStep

    stack.write_spec(SPEC.replace('requires: ["transformers>=4.57,<5"]',
                                  'requires: ["transformers>=4.57,<5", "numpy"]'))
    to_build = WheelStep(derivation=None, record=None, locked=True)  # type: ignore[arg-type]
    plan = WheelPlan([to_build])
    assert not plan.pending and to_build.action == "build"
    monkeypatch.setattr("imagebuild.ops.plan_wheels", lambda *a, **k: plan)
    with pytest.raises(LockError, match="out of date") as info:
        ops.plan_build(str(stack.spec_path), [])
    assert info.value.exit_code == 2


# -- bad inputs (the hardening pass) -------------------------------------------------------------


def test_a_lock_that_does_not_match_the_spec_is_refused_by_every_command(
        stack: Stack, ctx: context.Context) -> None:
    """The spec names flashinfer 0.6.12, the lock still pins another file of it: no
    command may hash-check, serve or install the lock's file instead."""
    lock = stack.root / "wheels.lock"
    good = lock.read_text()
    stale = good.replace("flashinfer_python-0.6.12-py3-none-any.whl",
                         "flashinfer_python-0.6.11-py3-none-any.whl").replace(
        'version = "0.6.12"', 'version = "0.6.11"')
    lock.write_text(stale)
    with pytest.raises(LockError, match=r"declares flashinfer_python-0\.6\.12.*locks "
                                        r"flashinfer_python-0\.6\.11") as info:
        context.load(str(stack.spec_path))
    assert info.value.exit_code == 2 and "imagebuild lock" in str(info.value)
    # two entries for one project
    entry = good[good.index("[[wheel]]\nname = \"flashinfer-python\""):]
    entry = entry[:entry.index("\n\n") + 1]
    lock.write_text(good + "\n" + entry.replace("0.6.12-py3", "0.6.12-py2"))
    with pytest.raises(LockError, match="more than one file is locked for flashinfer-python"):
        context.load(str(stack.spec_path))


def test_a_lock_filename_cannot_inject_a_requirement_line(stack: Stack) -> None:
    lock = stack.root / "wheels.lock"
    text = lock.read_text().replace(
        'filename = "extra_mimo-1.0-py3-none-any.whl"',
        'filename = "extra_mimo-1.0-py3-none-any.whl'
        '\\nevil @ http://x/e.whl ; python_version>\'0\'"')
    lock.write_text(text)
    with pytest.raises(LockError, match="is not a wheel filename"):
        context.load(str(stack.spec_path))


def test_an_index_publishing_a_bad_hash_is_refused_by_lock(stack: Stack) -> None:
    from imagebuild.lock import compute_lock

    spec = stack.load()
    name = "torch-2.11.0+cu130-py3-none-any.whl"
    with pytest.raises(LockError, match="not a sha256 digest"):
        compute_lock(spec.wheels_dir, [(name, "http://127.0.0.1:9/simple")], None,
                     fetch=lambda url: f'<a href="{name}#sha256=not-a-hash">{name}</a>')


def test_one_worker_with_a_broken_reply_fails_alone(ctx: context.Context) -> None:
    e = head()
    ops.build_images(ctx, e, ["node"], progress=Quiet())

    class Garbled(FakeEngine):
        def snapshot(self):  # type: ignore[no-untyped-def]
            raise KeyError("Id")  # what an unchecked reply used to raise from a thread

    good, bad = FakeEngine(name="w1"), Garbled(name="w2")
    result = shipping.distribute(ctx, e, _request(ctx, _workers(good, bad)), Quiet())
    by = {o.worker: o for o in result.outcomes}
    assert by["w1"].ok and not by["w2"].ok
    assert "w2: unexpected failure: KeyError" in by["w2"].error
    assert isinstance(result.error(), RemoteError)


@pytest.mark.parametrize("reply", ["Welcome to spark-2!\n[]", '[{"RepoTags": []}]'])
def test_an_ssh_engine_turns_a_bad_reply_into_an_error_naming_the_worker(
        reply: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from imagebuild import engine_ssh
    from imagebuild.engine_ssh import SshEngine
    from imagebuild.remote import Completed, Target

    monkeypatch.setattr(engine_ssh, "call", lambda *a, **k: Completed(0, reply, ""))
    monkeypatch.setattr(engine_ssh, "run",
                        lambda *a, **k: '{"DriverStatus": []}\n' + reply)
    worker = SshEngine(Target(name="w2", host="10.0.0.2"))
    with pytest.raises(RemoteError, match=r"w2 \(10\.0\.0\.2\): unexpected reply"):
        worker.inspect("vllm-node:latest")
    with pytest.raises(RemoteError, match="unexpected reply"):
        worker.snapshot()


def test_an_incomplete_save_is_refused_and_the_previous_backup_stays(ctx: context.Context) -> None:
    """docker save on the containerd store leaves out blobs missing from the content store
    (moby#49473): such an archive must never replace a backup."""
    e = head()
    ops.build_images(ctx, e, ["node"], progress=Quiet())
    image = e.require("vllm-node:latest")
    store = LocalDir(ctx.spec.root / "backups")
    before = _tree(store.directory)

    class Dropping(FakeEngine):
        def save(self, *refs: str):  # type: ignore[no-untyped-def, override]
            blobs = dict(self.blobs)
            self.blobs[image.diff_ids[-1]] = b"not the layer"
            try:
                yield from super().save(*refs)
            finally:
                self.blobs.clear()
                self.blobs.update(blobs)

    dropping = Dropping(images=e.images, blobs=e.blobs)
    changed = ImageInfo(id="sha256:" + "f" * 64, tags=(), labels=image.labels,
                        diff_ids=image.diff_ids, size=1, created="", config=image.config)
    dropping.images[changed.id] = changed
    with pytest.raises(BackupError, match=r"incomplete.*previous backup is still in place"):
        write_backup(store, dropping, "vllm-node", changed, 2, Quiet())
    assert _tree(store.directory) == before


def test_export_to_a_disk_without_room_writes_nothing(
        ctx: context.Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from collections import namedtuple

    e = head()
    ops.build_images(ctx, e, ["node"], progress=Quiet())
    out = tmp_path / "exports"
    out.mkdir()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("imagebuild.backup.shutil.disk_usage", lambda p: usage(1, 1, 1000))
    req = ops.export_request(ctx, ["node"], every=False, output=str(out), generation=None)
    with pytest.raises(BackupError, match="GB free"):
        ops.export(ctx, req, Quiet())
    assert os.listdir(out) == []


def test_adopting_a_file_that_is_not_a_tar_is_refused_before_the_engine(
        ctx: context.Context, tmp_path: Path) -> None:
    from imagebuild import adopt

    junk = tmp_path / "vllm-node.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(BackupError, match=r"not a readable tar|not a single-image"):
        adopt.adopt_request(ctx, [], tar=str(junk), from_tar=True)
    e = head()
    with pytest.raises(BackupError, match=r"not a readable tar|not a single-image"):
        adopt.adopt(ctx, e, adopt.adopt_request(ctx, ["node"], tar=str(junk), from_tar=True),
                    Quiet())
    assert [t for i in e.images.values() for t in i.tags] == ["example/base:1"]


def test_restore_falls_back_to_a_mirror_when_the_stores_copy_is_damaged(
        ctx: context.Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from imagebuild.mirror import copy_to_mirror

    e = head()
    ops.build_images(ctx, e, ["node"], progress=Quiet())
    node = e.require("vllm-node:latest")
    store = LocalDir(ctx.spec.root / "backups")
    mirror = LocalDir(tmp_path / "mirror")
    copy_to_mirror(store, mirror, ["vllm-node"], 2, Quiet())
    monkeypatch.setattr(ops, "mirror_stores", lambda spec: [mirror])
    blob = damage(store, "vllm-node", -1, at=7)
    lose(e, node.id)
    said = io.StringIO()
    done = ops.restore(ctx, e, ops.restore_request(ctx, ["node"], None), Progress(said))
    assert done.error() is None and e.require("vllm-node:latest").id == node.id
    assert "is damaged" in said.getvalue() and "trying the next copy" in said.getvalue()
    # with the mirror's copy damaged as well, the first error is the one raised
    assert damage(mirror, "vllm-node", -1, at=7).name == blob.name
    lose(e, node.id)
    with pytest.raises(BackupError, match=r"backups/images/vllm-node/.* is damaged"):
        ops.restore(ctx, e, ops.restore_request(ctx, ["node"], None), Quiet())
    assert e.inspect(node.id) is None


# -- --json: the documented shape of each command's document --------------------------------


def test_the_json_documents_have_their_documented_shape(stack: Stack,
                                                        ctx: context.Context) -> None:
    e = head()
    built = json.loads(output.build_json(ops.build_images(ctx, e, ["mimo"], progress=Quiet()),
                                         False))
    assert set(built) == {"ok", "dry_run", "wheels", "relocked", "images", "mirrors"}
    assert built["ok"] and [i["name"] for i in built["images"]] == NAMES
    node = built["images"][0]
    assert set(node) == {"name", "input_hash", "planned", "done", "image_id", "verified",
                         "latest_moved", "backup"}
    assert (node["planned"], node["done"], node["verified"], node["latest_moved"]) == (
        "build", "built", True, True)
    assert set(node["backup"]) == {"where", "written", "bytes_written"}
    dry = json.loads(output.build_json(ops.build_images(ctx, e, ["mimo"], dry_run=True,
                                                        progress=Quiet()), True))
    assert dry["dry_run"] and {i["done"] for i in dry["images"]} == {None}

    verified = json.loads(output.verify_json(ops.verify(ctx, e, [], Quiet())))
    assert set(verified) == {"ok", "images"} and verified["ok"]
    first = verified["images"][0]
    assert set(first) == {"image", "image_id", "passed", "checked_at", "checks"}
    assert set(first["checks"][0]) == {"check", "kind", "expected", "got", "passed", "hint"}
    assert first["checks"][0]["expected"] == "2.11.0+cu130 13.0"  # filled from the lock
    backed = json.loads(output.backup_json(ops.backup(ctx, e, [], Quiet())))
    assert set(backed) == {"ok", "store", "images", "mirrors"} and backed["ok"]
    assert set(backed["images"][0]) == {"name", "where", "written", "bytes_written", "size",
                                        "imported", "dropped"}

    pruned = json.loads(output.prune_json(lifecycle.prune(ctx, e, [], dry_run=True)))
    assert set(pruned) == {"ok", "dry_run", "nodes", "wheel_store"} and pruned["dry_run"]
    assert set(pruned["nodes"][0]) == {"node", "error", "repaired", "reclaimed", "items"}

    out = stack.root / "exported"
    out.mkdir()
    exported = json.loads(output.export_json(ops.export(ctx, ops.export_request(
        ctx, ["tf5"], every=False, output=str(out), generation=None), Quiet())))
    assert set(exported) == {"ok", "store", "without_backup", "images"}
    assert set(exported["images"][0]) == {"name", "path", "generation", "size", "sha256"}

    lose(e, e.require("vllm-node-tf5:latest").id)
    restored = json.loads(output.restore_json(ops.restore(
        ctx, e, ops.restore_request(ctx, ["tf5"], None), Quiet())))
    assert set(restored) == {"ok", "images"} and restored["ok"]
    assert set(restored["images"][0]) == {"name", "loaded", "seconds", "image_id", "verified",
                                          "latest_moved", "checks"}
    assert restored["images"][0]["loaded"] and restored["images"][0]["verified"]

    e.responder = torch_prints(CPU)  # verify runs every check again: the gate fails
    failed = ops.verify(ctx, e, ["node"], Quiet())
    doc = json.loads(output.verify_json(failed))
    assert not doc["ok"] and not doc["images"][0]["passed"]
    assert doc["images"][0]["checks"][0]["got"] == "2.10.0+cpu None"


def test_lock_json_has_its_documented_shape(stack: Stack, offline_lock: object) -> None:
    doc = json.loads(output.lock_json(lockflow.lock(stack.load(), check=False,
                                                    upgrade=False)))
    assert set(doc) == {"ok", "state", "path", "wheels", "unresolved", "allowed_unresolved",
                        "notes", "warnings", "closures"}
    assert [c["image"] for c in doc["closures"]] == NAMES
    assert set(doc["closures"][0]) == {"image", "path", "state", "packages", "unresolved",
                                       "changed"}
