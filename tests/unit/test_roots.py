"""GC roots, status, prune and rollback against the in-memory engine. The real prunes
(docker image prune -a, docker system prune -a) run on the bed's engines in the
integration tier; here the fake engine plays them as measured there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imagebuild import cli, context, lifecycle, ops, output, shipping
from imagebuild.distribute import Worker
from imagebuild.errors import ImageNotFound, SpecError
from imagebuild.layerstore import is_complete, list_generations
from imagebuild.naming import ROOT_LABEL, hash_tag
from imagebuild.output import status_shown
from imagebuild.progress import Quiet
from imagebuild.roots import holder_name, plan_roots
from imagebuild.store import LocalDir

from ..fake_engine import FakeEngine
from .conftest import Stack
from .test_workflows import CPU, WITH_BACKUPS, head, torch_prints

NODE = "vllm-node"


@pytest.fixture
def ctx(stack: Stack) -> context.Context:
    stack.write_spec(WITH_BACKUPS)
    return context.load(str(stack.spec_path))


def _new_generation(stack: Stack, i: int) -> context.Context:
    tpl = stack.root / "templates" / "vllm-node.Dockerfile.j2"
    tpl.write_text(tpl.read_text() + f"# generation {i}\n")
    return context.load(str(stack.spec_path))


def _holders(e: FakeEngine, name: str) -> dict[str, str]:
    return {c.name: c.image_id for c in e.holders(f"{ROOT_LABEL}={name}")}


def test_a_promotion_roots_latest_and_the_kept_generations(stack: Stack,
                                                           ctx: context.Context) -> None:
    e = head()
    ids = []
    for i in range(3):
        ctx = _new_generation(stack, i)
        result = ops.build_images(ctx, e, ["node"], progress=Quiet())
        assert result.report is not None
        ids.append(result.report.images[NODE])
    g0, g1, g2 = ids
    held = _holders(e, NODE)
    # keep: 2 -> latest, the current generation and the one before it; and the base
    assert held == {holder_name(NODE, "base"): e.require("example/base:1").id,
                    holder_name(NODE, "latest"): g2.id,
                    holder_name(NODE, (hash_tag(NODE, g2) or "").split(":")[1]): g2.id,
                    holder_name(NODE, (hash_tag(NODE, g1) or "").split(":")[1]): g1.id}
    assert all(c.running for c in e.containers.values())
    # a blind docker image prune -a: every root stays (the base too), g0 goes
    e.prune_all()
    assert e.inspect(g2.id) and e.inspect(g1.id) and e.inspect(g0.id) is None
    assert e.inspect("example/base:1") is not None
    assert e.require("vllm-node:latest").id == g2.id
    assert hash_tag(NODE, g2) not in e.require(g2.id).tags  # stripped, as Docker does
    # docker system prune -a: the holders run, so the same
    e.prune_all(system=True)
    assert e.inspect(g2.id) and e.inspect(g1.id)
    # the next promotion puts the stripped tag back
    ops.build_images(ctx, e, ["node"], progress=Quiet())
    assert hash_tag(NODE, g2) in e.require(g2.id).tags


def test_plan_roots_repairs_a_stopped_or_wrong_holder_and_orders_by_promotion() -> None:
    e = FakeEngine()
    img = e.add_base("x:aaaaaaaaaaaa", [b"a"])
    other = e.add_base("x:bbbbbbbbbbbb", [b"b"])
    labels = {ROOT_LABEL: "x", "org.imagebuild.root.tag": "latest"}
    e.hold(holder_name("x", "latest"), "x:bbbbbbbbbbbb", labels)  # on the wrong image
    plan = plan_roots("x", img, e.holders(ROOT_LABEL), 2, {img.id: img.tags}, refresh=True)
    assert [h.name for h in plan.remove] == [holder_name("x", "latest")]
    assert plan.start == [(holder_name("x", "latest"), "x:latest")]
    assert plan.retag == [(img.id, "x:latest")]  # tag before the holder starts from it
    # a stopped holder is started again
    e.remove_container(holder_name("x", "latest"))
    e.tag(img.id, "x", "latest")
    stopped = e.hold(holder_name("x", "latest"), "x:latest", labels)
    e.containers[stopped.name] = type(stopped)(**{**stopped.__dict__, "running": False})
    plan = plan_roots("x", e.require(img.id), e.holders(ROOT_LABEL), 2,
                      {img.id: e.require(img.id).tags}, refresh=False)
    assert plan.start == [(holder_name("x", "latest"), "x:latest")] and not plan.retag
    assert other.id != img.id


def test_status_tells_what_each_worker_holds(ctx: context.Context) -> None:
    e = head()
    ops.build_images(ctx, e, ["mimo"], progress=Quiet())
    w1, w2, w3 = FakeEngine(name="w1"), FakeEngine(name="w2"), FakeEngine(name="w3")
    workers = [Worker(w.name, w.name, w) for w in (w1, w2, w3)]
    shipping.distribute(ctx, e, shipping.request_for(ctx, [], workers[:2]), Quiet())
    # w2 loses its node image's root holder, w3 was never sent anything, w1 is fine
    w2.remove_container(holder_name(NODE, "latest"))
    w3.broken = None
    report = lifecycle.status(ctx, e, workers)
    node = next(i for i in report.images if i.name == NODE)
    assert node.workers == {"w1": "up to date", "w2": "unrooted", "w3": "missing"}
    assert node.rooted and node.hash_tag_present and node.verified_at
    assert node.backup.where and node.backup.matches_latest and node.backup.check_ok is None
    w3.broken = "ssh: connect to host w3: Connection refused"
    report = lifecycle.status(ctx, e, workers, check=True)
    node = next(i for i in report.images if i.name == NODE)
    assert node.workers["w3"] == "unreachable" and "refused" in report.unreachable["w3"]
    assert node.backup.check_ok is True and node.backup.checked
    json_ready = report.to_json()
    assert json_ready["images"][0]["workers"]["w1"] == "up to date"  # type: ignore[index]
    assert node.other_id == []  # one image store everywhere: the same IDs
    # a worker on the containerd store holds the same content under another image ID
    c1 = FakeEngine(name="c1", store="containerd")
    workers.append(Worker("c1", "c1", c1))
    shipping.distribute(ctx, e, shipping.request_for(ctx, [], workers[3:]), Quiet())
    report = lifecycle.status(ctx, e, workers)
    node = next(i for i in report.images if i.name == NODE)
    assert node.workers["c1"] == "up to date" and node.other_id == ["c1"]
    shown = status_shown(report, [w.name for w in workers]).out
    assert any("up to date*" in ln for ln in shown)
    assert any("another image ID" in ln for ln in shown)


def test_prune_removes_only_what_is_not_a_root(stack: Stack, ctx: context.Context) -> None:
    e = head()
    ids = []
    for i in range(3):
        ctx = _new_generation(stack, i)
        result = ops.build_images(ctx, e, ["node"], progress=Quiet())
        assert result.report is not None
        ids.append(result.report.images[NODE].id)
    g0, g1, g2 = ids
    stray = e.add_base("someone-else:1", [b"not ours"])  # another program's image
    g0_tags = e.require(g0).tags
    dry = lifecycle.prune(ctx, e, [], dry_run=True)
    [node] = dry.nodes
    assert [(i.kind, i.ref) for i in node.items] == [("tag", t) for t in g0_tags]
    assert node.items[0].size > 0 and e.inspect(g0) is not None  # nothing removed yet
    real = lifecycle.prune(ctx, e, [], dry_run=False)
    assert [(i.kind, i.ref) for i in real.nodes[0].items] == [
        (i.kind, i.ref) for i in node.items]  # exactly what the dry run listed
    assert e.inspect(g0) is None and e.inspect(g1) and e.inspect(g2)
    assert e.inspect(stray.id) is not None and real.nodes[0].reclaimed
    # never a backup: the generations kept stay (keep: 2), with every blob they link
    store = LocalDir(ctx.spec.root / "backups")
    kept = list_generations(store, NODE)
    assert [g.image_id for g in kept] == [g2, g1] and all(is_complete(store, g) for g in kept)


@pytest.mark.parametrize("spelling", ["-a", "--all", "-af", "-fa", "--all=true",
                                      "--filter=dangling=false", "--filter dangling=false"])
def test_prune_all_is_refused_with_the_reason(
        ctx: context.Context, spelling: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    with pytest.raises(SystemExit) as info:
        cli.main(["prune", *spelling.split(), "-f", str(ctx.spec.path)])  # -f after, too
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "refused" in err and "vllm-node-mimo was lost" in err
    assert f"imagebuild prune {spelling}: refused" in err  # echoed as typed


def test_rollback_moves_latest_back_and_restores_a_lost_generation(
        stack: Stack, ctx: context.Context) -> None:
    e = head()
    images = []
    for i in range(2):
        ctx = _new_generation(stack, i)
        result = ops.build_images(ctx, e, ["node"], progress=Quiet())
        assert result.report is not None
        images.append(result.report.images[NODE])
    old, new = images
    r = lifecycle.rollback(ctx, e, NODE, None)
    assert r.error() is None and r.promotion.moved and not r.restored
    assert e.require("vllm-node:latest").id == old.id
    # roll forward by name; then lose the old one entirely and roll back from its backup
    r = lifecycle.rollback(ctx, e, NODE, (hash_tag(NODE, new) or "").split(":")[1])
    assert e.require("vllm-node:latest").id == new.id
    for c in [c for c in e.containers.values() if c.image_id == old.id]:
        e.remove_container(c.id)
    e.remove_image(old.id)
    r = lifecycle.rollback(ctx, e, NODE, None)
    assert r.restored and e.require("vllm-node:latest").id == old.id
    doc = json.loads(output.rollback_json(NODE, r))  # rollback --json
    assert set(doc) == {"ok", "name", "previous", "generation", "from", "restored",
                        "image_id", "verified", "latest_moved", "checks", "distributed"}
    assert doc["ok"] and doc["restored"] and doc["from"] == "backup"
    assert doc["image_id"] == old.id and doc["distributed"] is None
    # a generation that fails the current checks is not rolled back to
    e.responder = torch_prints(CPU)
    for rec in (ctx.spec.state_dir / "verified").glob("*.json"):
        rec.unlink()
    r = lifecycle.rollback(ctx, e, NODE, None)
    assert r.error() is not None and e.require("vllm-node:latest").id == old.id


def test_rollback_refuses_what_it_cannot_do(ctx: context.Context) -> None:
    with pytest.raises(SpecError, match="12 hex digits"):
        lifecycle.check_hash12("latest")
    e = head()
    ops.build_images(ctx, e, ["node"], progress=Quiet())
    with pytest.raises(ImageNotFound, match="no older generation"):
        lifecycle.rollback(ctx, e, NODE, None)
    with pytest.raises(ImageNotFound, match="no generation 0123456789ab"):
        lifecycle.rollback(ctx, e, NODE, "0123456789ab")
