"""GC roots against the real prunes, imagebuild prune, status and rollback, on the bed:
the classic-store workers (Docker 20.10) and the containerd-store worker c1 (Docker
28.5), from a head on either store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from imagebuild.engine_docker import DockerEngine
from imagebuild.image import parse_image

from .conftest import REPO, Bed, MiniStack, testbed, use_every_worker_kind

pytestmark = pytest.mark.bed

NAMES = ("vllm-node", "vllm-node-tf5", "vllm-node-mimo")


@pytest.fixture
def stack(warm: MiniStack) -> MiniStack:
    """The session's built stack, its cluster the three classic workers and c1; workers
    that hold nothing."""
    testbed.cmd_reset_workers()
    use_every_worker_kind(warm)
    return warm


def _worker_tags(bed: Bed, worker: str) -> dict[str, set[str]]:
    out = bed.ssh(worker, "docker images -q --no-trunc | sort -u | "
                  "xargs -r docker image inspect --format '{{json .}}'").stdout
    images = [parse_image(json.loads(ln)) for ln in out.splitlines() if ln.strip()]
    return {i.id: set(i.tags) for i in images}


def _head_tags() -> dict[str, set[str]]:
    engine = DockerEngine()
    return {i.id: set(i.tags) for i in engine.snapshot().images}


def _stray(where: str, bed: Bed) -> None:
    """An image nobody holds: a label on top of the bed's base."""
    df = f"FROM {testbed.BASE_IMAGE}\nLABEL stray=1\n"
    if where == "head":
        subprocess.run(["docker", "build", "-q", "-t", "imagebuild-stray:1", "-"], input=df,
                       text=True, capture_output=True, check=True)
    else:
        save = subprocess.Popen(["docker", "save", "imagebuild-stray:1"],
                                stdout=subprocess.PIPE)
        subprocess.run(["ssh", "-F", str(bed.ssh_config), where, "docker", "load", "-q"],
                       stdin=save.stdout, capture_output=True, check=True)
        save.wait()


# On the containerd head only: on the classic head, scripts/try (test_try) runs the same
# blind prunes on the head and a worker and checks status, and the prune/rollback test
# below runs there; one more minute of CI for this one was not worth it.
@pytest.mark.parametrize("head_store", ["containerd"])
def test_roots_survive_blind_prunes_and_status_tells_every_worker_apart(
        stack: MiniStack) -> None:
    mini, bed = stack, stack.bed
    assert mini.cli("build", "mimo").returncode == 0
    r = mini.cli("distribute", "--workers", "w1,w2,c1")
    assert r.returncode == 0, r.stderr
    engine = DockerEngine()
    latest = {n: engine.require(f"{n}:latest") for n in NAMES}
    hash_tags = {n: next(t for t in latest[n].tags if not t.endswith(":latest"))
                 for n in NAMES}
    _stray("head", bed)
    for w in ("w1", "c1"):
        _stray(w, bed)
    # the roots are visible as what they are
    ps = bed.ssh("w1", "docker", "ps", "--format", "'{{.Names}} {{.Status}}'").stdout
    assert "imagebuild-root-vllm-node-mimo-latest Up" in ps
    # the field's command, blind, on the head and two workers (one per image store)
    subprocess.run(["docker", "image", "prune", "-a", "-f"], check=True, capture_output=True)
    for w in ("w1", "c1"):
        assert bed.ssh(w, "docker", "image", "prune", "-a", "-f").returncode == 0
    head = _head_tags()
    for n in NAMES:
        assert f"{n}:latest" in head[latest[n].id]  # kept, latest included
    assert not any("imagebuild-stray:1" in t for t in head.values())  # a non-root goes
    assert engine.inspect(testbed.BASE_IMAGE) is not None  # the base is rooted too
    c1 = _worker_tags(bed, "c1")  # containerd store: every held tag survives
    w1 = _worker_tags(bed, "w1")  # classic store: all but the lexically last tag go
    for n in NAMES:
        assert any({f"{n}:latest", hash_tags[n]} <= tags for tags in c1.values()), c1
        assert any(f"{n}:latest" in tags for tags in w1.values()), w1
    for tags in (w1, c1):
        assert not any("imagebuild-stray:1" in t for t in tags.values())
    # docker system prune -a removes stopped containers first: the holders run
    assert bed.ssh("w1", "docker", "system", "prune", "-a", "-f").returncode == 0
    assert any(f"{n}:latest" in t for n in NAMES for t in _worker_tags(bed, "w1").values())
    status = json.loads(mini.cli("status", "--json").stdout)
    mimo = next(i for i in status["images"] if i["name"] == "vllm-node-mimo")
    # a classic head loses the hash tag of an image in use (moby#36295); a containerd
    # head keeps every held tag
    assert mimo["rooted"] and mimo["hash_tag_present"] == (bed.head_store == "containerd")
    assert mimo["workers"] == {"w1": "up to date", "w2": "up to date", "w3": "missing",
                               "c1": "up to date"}
    # the same content under another image ID where the worker's store is not the head's
    assert mimo["other_id"] == (["c1"] if bed.head_store == "classic" else ["w1", "w2"])
    table = mini.cli("status").stdout
    assert "up to date*" in table and "another image ID" in table, table
    # imagebuild prune (which never takes -a) puts the stripped tags back
    for spelling in ("-a", "--all"):
        r = mini.cli("prune", spelling)
        assert r.returncode == 2 and "refused" in r.stderr and "--dry-run" in r.stderr
    r = mini.cli("prune", "--workers", "w1,c1")
    assert r.returncode == 0, r.stderr
    assert "put back" in r.stdout
    head = _head_tags()
    for n in NAMES:
        assert hash_tags[n] in head[latest[n].id]
    assert any(hash_tags["vllm-node-mimo"] in t for t in _worker_tags(bed, "w1").values())
    # now c1 loses mimo (holders and image), w2 mimo's latest holder, w3's sshd dies
    holders = bed.ssh("c1", "docker", "ps", "-aq", "--filter",
                      "label=org.imagebuild.root=vllm-node-mimo").stdout.split()
    assert holders
    bed.ssh("c1", "docker", "rm", "-f", *holders)
    mimo_id = bed.ssh("c1", "docker", "image", "inspect", "--format", "{{.Id}}",
                      "vllm-node-mimo:latest").stdout.strip()
    assert bed.ssh("c1", "docker", "rmi", "-f", mimo_id).returncode == 0
    bed.ssh("w2", "docker", "rm", "-f", "imagebuild-root-vllm-node-mimo-latest")
    sshd = int((bed.root / "workers" / "w3" / "sshd.pid").read_text())
    os.kill(sshd, signal.SIGTERM)
    try:
        r = mini.cli("status", "--json")
        assert r.returncode == 0, r.stderr
        data = json.loads(r.stdout)
        mimo = next(i for i in data["images"] if i["name"] == "vllm-node-mimo")
        assert mimo["workers"] == {"w1": "up to date", "w2": "unrooted",
                                   "w3": "unreachable", "c1": "missing"}
        node = next(i for i in data["images"] if i["name"] == "vllm-node")
        assert node["workers"]["c1"] == "up to date" and node["rooted"]
        assert mimo["backup"]["where"] and mimo["backup"]["matches_latest"]
        assert "w3" in data["unreachable"]
        table = mini.cli("status")
        assert table.returncode == 0 and "unreachable" in table.stdout
    finally:
        subprocess.run([sys.executable, str(REPO / "scripts" / "testbed.py"), "up"],
                       check=True, capture_output=True)
    r = mini.cli("status", "--json")
    print(f"status, 3 images x 4 workers, all up: {json.loads(r.stdout)['seconds']:.2f}s")


def test_prune_removes_what_its_dry_run_lists_and_rollback_round_trips(
        stack: MiniStack) -> None:
    mini, bed = stack, stack.bed
    tpl = mini.root / "templates" / "vllm-node-mimo.Dockerfile.j2"
    engine = DockerEngine()
    gens = []
    for i in range(3):  # three generations of mimo; keep: 2
        tpl.write_text(tpl.read_text() + f"# generation {i}\n")
        assert mini.cli("build", "mimo").returncode == 0
        gens.append(engine.require("vllm-node-mimo:latest"))
        if i == 0:
            assert mini.cli("distribute", "--workers", "w1").returncode == 0
    backups = sorted(p.name for p in (mini.root / "backups").iterdir())
    oldest = list(engine.require(gens[0].id).tags)
    assert oldest
    dry = mini.cli("prune", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    planned = sorted(ln.split("would remove ")[1].split(" (")[0]
                     for ln in dry.stdout.splitlines() if "would remove" in ln)
    for tag in oldest:
        assert any(p.startswith(f"tag {tag}") for p in planned), dry.stdout
    assert engine.inspect(gens[0].id) is not None  # the dry run removed nothing
    real = mini.cli("prune")
    assert real.returncode == 0, real.stderr
    done = sorted(ln.split("removed ")[1].split(" (")[0]
                  for ln in real.stdout.splitlines() if ": removed " in ln)
    assert done == planned and "reclaimed" in real.stdout
    assert engine.inspect(gens[0].id) is None  # the generation beyond keep went
    for g in gens[1:]:
        assert engine.inspect(g.id) is not None  # roots stay
    for n in NAMES:
        assert engine.inspect(f"{n}:latest") is not None
    assert sorted(p.name for p in (mini.root / "backups").iterdir()) == backups
    # rollback: latest goes back to the previous generation, on the head and on w1
    r = mini.cli("rollback", "mimo", "--workers", "w1")
    assert r.returncode == 0, r.stderr
    assert engine.require("vllm-node-mimo:latest").id == gens[1].id
    out = bed.ssh("w1", "docker", "image", "inspect", "vllm-node-mimo:latest").stdout
    assert parse_image(json.loads(out)[0]).fingerprint == gens[1].fingerprint
    ps = bed.ssh("w1", "docker", "ps", "--format", "'{{.Names}} {{.Image}}'").stdout
    assert "imagebuild-root-vllm-node-mimo-latest vllm-node-mimo:latest" in ps
    # and forward again by name; the oldest generation comes back from its backup
    new12 = next(t for t in gens[2].tags if not t.endswith(":latest")).split(":")[1]
    r = mini.cli("rollback", "mimo", "--to", new12, "--workers", "w1")
    assert r.returncode == 0, r.stderr
    assert engine.require("vllm-node-mimo:latest").id == gens[2].id
    # the previous generation lost from the head (its roots too) comes back from its backup
    held = subprocess.run(["docker", "ps", "-aq", "--filter", f"ancestor={gens[1].id}"],
                          capture_output=True, text=True, check=True).stdout.split()
    subprocess.run(["docker", "rm", "-f", *held], check=True, capture_output=True)
    subprocess.run(["docker", "rmi", "-f", gens[1].id], check=True, capture_output=True)
    r = mini.cli("rollback", "mimo")
    assert r.returncode == 0 and "restored from its backup" in r.stdout, r.stdout + r.stderr
    assert engine.require("vllm-node-mimo:latest").fingerprint == gens[1].fingerprint
    assert mini.cli("rollback", "mimo", "--to", "not-a-hash").returncode == 2
