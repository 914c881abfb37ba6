"""Tar backups, restore-from-tar, and the backup substituter, on the real head engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from imagebuild.engine_docker import DockerEngine
from imagebuild.lock import sha256_file

from .conftest import HEAD_STORES, Bed, MiniStack, testbed

pytestmark = pytest.mark.bed


@pytest.fixture
def mini(warm: MiniStack) -> MiniStack:
    """These tests need built images, not a cold build: the session's warm stack."""
    return warm


def _tags(mini: MiniStack) -> dict[str, str]:
    r = mini.cli("plan", "--json")
    return {i["name"]: i["tag"] for i in json.loads(r.stdout)["images"]}


def _sha(path: Path) -> str:
    return sha256_file(path)


def _rmi(*refs: str) -> None:
    """Lose an image for real: its GC-root holders first (docker rmi refuses a root)."""
    for ref in refs:
        held = subprocess.run(["docker", "ps", "-aq", "--filter", f"ancestor={ref}"],
                              capture_output=True, text=True).stdout.split()
        if held:
            subprocess.run(["docker", "rm", "-f", *held], capture_output=True)
    subprocess.run(["docker", "rmi", *refs], capture_output=True)


def _built(mini: MiniStack, every: bool = False) -> tuple[Path, dict[str, object], str]:
    """The stack built and gated, and mimo's backup written (every image's: ``every``)."""
    r = mini.cli("build", "mimo") if every else mini.cli("build", "--no-backup", "mimo")
    assert r.returncode == 0, r.stderr
    if not every:
        r = mini.cli("backup", "mimo")
        assert r.returncode == 0, r.stderr
    tar = mini.root / "backups" / "vllm-node-mimo.tar"
    sidecar = json.loads((tar.parent / (tar.name + ".json")).read_text())
    return tar, sidecar, _tags(mini)["vllm-node-mimo"]


@pytest.mark.parametrize("head_store", HEAD_STORES)
def test_build_writes_backups_and_restore_gives_the_same_image(mini: MiniStack) -> None:
    tar, sidecar, tag = _built(mini, every=True)
    engine = DockerEngine()
    image_id = engine.require(tag).id
    for name in ("vllm-node", "vllm-node-tf5", "vllm-node-mimo"):
        assert (mini.root / "backups" / f"{name}.tar").is_file()
    assert sidecar["image_id"] == image_id
    assert sidecar["sha256"] == _sha(tar) and sidecar["size"] == tar.stat().st_size
    assert sidecar["input_hash"].startswith(tag.split(":")[1])
    assert sorted(sidecar["tags"]) == sorted([tag, "vllm-node-mimo:latest"])
    assert sidecar["fingerprint"].startswith("sha256:") and sidecar["created"]
    assert not list(tar.parent.glob(".*partial*"))
    _rmi(tag, "vllm-node-mimo:latest")
    assert engine.inspect(image_id) is None
    r = mini.cli("restore-from-tar", "mimo")
    assert r.returncode == 0, r.stderr
    assert "loaded" in r.stdout and "verified" in r.stdout
    assert engine.require(tag).id == image_id
    assert engine.require("vllm-node-mimo:latest").id == image_id
    r = mini.cli("restore-from-tar", "mimo")  # already present: a no-op
    assert r.returncode == 0 and "nothing loaded" in r.stdout
    # an unchanged backup is not rewritten
    mtime = tar.stat().st_mtime_ns
    r = mini.cli("backup", "mimo")
    assert r.returncode == 0 and "up to date" in r.stdout
    assert tar.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("damage, head_store", [("flip", "classic"),
                                                ("truncate", "containerd")])
def test_a_damaged_tar_is_refused_and_nothing_is_loaded(mini: MiniStack, damage: str) -> None:
    tar, sidecar, tag = _built(mini)
    with tar.open("r+b") as f:
        if damage == "flip":
            f.seek(tar.stat().st_size // 2)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0x01]))
        else:
            f.truncate(tar.stat().st_size - 4096)
    _rmi(tag, "vllm-node-mimo:latest")
    r = mini.cli("restore-from-tar", "mimo")
    assert r.returncode == 8, r.stderr
    assert str(tar) in r.stderr and "nothing was loaded" in r.stderr
    assert DockerEngine().inspect(str(sidecar["image_id"])) is None


def test_a_killed_backup_leaves_the_previous_one_intact(mini: MiniStack) -> None:
    tar, first, _ = _built(mini)
    first_sha = _sha(tar)
    tpl = mini.root / "templates" / "vllm-node-mimo.Dockerfile.j2"
    tpl.write_text(tpl.read_text() + "# a new derivation\n")
    assert mini.cli("build", "--no-backup", "mimo").returncode == 0
    assert _sha(tar) == first_sha  # --no-backup wrote nothing
    env = dict(os.environ, DOCKER_HOST=mini.bed.docker_host)
    proc = subprocess.Popen([sys.executable, "-m", "imagebuild", "-f", str(mini.spec), "backup",
                             "mimo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 60
    killed_at = 0
    while time.monotonic() < deadline and proc.poll() is None:
        partial = list(tar.parent.glob(".vllm-node-mimo.tar.*partial"))
        if partial and partial[0].stat().st_size > 0:
            proc.send_signal(signal.SIGKILL)
            killed_at = partial[0].stat().st_size
            break
        time.sleep(0.01)
    proc.wait()
    assert killed_at > 0, "the backup finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    assert _sha(tar) == first_sha  # the previous backup is intact
    assert json.loads((tar.parent / (tar.name + ".json")).read_text()) == first
    # a rerun cleans up and writes the new generation, keeping the previous one
    r = mini.cli("backup", "mimo")
    assert r.returncode == 0, r.stderr
    assert not list(tar.parent.glob(".*partial*"))
    prev = tar.parent / f"vllm-node-mimo@{str(first['input_hash'])[:12]}.tar"
    assert prev.is_file() and _sha(prev) == first_sha
    assert _sha(tar) != first_sha


def test_generations_are_pruned_to_keep(mini: MiniStack) -> None:
    _built(mini)
    tpl = mini.root / "templates" / "vllm-node-mimo.Dockerfile.j2"
    for i in range(2):
        tpl.write_text(tpl.read_text() + f"# generation {i}\n")
        assert mini.cli("build", "mimo").returncode == 0
    olds = sorted(p.name for p in (mini.root / "backups").glob("vllm-node-mimo@*.tar"))
    assert len(olds) == 1  # keep: 2 -> the current tar and one older generation
    assert (mini.root / "backups" / (olds[0] + ".json")).is_file()


def test_a_backup_directory_too_small_is_refused_before_writing(mini: MiniStack) -> None:
    assert mini.cli("build", "--no-backup", "mimo").returncode == 0
    small = mini.root / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(small)], check=True)
    try:
        mini.edit_spec("directory: backups", f"directory: {small}")
        r = mini.cli("backup", "mimo")
        assert r.returncode == 8
        assert "GB free" in r.stderr and "nothing was written" in r.stderr
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_disk_that_fills_up_mid_write_leaves_nothing_half_written(mini: MiniStack) -> None:
    """The free-space check passed (the engine's size claim was low), then the disk filled:
    the partial file goes, the previous tar is untouched, and the error says why."""
    import dataclasses

    from imagebuild.backup import write_backup
    from imagebuild.errors import BackupError
    from imagebuild.progress import Quiet
    from imagebuild.store import LocalDir

    assert mini.cli("build", "node").returncode == 0
    info = DockerEngine().require(_tags(mini)["vllm-node"])
    small = mini.root / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(small)], check=True)
    try:
        previous = small / "vllm-node.tar"
        previous.write_bytes(b"the previous generation")
        with pytest.raises(BackupError) as exc:
            write_backup(LocalDir(small), DockerEngine(), "vllm-node",
                         dataclasses.replace(info, size=1), 2, Quiet())
        assert "No space left on device" in exc.value.message
        assert "nothing was replaced" in exc.value.message
        assert exc.value.exit_code == 8
        assert sorted(p.name for p in small.iterdir()) == ["vllm-node.tar"]
        assert previous.read_bytes() == b"the previous generation"
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_restore_without_the_tar_is_a_clear_error(mini: MiniStack, tmp_path: Path) -> None:
    (mini.root / "backups").mkdir(exist_ok=True)
    r = mini.cli("restore-from-tar")
    assert r.returncode == 8 and "no backups in" in r.stderr, r.stderr
    r = mini.cli("restore-from-tar", "mimo")
    assert r.returncode == 8, r.stderr
    assert f"{mini.root / 'backups' / 'vllm-node-mimo.tar'} does not exist" in r.stderr
    r = mini.cli("restore-from-tar", "--file", str(tmp_path / "absent.tar"))
    assert r.returncode == 8 and "absent.tar does not exist" in r.stderr, r.stderr


def test_an_unverified_image_is_not_backed_up(mini: MiniStack) -> None:
    r = mini.cli("build", "--no-backup", "tf5")
    assert r.returncode == 0
    for record in (mini.root / "state" / "verified").glob("*.json"):
        record.unlink()
    r = mini.cli("backup", "tf5")
    assert r.returncode == 7
    assert "not verified" in r.stderr and "imagebuild verify" in r.stderr
    assert not (mini.root / "backups" / "vllm-node-tf5.tar").exists()


@pytest.mark.parametrize("head_store", HEAD_STORES)
def test_build_restores_a_missing_derivation_from_its_backup(mini: MiniStack) -> None:
    tar, sidecar, tag = _built(mini)
    _rmi(tag, "vllm-node-mimo:latest")
    r = mini.cli("build", "--dry-run", "mimo")
    assert f"restore from {tar}" in r.stdout
    r = mini.cli("build", "mimo")
    assert r.returncode == 0, r.stderr
    assert "built 0, restored 1, reused 2" in r.stdout
    assert DockerEngine().require(tag).id == sidecar["image_id"]


def test_a_remote_ssh_backup_directory_works_against_a_worker(mini: MiniStack) -> None:
    # a directory whose name has a space, beside a file that pruning must not touch
    remote = mini.bed.root / "remote-backups" / f"{mini.root.parent.name} copy"
    remote.mkdir(parents=True)
    decoy = remote.parent / f"{mini.root.parent.name} vllm-node-mimo@keep-me.tar"
    decoy.write_text("not ours")
    mini.edit_spec("directory: backups", f"directory: ssh://w1{remote}")
    try:
        r = mini.cli("build", "mimo")
        assert r.returncode == 0, r.stderr
        assert f"backup written to ssh://w1{remote}/vllm-node-mimo.tar" in r.stderr
        tar = remote / "vllm-node-mimo.tar"
        sidecar = json.loads((remote / "vllm-node-mimo.tar.json").read_text())
        assert sidecar["sha256"] == _sha(tar) and sidecar["size"] == tar.stat().st_size
        assert not list(remote.glob(".*partial*"))
        r = mini.cli("backup", "mimo")
        assert r.returncode == 0 and "up to date" in r.stdout
        tag = _tags(mini)["vllm-node-mimo"]
        _rmi(tag, "vllm-node-mimo:latest")
        r = mini.cli("restore-from-tar", "mimo")
        assert r.returncode == 0, r.stderr
        assert DockerEngine().require(tag).id == sidecar["image_id"]
        # the substituter restores from the remote directory too
        _rmi(tag, "vllm-node-mimo:latest")
        r = mini.cli("build", "mimo")
        assert r.returncode == 0 and "built 0, restored 1, reused 2" in r.stdout, r.stderr
        # generations are kept and pruned there like here, by name, never by parsing ls
        tpl = mini.root / "templates" / "vllm-node-mimo.Dockerfile.j2"
        for i in range(2):
            tpl.write_text(tpl.read_text() + f"# generation {i}\n")
            assert mini.cli("build", "mimo").returncode == 0
        olds = sorted(p.name for p in remote.glob("vllm-node-mimo@*.tar"))
        assert len(olds) == 1 and (remote / (olds[0] + ".json")).is_file()
        assert decoy.read_text() == "not ours"
        # a damaged remote tar is refused, nothing loaded
        sidecar = json.loads((remote / "vllm-node-mimo.tar.json").read_text())
        with tar.open("r+b") as f:
            f.seek(1000)
            f.write(b"X")
        _rmi(*[t for t in DockerEngine().require(sidecar["image_id"]).tags])
        r = mini.cli("restore-from-tar", "mimo")
        assert r.returncode == 8 and "does not match its sidecar" in r.stderr
        assert DockerEngine().inspect(sidecar["image_id"]) is None
    finally:
        subprocess.run(["rm", "-rf", str(remote), str(decoy)])


def test_a_tar_whose_manifest_would_move_a_tag_is_refused_before_loading(
        mini: MiniStack, tmp_path: Path) -> None:
    """A tar and a sidecar that agree (size, sha256), but whose manifest.json would make
    docker load move latest or another image's tag before the gate: nothing is loaded."""
    import hashlib
    import io
    import tarfile

    tar, sidecar, hash_tag = _built(mini)
    base_before = DockerEngine().require("imagebuild-bed/bookworm-python:1").id
    _rmi(hash_tag, "vllm-node-mimo:latest")
    for tag in ("vllm-node-mimo:latest", "imagebuild-bed/bookworm-python:1"):
        crafted = tmp_path / "crafted.tar"
        with tarfile.open(tar) as src, tarfile.open(crafted, "w") as out:
            for m in src.getmembers():
                data = src.extractfile(m).read() if m.isfile() else None  # type: ignore[union-attr]
                if m.name == "manifest.json":
                    manifest = json.loads(data or b"")
                    manifest[0]["RepoTags"] = [tag]
                    data = json.dumps(manifest).encode()
                    m.size = len(data)
                out.addfile(m, io.BytesIO(data) if data is not None else None)
        forged = dict(sidecar, size=crafted.stat().st_size,
                      sha256=hashlib.sha256(crafted.read_bytes()).hexdigest())
        (tmp_path / "crafted.tar.json").write_text(json.dumps(forged))
        r = mini.cli("restore-from-tar", "--file", str(crafted))
        assert r.returncode == 8, r.stderr
        assert f"would tag {tag}" in r.stderr and "nothing was loaded" in r.stderr
        engine = DockerEngine()
        assert engine.inspect(str(sidecar["image_id"])) is None
        assert engine.inspect("vllm-node-mimo:latest") is None
        assert engine.require("imagebuild-bed/bookworm-python:1").id == base_before


@pytest.mark.parametrize("head_store", ["containerd"])
def test_an_incomplete_save_is_refused_and_the_previous_backup_stays(mini: MiniStack) -> None:
    """On the containerd store, docker save leaves out a blob missing from the content
    store (moby#49473). Remove one for real (ctr content rm) and back up again: the
    archive is refused (exit 8) and the previous backup stays, byte for byte."""
    tar, sidecar, _ = _built(mini)
    first_sha = _sha(tar)
    with tarfile.open(tar) as tf:
        f = tf.extractfile("manifest.json")
        assert f is not None
        layers = json.load(f)[0]["Layers"]
    blob = "sha256:" + layers[-1].rsplit("/", 1)[1]  # mimo's top layer, gzip-compressed
    top = DockerEngine().require("vllm-node-mimo:latest").diff_ids[-1]
    assert blob != top  # the blob's digest is not the diff ID: it has to be decompressed
    testbed.ctr(mini.bed.head_node, "content", "rm", blob, capture_output=True)
    try:
        os.utime(tar)  # no longer the file that was written: backup writes it again
        r = mini.cli("backup", "mimo")
        assert r.returncode == 8, r.stdout + r.stderr
        # (docker 26.1 stops at the missing blob: what would follow it is left out too)
        assert "incomplete" in r.stderr and "is not in it" in r.stderr
        assert "previous backup is still in place" in r.stderr and "moby#49473" in r.stderr
        assert _sha(tar) == first_sha
        assert json.loads((tar.parent / (tar.name + ".json")).read_text()) == sidecar
        assert not list(tar.parent.glob(".*partial*"))
    finally:  # give the content store its blob back: load the good backup
        subprocess.run(["docker", "load", "-q", "-i", str(tar)], check=True,
                       capture_output=True)
    r = mini.cli("backup", "mimo")
    assert r.returncode == 0, r.stderr
    assert json.loads((tar.parent / (tar.name + ".json")).read_text())["sha256"] == _sha(tar)


def test_a_backup_restores_on_a_head_of_the_other_store(bed_env: Bed, tmp_path: Path) -> None:
    """A tar the classic head wrote (its image ID is the config's digest) restores on the
    containerd head (which names the image by its manifest): found by hash tag and content
    fingerprint, gated there (records are per image ID), then latest. A stack of its own:
    the builds are not reproducible, so the restored mimo is another content than a
    containerd-head build of the same derivation, and must not replace the warm one."""
    mini = MiniStack(tmp_path / "stack", bed_env, "xstore-" + uuid.uuid4().hex[:8])
    _, sidecar, tag = _built(mini)
    other = mini.on("containerd")
    env = dict(os.environ, DOCKER_HOST=other.bed.docker_host)
    for ref in (tag, "vllm-node-mimo:latest"):  # the containerd head loses mimo, if it had it
        held = subprocess.run(["docker", "ps", "-aq", "--filter", f"ancestor={ref}"], env=env,
                              capture_output=True, text=True).stdout.split()
        if held:
            subprocess.run(["docker", "rm", "-f", *held], env=env, capture_output=True)
    subprocess.run(["docker", "rmi", "-f", tag, "vllm-node-mimo:latest"], env=env,
                   capture_output=True)
    r = other.cli("restore-from-tar", "mimo")
    assert r.returncode == 0, r.stderr
    assert "loaded" in r.stdout and "verified" in r.stdout
    got = json.loads(subprocess.run(["docker", "image", "inspect", "vllm-node-mimo:latest"],
                                    env=env, capture_output=True, text=True,
                                    check=True).stdout)[0]
    assert tag in got["RepoTags"] and got["Id"] != sidecar["image_id"]
    assert tuple(got["RootFS"]["Layers"]) == DockerEngine().require(tag).diff_ids  # same content
    r = other.cli("restore-from-tar", "mimo")  # present (by tag and content): a no-op
    assert r.returncode == 0 and "nothing loaded" in r.stdout, r.stdout
    held = subprocess.run(["docker", "ps", "-aq", "--filter", "label=org.imagebuild.root"],
                          env=env, capture_output=True, text=True).stdout.split()
    for cid in held:  # leave the containerd head as it was: drop this stack's roots
        info = subprocess.run(["docker", "inspect", "--format", "{{.Config.Image}}", cid],
                              env=env, capture_output=True, text=True).stdout
        if "vllm-node-mimo" in info:
            subprocess.run(["docker", "rm", "-f", cid], env=env, capture_output=True)
    subprocess.run(["docker", "rmi", "-f", tag, "vllm-node-mimo:latest"], env=env,
                   capture_output=True)
