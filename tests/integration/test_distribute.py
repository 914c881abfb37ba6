"""imagebuild distribute over real ssh to three real worker engines."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagebuild.engine_docker import DockerEngine
from imagebuild.image import parse_image

from .conftest import HEAD_STORES, NODE_WHEELS, REPO, Bed, MiniStack, full_disk, testbed

pytestmark = pytest.mark.bed



@pytest.fixture
def clean(mini: MiniStack) -> MiniStack:
    """A stack of its own (its first build is cold); workers that hold nothing."""
    testbed.cmd_reset_workers()
    return mini


@pytest.fixture
def built(warm: MiniStack) -> MiniStack:
    """The session's warm stack (images built once, reused by input hash; this test's own
    state and backups); workers that hold nothing. For tests about the transfer."""
    testbed.cmd_reset_workers()
    return warm


def _gen(mini: MiniStack, name: str = "vllm-node-mimo") -> Path:
    """The current backup generation of ``name``: a docker-save directory."""
    parent = mini.root / "backups" / "images" / name
    return parent / (parent / "current").read_text().strip()


def _gen_size(gen: Path) -> int:
    return sum(p.stat().st_size for p in gen.rglob("*") if p.is_file() and not p.is_symlink())


def _blob_bytes(gen: Path, skipped: int) -> int:
    """The bytes of the layer files of the generation ``gen`` above the first ``skipped``
    layers, as the archive holds them (gzip blobs on a containerd-store head)."""
    layers = json.loads((gen / "manifest.json").read_text())[0]["Layers"]
    return sum((gen / name).stat().st_size for name in dict.fromkeys(layers[skipped:])
               if not (gen / name).is_symlink())


def _distribute(mini: MiniStack, *args: str) -> tuple[int, dict[str, object], str]:
    r = mini.cli("distribute", "--json", *args)
    data = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
    return r.returncode, data, r.stderr


def _worker_image(bed: Bed, worker: str, ref: str):  # type: ignore[no-untyped-def]
    r = bed.ssh(worker, "docker", "image", "inspect", ref)
    if r.returncode != 0:
        return None
    return parse_image(json.loads(r.stdout)[0])


def _by(data: dict[str, object], worker: str, image: str) -> dict[str, object]:
    return next(o for o in data["outcomes"]  # type: ignore[union-attr]
                if o["worker"] == worker and o["image"] == image)


@pytest.mark.parametrize("head_store", HEAD_STORES)
def test_cold_fanout_lands_the_identical_image_on_every_worker(built: MiniStack) -> None:
    mini = built
    assert mini.cli("build", "mimo").returncode == 0
    code, data, err = _distribute(mini, "--workers", "3")
    assert code == 0, err
    head = DockerEngine().require("vllm-node-mimo:latest")
    hash_tag = next(t for t in head.tags if not t.endswith(":latest"))
    archive = _gen_size(_gen(mini))
    for w in mini.bed.workers:
        got = _worker_image(mini.bed, w, "vllm-node-mimo:latest")
        assert got is not None and got.fingerprint == head.fingerprint
        # the classic workers name the image by its config; a containerd head by manifest
        assert (got.id == head.id) == (mini.bed.head_store == "classic")
        assert hash_tag in got.tags
        node = _by(data, w, "vllm-node")
        assert node["action"] == "whole archive" and node["ok"]
        mimo = _by(data, w, "vllm-node-mimo")
        assert mimo["action"] == "partial" and mimo["bytes_sent"] < archive / 8
        assert float(node["mb_per_s"]) > 0  # type: ignore[arg-type]
        # what was sent is the layer files as the archive holds them (gzip blobs from a
        # containerd head), plus tar headers, config and manifest
        blobs = _blob_bytes(_gen(mini), int(mimo["layers_skipped"]))  # type: ignore[call-overload]
        assert blobs <= int(mimo["bytes_sent"]) <= blobs + (1 << 20)  # type: ignore[call-overload]
    # a second run sends nothing
    code, data, _ = _distribute(mini, "--workers", "3")
    assert code == 0
    assert all(o["action"] == "up to date" and o["bytes_sent"] == 0
               for o in data["outcomes"])  # type: ignore[union-attr]


def test_a_one_wheel_rebuild_sends_only_mimos_new_layers(clean: MiniStack) -> None:
    mini = clean
    mini.edit_spec(NODE_WHEELS, NODE_WHEELS.replace(", flashinfer-jit-cache]", "]"))
    assert mini.cli("lock").returncode == 0
    assert mini.cli("build", "mimo").returncode == 0
    assert _distribute(mini, "--workers", "3")[0] == 0
    testbed.make_wheel(mini.root / "wheels", "flashinfer-jit-cache", "0.6.12",
                       {"flashinfer_jit_cache/__init__.py": '__version__ = "0.6.12"  # new\n'})
    assert mini.cli("lock").returncode == 0
    r = mini.cli("build", "mimo")
    assert r.returncode == 0 and "built 1" in r.stdout, r.stdout + r.stderr
    code, data, err = _distribute(mini, "--workers", "w1,w3", "mimo")
    assert code == 0, err
    tar = _gen(mini)
    archive = _gen_size(tar)
    for w in ("w1", "w3"):
        o = _by(data, w, "vllm-node-mimo")
        assert o["action"] == "partial"
        sent, skipped = int(o["bytes_sent"]), int(o["layers_skipped"])  # type: ignore[call-overload]
        assert 0 < sent < archive / 8
        assert skipped >= 8
        # the layer files as the archive holds them (compressed on a containerd head),
        # plus tar headers, config and manifest
        blobs = _blob_bytes(tar, skipped)
        assert blobs <= sent <= blobs + (1 << 20), (blobs, sent)
        got = _worker_image(mini.bed, w, "vllm-node-mimo:latest")
        assert got is not None
        assert got.fingerprint == DockerEngine().require("vllm-node-mimo:latest").fingerprint
    assert {o["worker"] for o in data["outcomes"]} == {"w1", "w3"}  # type: ignore[union-attr]


def test_an_unverified_image_is_refused_unless_forced(built: MiniStack) -> None:
    mini = built
    assert mini.cli("build", "--no-backup", "tf5").returncode == 0
    for record in (mini.root / "state" / "verified").glob("*.json"):
        record.unlink()
    code, _, err = _distribute(mini, "--workers", "1", "tf5")
    assert code == 7 and "not verified" in err and "imagebuild verify" in err
    assert mini.bed.ssh("w1", "docker", "images", "-q").stdout.strip() == ""
    code, _data, err = _distribute(mini, "--workers", "1", "--force", "tf5")
    assert code == 0, err


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_killing_one_workers_sshd_mid_transfer_fails_it_alone(built: MiniStack) -> None:
    mini = built
    assert mini.cli("build", "mimo").returncode == 0
    sshd_pid = int((mini.bed.root / "workers" / "w2" / "sshd.pid").read_text())
    env = dict(os.environ, DOCKER_HOST=mini.bed.docker_host, IMAGEBUILD_BED=str(mini.bed.root))
    proc = subprocess.Popen([sys.executable, "-m", "imagebuild", "-f", str(mini.spec),
                             "distribute", "--json", "--workers", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    killed = False
    while time.monotonic() < deadline and proc.poll() is None and not killed:
        tree = _descendants(sshd_pid)
        if any("docker load" in _cmdline(p) for p in tree):
            time.sleep(0.5)  # let some bytes flow
            for p in [sshd_pid, *tree]:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            killed = True
        time.sleep(0.01)
    out, err = proc.communicate(timeout=600)
    assert killed, "the transfer to w2 never started"
    assert proc.returncode == 9, err
    data = json.loads(out)
    assert not data["ok"]
    w2 = [o for o in data["outcomes"] if o["worker"] == "w2"]
    assert w2[0]["action"] == "failed" and "w2" in w2[0]["error"]
    assert all(o["ok"] for o in data["outcomes"] if o["worker"] != "w2")
    assert "distribution failed on w2" in err
    # bring w2's sshd back (the bed's own 'up' is idempotent), nothing partial is tagged
    subprocess.run([sys.executable, str(REPO / "scripts" / "testbed.py"), "up"],
                   check=True, capture_output=True)
    tags = mini.bed.ssh("w2", "docker", "images", "--format", "'{{.Repository}}:{{.Tag}}'")
    assert "vllm-node-mimo" not in tags.stdout and "vllm-node:" not in tags.stdout
    # and a rerun completes it, sending nothing to the others
    code, data, err = _distribute(mini, "--workers", "3")
    assert code == 0, err
    for o in data["outcomes"]:  # type: ignore[union-attr]
        if o["worker"] != "w2":
            assert o["action"] == "up to date" and o["bytes_sent"] == 0
    head = DockerEngine().require("vllm-node-mimo:latest")
    got = _worker_image(mini.bed, "w2", "vllm-node-mimo:latest")
    assert got is not None and got.fingerprint == head.fingerprint


def test_a_wrong_host_key_fails_that_worker_only(built: MiniStack, tmp_path: Path) -> None:
    mini = built
    assert mini.cli("build", "node").returncode == 0
    bed = mini.bed
    known = (bed.root / "ssh" / "known_hosts").read_text().splitlines()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")],
                   check=True)
    fake = (tmp_path / "k.pub").read_text().split()
    known[1] = f"{known[1].split()[0]} {fake[0]} {fake[1]}"  # w2's entry, wrong key
    (tmp_path / "known_hosts").write_text("\n".join(known) + "\n")
    config = (bed.root / "ssh" / "config").read_text().replace(
        str(bed.root / "ssh" / "known_hosts"), str(tmp_path / "known_hosts"))
    (tmp_path / "ssh_config").write_text(config)
    (tmp_path / "cluster.yaml").write_text(
        (bed.root / "cluster.yaml").read_text().replace(str(bed.root / "ssh" / "config"),
                                                        str(tmp_path / "ssh_config")))
    mini.edit_spec("inventory: ${IMAGEBUILD_BED:-/var/lib/imagebuild-bed}/cluster.yaml",
                   f"inventory: {tmp_path / 'cluster.yaml'}")
    code, data, _err = _distribute(mini, "node")
    assert code == 9
    w2 = _by(data, "w2", "vllm-node")
    assert not w2["ok"] and "host key" in str(w2["error"])
    assert _by(data, "w1", "vllm-node")["ok"] and _by(data, "w3", "vllm-node")["ok"]
    assert bed.ssh("w2", "docker", "images", "-q").stdout.strip() == ""


def test_a_worker_out_of_disk_fails_alone_and_a_rerun_completes_it(built: MiniStack) -> None:
    mini = built
    assert mini.cli("build", "node").returncode == 0
    with full_disk(mini.bed, "w3"):
        code, data, err = _distribute(mini, "--workers", "3", "node")
    assert code == 9, err
    w3 = _by(data, "w3", "vllm-node")
    assert not w3["ok"] and w3["action"] == "failed"
    assert "no space left on device" in str(w3["error"]), w3["error"]
    assert "distribution failed on w3" in err
    assert _by(data, "w1", "vllm-node")["ok"] and _by(data, "w2", "vllm-node")["ok"]
    assert mini.bed.ssh("w3", "docker", "images", "-q").stdout.strip() == ""
    # with space again, a rerun sends to w3 only
    code, data, err = _distribute(mini, "--workers", "3", "node")
    assert code == 0, err
    assert _by(data, "w3", "vllm-node")["action"] == "whole archive"
    for w in ("w1", "w2"):
        assert _by(data, w, "vllm-node")["bytes_sent"] == 0


@pytest.mark.parametrize("head_store", HEAD_STORES)
def test_a_containerd_store_worker_gets_only_its_missing_layers(built: MiniStack) -> None:
    """c1 runs Docker 26 on the containerd image store: it refuses a docker-save archive
    with layer files left out, so it gets an OCI layout without the present layers' blobs
    (from either head: the classic one's uncompressed layer.tar files, the containerd
    one's gzip blobs)."""
    mini = built
    mini.edit_spec("inventory: ${IMAGEBUILD_BED:-/var/lib/imagebuild-bed}/cluster.yaml",
                   "inventory: ${IMAGEBUILD_BED:-/var/lib/imagebuild-bed}/cluster-containerd.yaml")
    assert mini.cli("build", "mimo").returncode == 0
    code, data, err = _distribute(mini)
    assert code == 0, err
    head = DockerEngine()
    for name in ("vllm-node", "vllm-node-tf5", "vllm-node-mimo"):
        o = _by(data, "c1", name)
        assert o["ok"] and o["store"] == "containerd", o
        want = head.require(f"{name}:latest")
        got = _worker_image(mini.bed, "c1", f"{name}:latest")
        assert got is not None and got.fingerprint == want.fingerprint
        # the two stores name the same content differently; two containerd stores
        # alike, also for an OCI layout that leaves out layers c1 has (the head's own
        # manifest is sent)
        assert (got.id == want.id) == (mini.bed.head_store == "containerd"), name
        hash_tag = next(t for t in want.tags if not t.endswith(":latest"))
        assert hash_tag in got.tags
    assert _by(data, "c1", "vllm-node")["action"] == "whole archive"
    archive = _gen_size(_gen(mini))
    for name in ("vllm-node-tf5", "vllm-node-mimo"):
        o = _by(data, "c1", name)
        assert o["action"] == "partial" and "OCI layout" in str(o["note"])
        assert int(o["layers_skipped"]) >= 7  # type: ignore[call-overload]
        assert 0 < int(o["bytes_sent"]) < archive / 8  # type: ignore[call-overload]
    code, data, err = _distribute(mini)
    assert code == 0, err
    assert all(o["action"] == "up to date" and o["bytes_sent"] == 0
               for o in data["outcomes"])  # type: ignore[union-attr]


def test_bad_worker_selection_is_a_clear_error(mini: MiniStack) -> None:
    r = mini.cli("distribute", "--workers", "5")
    assert r.returncode == 2 and "the cluster has 3 worker(s)" in r.stderr
    r = mini.cli("distribute", "--workers", "w1,w4")
    assert r.returncode == 2 and "unknown worker 'w4'" in r.stderr


def test_dry_run_sends_nothing(clean: MiniStack) -> None:
    mini = clean
    assert mini.cli("build", "tf5").returncode == 0
    # no backup of the current image, and an older generation whose sidecar is damaged:
    # that one is passed over, not fatal, and the backup is written first
    current = _gen(mini, "vllm-node-tf5")
    subprocess.run(["rm", "-rf", str(current), f"{current}.json"], check=True)
    old = current.parent / "000000000000"
    old.mkdir()
    (old.parent / "000000000000.json").write_text("{ not json")
    r = mini.cli("distribute", "--dry-run", "--workers", "2", "tf5")
    assert r.returncode == 0, r.stderr
    assert "no backup of" in r.stderr and _gen(mini, "vllm-node-tf5") == current
    assert current.is_dir()
    assert "would send" in r.stdout and "w1" in r.stdout and "w3" not in r.stdout
    assert mini.bed.ssh("w1", "docker", "images", "-q").stdout.strip() == ""


def test_a_damaged_backup_generation_is_never_loaded_by_a_worker(clean: MiniStack) -> None:
    """distribute sends the files of the backup generation: its manifest is checked
    against its digest and the image before any byte goes to a worker, a truncated file
    is refused before sending, and a file damaged in place is caught as it streams, before
    its last chunk: the worker's docker load sees a cut archive and loads nothing."""
    mini = clean
    assert mini.cli("build", "node").returncode == 0
    gen = _gen(mini, "vllm-node")
    sidecar = json.loads((gen.parent / f"{gen.name}.json").read_text())
    top = gen / sidecar["layer_files"][-1]
    for what in ("manifest.json", "truncated", "flipped"):
        target = gen / "manifest.json" if what == "manifest.json" else top
        good = target.read_bytes()
        os.chmod(target, 0o644)
        data = bytearray(good)
        if what == "manifest.json":
            # (imagebuild writes each generation's manifest.json itself: spaced JSON)
            found = re.search(rb'"RepoTags":\s*\["vllm-node:', data)
            assert found is not None, data
            at = found.end() - len(b"vllm-node:")
            data[at:at + 9] = b"vllm-nodX"  # another image's tag, same length
        elif what == "truncated":
            data = data[:len(data) // 2]
        else:
            data[len(data) // 2] ^= 1
        target.write_bytes(bytes(data))
        code, _, err = _distribute(mini, "--workers", "2", "node")
        assert code != 0, (what, err)
        assert "is damaged" in err, (what, err)
        if what != "flipped":  # found before a byte was sent
            assert code == 8 and "nothing was" in err, (what, err)
        for w in ("w1", "w2"):
            assert mini.bed.ssh(w, "docker", "images", "-q").stdout.strip() == "", what
        target.write_bytes(good)  # the very bytes again: checked, and sent
    code, _, err = _distribute(mini, "--workers", "1", "node")
    assert code == 0, err


def _built(head: DockerEngine, files: dict[str, bytes]) -> str:
    """Build a context of ``files`` on the head; the image ID."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, content in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(content), 1_700_000_000
            tf.addfile(ti, io.BytesIO(content))
    events = list(head.build(iter([buf.getvalue()]), buildargs={}))
    done = [e for e in events if e.kind == "done"]
    assert done, events
    return done[0].image_id


def test_a_repeated_layer_reaches_a_worker_that_has_its_first_occurrence(
        bed_env: Bed, tmp_path: Path) -> None:
    """An image that adds the same tar twice (with its contents removed in between) has
    one layer twice, and Docker 20.10 saves the second as a link to the first. A worker
    that holds the first gets an archive without it, which must still carry the file the
    second one links to."""
    import io
    import tarfile

    from imagebuild.archive import ArchiveIndex, docker_pieces
    from imagebuild.engine_ssh import SshEngine
    from imagebuild.fsutil import PinnedFile
    from imagebuild.remote import Target

    testbed.cmd_reset_workers()
    head = DockerEngine()
    same = io.BytesIO()
    with tarfile.open(fileobj=same, mode="w") as tf:
        for name, content in (("same/", b""), ("same/a.txt", os.urandom(2048))):
            ti = tarfile.TarInfo(name.rstrip("/"))
            ti.mtime = 1_700_000_000
            if name.endswith("/"):
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            else:
                ti.size = len(content)
            tf.addfile(ti, io.BytesIO(content) if content else None)
    first = f"FROM {testbed.BASE_IMAGE}\nADD same.tar /\n"
    parent_id = _built(head, {"Dockerfile": first.encode(), "same.tar": same.getvalue()})
    image_id = _built(head, {"Dockerfile": (first + "RUN rm -rf /same\nADD same.tar /\n")
                             .encode(), "same.tar": same.getvalue()})
    parent, image = head.require(parent_id), head.require(image_id)
    n = len(parent.diff_ids)
    assert image.diff_ids[:n] == parent.diff_ids
    assert image.diff_ids[n + 1] == image.diff_ids[n - 1]  # the same layer twice
    head.tag(parent.id, "imagebuild-repeat", "parent")
    head.tag(image.id, "imagebuild-repeat", "image")
    worker = SshEngine(Target(name="w1", host="w1", config=str(bed_env.ssh_config)))
    tars = {}
    for tag in ("parent", "image"):
        tars[tag] = tmp_path / f"{tag}.tar"
        with tars[tag].open("wb") as f:
            for chunk in head.save(f"imagebuild-repeat:{tag}"):
                f.write(chunk)
    with PinnedFile.open(tars["parent"]) as p:
        worker.load_archive(docker_pieces(ArchiveIndex.read(p), 0))
    with PinnedFile.open(tars["image"]) as pinned:
        index = ArchiveIndex.read(pinned)
        links = [m for m in index.members if m.link]
        assert links, "docker save wrote no link for the repeated layer"
        pieces = docker_pieces(index, n)  # the worker holds the parent's layers
        worker.load_archive(pieces)
    got = worker.require("imagebuild-repeat:image")
    assert got.fingerprint == image.fingerprint
    for tag in ("parent", "image"):
        head.remove_image(f"imagebuild-repeat:{tag}")
