"""distribute --via registry: the bed's CNCF distribution registry (Debian's
docker-registry on 127.0.0.1:15000), fed from the layer store over its HTTP API, and the
real worker engines (classic and containerd store) pulling from it over ssh."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from imagebuild.engine_docker import DockerEngine
from imagebuild.image import parse_image

from .conftest import HEAD_STORES, Bed, MiniStack, full_disk, testbed, use_every_worker_kind

pytestmark = pytest.mark.bed

NAMES = ("vllm-node", "vllm-node-tf5", "vllm-node-mimo")
REGISTRY = ("registry:\n  address: 127.0.0.1:15000   # the bed's registry (scripts/testbed up "
            "starts it)\n  tls: false\n")


@pytest.fixture
def stack(warm: MiniStack) -> MiniStack:
    """The session's built stack; its cluster the three classic workers and c1, holding
    nothing; its images under a repository prefix of their own in the bed's registry
    (so what it uploads is cold)."""
    testbed.cmd_reset_workers()
    use_every_worker_kind(warm)
    warm.edit_spec(REGISTRY, REGISTRY + f"  repository: t{uuid.uuid4().hex[:10]}\n")
    return warm


def _repo(mini: MiniStack, name: str) -> str:
    """Where the stack's image ``name`` is in the bed's registry: PREFIX/NAME."""
    line = next(ln for ln in mini.spec.read_text().splitlines()
                if ln.startswith("  repository: "))
    return f"{line.split(': ', 1)[1]}/{name}"


def _distribute(mini: MiniStack, *args: str) -> tuple[int, dict[str, object], str]:
    r = mini.cli("distribute", "--json", *args)
    data = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
    return r.returncode, data, r.stderr


def _by(data: dict[str, object], worker: str, image: str) -> dict[str, object]:
    return next(o for o in data["outcomes"]  # type: ignore[union-attr]
                if o["worker"] == worker and o["image"] == image)


def _images(bed: Bed, worker: str) -> dict[str, set[str]]:
    """image ID -> tags and digest references on a worker."""
    out = bed.ssh(worker, "docker images -q --no-trunc | sort -u | "
                  "xargs -r docker image inspect --format '{{json .}}'").stdout
    found = {}
    for ln in out.splitlines():
        if ln.strip():
            raw = json.loads(ln)
            found[parse_image(raw).id] = set(raw.get("RepoTags") or []) | set(
                raw.get("RepoDigests") or [])
    return found


def _registry_tags(repo: str) -> list[str]:
    try:
        with urllib.request.urlopen(f"http://{testbed.REGISTRY_ADDR}/v2/{repo}/tags/list",
                                    timeout=10) as r:
            return list(json.loads(r.read()).get("tags") or [])
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return []
        raise


@pytest.mark.parametrize("head_store", HEAD_STORES)
def test_via_registry_lands_the_image_on_classic_and_containerd_workers(
        stack: MiniStack) -> None:
    mini = stack
    assert mini.cli("build", "mimo").returncode == 0
    workers = ("w1", "w2", "w3", "c1")
    # a dry run asks the registry what it lacks and changes nothing anywhere
    code, data, err = _distribute(mini, "--via", "registry", "--dry-run")
    assert code == 0, err
    assert data["upload"]["bytes_uploaded"] > 0  # type: ignore[index]
    assert _registry_tags(_repo(mini, "vllm-node")) == []
    assert all(_images(mini.bed, w) == {} for w in workers)

    code, data, err = _distribute(mini, "--via", "registry")
    assert code == 0, err
    assert data["via"] == "registry" and data["why"] == "--via registry"
    up = {p["name"]: p for p in data["upload"]["images"]}  # type: ignore[index]
    node, tf5, mimo = (up[n] for n in NAMES)
    assert node["uploaded"] == node["blobs"] and node["mounted"] == node["present"] == 0
    # tf5 and mimo take their parents' layers by mount: only their own bytes travel
    for child in (tf5, mimo):
        assert child["mounted"] >= 7, child
        assert 0 < child["bytes_uploaded"] < child["bytes_total"] / 4, child
    head = DockerEngine()
    for name in NAMES:
        want = head.require(f"{name}:latest")
        hash_tag = next(t for t in want.tags if not t.endswith(":latest"))
        assert _registry_tags(_repo(mini, name)) == [hash_tag.rpartition(":")[2]]
        for w in workers:
            o = _by(data, w, name)
            assert o["ok"] and o["action"] == "pulled", o
            images = _images(mini.bed, w)
            got = next(i for i, refs in images.items() if f"{name}:latest" in refs)
            tags = {t for t in images[got] if "@" not in t}
            assert tags == {f"{name}:latest", hash_tag}, images[got]
            # no registry reference left (a containerd store lists NAME@<manifest> for
            # each of its names)
            assert not any(testbed.REGISTRY_ADDR in ref for ref in images[got]), images[got]
            info = parse_image(json.loads(mini.bed.ssh(w, "docker", "image", "inspect",
                                                       f"{name}:latest").stdout)[0])
            assert info.fingerprint == want.fingerprint
            # on the same image store as the head, the same image ID (what the field's
            # launcher compares): a containerd head pushes the manifest it saved
            same_store = (w == "c1") == (mini.bed.head_store == "containerd")
            assert (info.id == want.id) == same_store, (w, info.id, want.id)
        # each worker pulled only what its earlier images did not bring
        if name != "vllm-node":
            assert all(int(_by(data, w, name)["layers_skipped"]) >= 7  # type: ignore[call-overload]
                       for w in workers)
    # rooted like the ssh path: the GC-root holders run on every worker
    for w in workers:
        held = mini.bed.ssh(w, "docker", "ps", "--filter", "label=org.imagebuild.root",
                            "--format", "{{.Names}}").stdout.split()
        assert len(held) >= len(NAMES), (w, held)
    # a second run: nothing uploaded, nothing pulled
    code, data, err = _distribute(mini, "--via", "registry")
    assert code == 0, err
    assert data["upload"]["bytes_uploaded"] == 0  # type: ignore[index]
    assert all(o["action"] == "up to date" and o["bytes_sent"] == 0
               for o in data["outcomes"])  # type: ignore[union-attr]


def test_auto_picks_the_registry_from_min_workers_on(stack: MiniStack) -> None:
    mini = stack
    mini.edit_spec("  tls: false\n", "  tls: false\n  min_workers: 3\n")
    assert mini.cli("build", "node").returncode == 0
    r = mini.cli("distribute", "--workers", "2", "node")
    assert r.returncode == 0, r.stderr
    assert "via ssh (2 workers < registry.min_workers 3)" in r.stdout
    r = mini.cli("distribute", "--workers", "w1,w2,c1", "node")
    assert r.returncode == 0, r.stderr
    assert "via registry (3 workers >= registry.min_workers 3)" in r.stdout
    assert "c1     vllm-node        pulled" in r.stdout, r.stdout
    assert "w1     vllm-node        up to date" in r.stdout, r.stdout


def test_a_worker_that_fails_mid_pull_fails_alone(stack: MiniStack) -> None:
    mini = stack
    assert mini.cli("build", "node").returncode == 0
    with full_disk(mini.bed, "w3"):  # dockerd downloads a pull's layers there
        code, data, err = _distribute(mini, "--via", "registry", "--workers", "w1,w2,w3",
                                      "node")
    assert code == 9, err
    w3 = _by(data, "w3", "vllm-node")
    assert not w3["ok"] and w3["action"] == "failed"
    assert "w3" in str(w3["error"]) and "no space left on device" in str(w3["error"]), w3
    assert "distribution failed on w3" in err
    assert _by(data, "w1", "vllm-node")["ok"] and _by(data, "w2", "vllm-node")["ok"]
    assert _images(mini.bed, "w3") == {}  # nothing tagged, nothing half-registered kept
    # with space again, a rerun pulls on w3 only and uploads nothing
    code, data, err = _distribute(mini, "--via", "registry", "--workers", "w1,w2,w3", "node")
    assert code == 0, err
    assert data["upload"]["bytes_uploaded"] == 0  # type: ignore[index]
    assert _by(data, "w3", "vllm-node")["action"] == "pulled"
    assert all(_by(data, w, "vllm-node")["action"] == "up to date" for w in ("w1", "w2"))


def test_a_registry_that_is_down_fails_before_any_worker_is_touched(stack: MiniStack) -> None:
    mini = stack
    assert mini.cli("build", "node").returncode == 0
    mini.edit_spec("address: 127.0.0.1:15000", "address: 127.0.0.1:15999")
    r = mini.cli("distribute", "--via", "registry", "node")
    assert r.returncode == 11, r.stderr
    assert "the registry at 127.0.0.1:15999 does not answer" in r.stderr
    assert "hint:" in r.stderr and "--via ssh" in r.stderr
    assert all(_images(mini.bed, w) == {} for w in ("w1", "w2", "w3", "c1"))


def test_a_damaged_layer_stops_the_upload_and_nothing_is_tagged(stack: MiniStack) -> None:
    mini = stack
    assert mini.cli("build", "node").returncode == 0
    assert mini.cli("backup", "node").returncode == 0
    gen_dir = mini.root / "backups" / "images" / "vllm-node"
    gen = gen_dir / (gen_dir / "current").read_text().strip()
    layers = json.loads((gen / "manifest.json").read_text())[0]["Layers"]
    victim = max((gen / name for name in layers), key=lambda p: p.stat().st_size)
    with victim.open("r+b") as f:  # one byte flipped in place, in the middle
        f.seek(victim.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    r = mini.cli("distribute", "--via", "registry", "node")
    assert r.returncode == 8, r.stderr
    assert "is damaged" in r.stderr, r.stderr
    assert _registry_tags(_repo(mini, "vllm-node")) == []
    assert all(_images(mini.bed, w) == {} for w in ("w1", "w2", "w3", "c1"))


def test_a_read_only_registry_refuses_the_upload_and_nothing_is_tagged(
        stack: MiniStack, tmp_path: Path) -> None:
    mini = stack
    assert mini.cli("build", "node").returncode == 0
    conf = tmp_path / "config.yml"
    conf.write_text(json.dumps({
        "version": 0.1, "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(tmp_path / "data")},
                    "maintenance": {"readonly": {"enabled": True}}},
        "http": {"addr": "127.0.0.1:15001"}}))
    proc = subprocess.Popen(["docker-registry", "serve", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_answers("127.0.0.1:15001")
        mini.edit_spec("address: 127.0.0.1:15000", "address: 127.0.0.1:15001")
        r = mini.cli("distribute", "--via", "registry", "node")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert r.returncode == 11, r.stderr
    assert "the registry at 127.0.0.1:15001" in r.stderr and "HTTP 405" in r.stderr, r.stderr
    assert "refuses writes" in r.stderr
    assert all(_images(mini.bed, w) == {} for w in ("w1", "w2", "w3", "c1"))


def test_start_true_starts_a_registry_that_stays_for_the_next_run(stack: MiniStack) -> None:
    mini = stack
    assert mini.cli("build", "node").returncode == 0
    mini.edit_spec("address: 127.0.0.1:15000", "address: 127.0.0.1:15002\n  start: true")
    pidfile = mini.root / "state" / "registry-run" / "registry.pid"
    # a dry run starts nothing: it counts every blob as missing
    r = mini.cli("distribute", "--via", "registry", "--workers", "w1", "--dry-run", "node")
    assert r.returncode == 0, r.stderr
    assert "registry 127.0.0.1:15002: started here, not running" in r.stdout, r.stdout
    assert "would upload" in r.stdout and not pidfile.exists()
    try:
        r = mini.cli("distribute", "--via", "registry", "--workers", "w1", "node")
        assert r.returncode == 0, r.stderr
        assert "started a registry at 127.0.0.1:15002" in r.stderr
        assert (mini.root / "state" / "registry" / "docker").is_dir()  # its storage
        pid = int(pidfile.read_text())
        # the next run finds it answering: nothing started, nothing uploaded
        testbed.cmd_reset_workers()
        code, data, err = _distribute(mini, "--via", "registry", "--workers", "w1", "node")
        assert code == 0, err
        assert data["upload"]["started"] == "" and data["upload"]["bytes_uploaded"] == 0  # type: ignore[index]
        assert _by(data, "w1", "vllm-node")["action"] == "pulled"
        assert int(pidfile.read_text()) == pid
    finally:
        if pidfile.is_file():
            os.kill(int(pidfile.read_text()), signal.SIGTERM)


def _wait_answers(address: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{address}/v2/", timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"no registry answers at {address}")
