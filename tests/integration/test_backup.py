"""Backups as a layer store, restore-from-tar and the backup substituter, on the real
head engines (both image stores) and an ssh:// store on a worker."""

from __future__ import annotations

import hashlib
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
from imagebuild.errors import BackupError, RemoteError
from imagebuild.naming import ADOPTED_LABEL, hash12, input_hash
from imagebuild.spec import SshLocation
from imagebuild.store import SshDir
from imagebuild.storelock import StoreLock

from .conftest import HEAD_STORES, Bed, MiniStack, testbed

pytestmark = pytest.mark.bed

NAMES = ("vllm-node", "vllm-node-tf5", "vllm-node-mimo")


@pytest.fixture
def mini(warm: MiniStack) -> MiniStack:
    """These tests need built images, not a cold build: the session's warm stack."""
    return warm


def _tags(mini: MiniStack) -> dict[str, str]:
    r = mini.cli("plan", "--json")
    return {i["name"]: i["tag"] for i in json.loads(r.stdout)["images"]}


def _rmi(*refs: str, env: dict[str, str] | None = None) -> None:
    """Lose an image for real: its GC-root holders first (docker rmi refuses a root)."""
    for ref in refs:
        held = subprocess.run(["docker", "ps", "-aq", "--filter", f"ancestor={ref}"], env=env,
                              capture_output=True, text=True).stdout.split()
        if held:
            subprocess.run(["docker", "rm", "-f", *held], env=env, capture_output=True)
    subprocess.run(["docker", "rmi", "-f", *refs], env=env, capture_output=True)


def _gen(root: Path, name: str = "vllm-node-mimo") -> tuple[Path, dict[str, object]]:
    """The current generation of ``name`` in the store at ``root``, and its sidecar."""
    parent = root / "images" / name
    h12 = (parent / "current").read_text().strip()
    return parent / h12, json.loads((parent / f"{h12}.json").read_text())


def _blob(root: Path, sidecar: dict[str, object], path: str) -> Path:
    files = sidecar["files"]
    assert isinstance(files, dict)
    return root / "blobs" / "sha256" / files[path][0]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in root.rglob("*") if not p.is_dir()}


def _built(mini: MiniStack, every: bool = False) -> tuple[Path, dict[str, object], str]:
    """The stack built and gated, and mimo's backup written (every image's: ``every``)."""
    r = mini.cli("build", "mimo") if every else mini.cli("build", "--no-backup", "mimo")
    assert r.returncode == 0, r.stderr
    if not every:
        r = mini.cli("backup", "mimo")
        assert r.returncode == 0, r.stderr
    gen, sidecar = _gen(mini.root / "backups")
    return gen, sidecar, _tags(mini)["vllm-node-mimo"]


def _flip(path: Path, at: int) -> None:
    os.chmod(path, 0o644)
    with path.open("r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x01]))


@pytest.mark.parametrize("head_store", HEAD_STORES)
def test_build_backs_up_each_layer_once_and_restore_gives_the_same_image(
        mini: MiniStack, head_store: str) -> None:
    gen, sidecar, tag = _built(mini, every=True)
    root = mini.root / "backups"
    engine = DockerEngine()
    image = engine.require(tag)
    assert sidecar["image_id"] == image.id and sidecar["layers"] == list(image.diff_ids)
    assert str(sidecar["input_hash"]).startswith(tag.split(":")[1])
    assert sorted(sidecar["tags"]) == sorted([tag, "vllm-node-mimo:latest"])  # type: ignore
    # every regular file of the generation is a hard link into the blobs, named by its
    # digest; node's first layer is shared by the three images: one blob, three links
    for path, (digest, size) in sidecar["files"].items():  # type: ignore[attr-defined]
        f = gen / path
        assert f.stat().st_size == size and f.samefile(root / "blobs" / "sha256" / digest)
    base = _blob(root, sidecar, sidecar["layer_files"][0])  # type: ignore[index]
    assert base.stat().st_nlink == 1 + len(NAMES)
    unique = {p.name: p.stat().st_size for p in (root / "blobs" / "sha256").iterdir()}
    per_image = sum(sum(s for _d, s in _gen(root, n)[1]["files"].values())  # type: ignore
                    for n in NAMES)
    assert sum(unique.values()) < 0.6 * per_image  # tars would hold the base three times
    assert not list((root / "blobs" / ".incoming").iterdir())
    # restored from the store: the same image, verified, latest moved
    _rmi(tag, "vllm-node-mimo:latest")
    assert engine.inspect(image.id) is None
    r = mini.cli("restore-from-tar", "mimo")
    assert r.returncode == 0, r.stderr
    assert "loaded" in r.stdout and "verified" in r.stdout
    assert engine.require(tag).id == image.id
    assert engine.require("vllm-node-mimo:latest").id == image.id
    r = mini.cli("restore-from-tar", "mimo")  # already present: a no-op
    assert r.returncode == 0 and "nothing loaded" in r.stdout
    before = _tree(root)
    r = mini.cli("backup")  # unchanged: nothing written
    assert r.returncode == 0 and r.stdout.count("up to date") == len(NAMES), r.stdout
    assert _tree(root) == before
    # the documented one-liner, into the other head (which has never seen this image)
    other = mini.on(next(s for s in HEAD_STORES if s != head_store)).bed
    env = dict(os.environ, DOCKER_HOST=other.docker_host)
    _rmi(tag, env=env)
    tar = subprocess.Popen(["tar", "--hard-dereference", "-C", str(gen), "-chf", "-", "."],
                           stdout=subprocess.PIPE)
    load = subprocess.run(["docker", "load"], stdin=tar.stdout, env=env,
                          capture_output=True, text=True, timeout=600)
    assert tar.stdout is not None
    tar.stdout.close()
    assert tar.wait() == 0 and load.returncode == 0, load.stderr
    assert f"Loaded image: {tag}" in load.stdout
    try:
        loaded = DockerEngine(other.docker_host).require(tag)
        assert loaded.fingerprint == image.fingerprint and loaded.labels == image.labels
    finally:
        _rmi(tag, env=env)
    # imagebuild export: a plain tar and its sidecar, which plain docker load takes on the
    # other head, and restore-from-tar --file checks
    out = mini.root / "exported"
    out.mkdir()
    r = mini.cli("export", "mimo", "-o", str(out))
    assert r.returncode == 0, r.stderr
    tarfile_ = out / "vllm-node-mimo.tar"
    assert sorted(p.name for p in out.iterdir()) == [tarfile_.name, tarfile_.name + ".json"]
    assert f"-> {tarfile_}" in r.stdout
    load = subprocess.run(["docker", "load", "-i", str(tarfile_)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert load.returncode == 0 and f"Loaded image: {tag}" in load.stdout, load.stderr
    try:
        loaded = DockerEngine(other.docker_host).require(tag)
        assert loaded.fingerprint == image.fingerprint
    finally:
        _rmi(tag, env=env)
    _rmi(tag, "vllm-node-mimo:latest")
    r = mini.cli("restore-from-tar", "--file", str(tarfile_))
    assert r.returncode == 0 and "verified" in r.stdout, r.stderr
    assert engine.require("vllm-node-mimo:latest").id == image.id


@pytest.mark.parametrize("damage, head_store", [("flip", "classic"),
                                                ("truncate", "containerd")])
def test_a_damaged_layer_is_refused_named_and_nothing_is_loaded(
        mini: MiniStack, damage: str) -> None:
    gen, sidecar, tag = _built(mini)
    root = mini.root / "backups"
    layer = str(sidecar["layer_files"][-1])  # type: ignore[index]
    blob = _blob(root, sidecar, layer)
    if damage == "flip":
        _flip(blob, blob.stat().st_size // 2)
    else:
        os.chmod(blob, 0o644)
        os.truncate(blob, blob.stat().st_size // 2)
    _rmi(tag, "vllm-node-mimo:latest")
    r = mini.cli("restore-from-tar", "mimo")
    assert r.returncode == 8, r.stderr
    assert f"{gen}/{layer} is damaged" in r.stderr and "nothing was loaded" in r.stderr
    assert f"vllm-node-mimo {sidecar['hash12']}" in r.stderr and "rebuild" in r.stderr
    assert DockerEngine().inspect(str(sidecar["image_id"])) is None
    # export stops at the damage too, and leaves no file
    out = mini.root / "exported"
    out.mkdir()
    r = mini.cli("export", "mimo", "-o", str(out))
    assert r.returncode == 8 and f"{layer} is damaged" in r.stderr, r.stderr
    assert list(out.iterdir()) == []
    # the whole store checked: the blob and every generation that uses it, exit 8
    r = mini.cli("backup", "--check")
    assert r.returncode == 8, r.stdout + r.stderr
    assert f"DAMAGED blob sha256:{blob.name[:12]}, used by vllm-node-mimo" in r.stdout
    assert "cannot be restored or sent" in r.stderr


def test_a_killed_backup_leaves_the_previous_generation_intact(mini: MiniStack) -> None:
    gen, first, _ = _built(mini)
    root = mini.root / "backups"
    tpl = mini.root / "templates" / "vllm-node-mimo.Dockerfile.j2"
    # a new derivation with a new 64 MB layer: its blob is being written when the kill
    # lands (a comment alone changes only a few small files, written in a blink)
    tpl.write_text(tpl.read_text() + "RUN head -c 64000000 /dev/urandom > /var/tmp/filler\n")
    assert mini.cli("build", "--no-backup", "mimo").returncode == 0
    before = _tree(root)
    env = dict(os.environ, DOCKER_HOST=mini.bed.docker_host)
    proc = subprocess.Popen([sys.executable, "-m", "imagebuild", "-f", str(mini.spec), "backup",
                             "mimo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    incoming = root / "blobs" / ".incoming"
    deadline = time.monotonic() + 60
    killed_at = 0
    while time.monotonic() < deadline and proc.poll() is None:
        partial = [p for p in incoming.iterdir() if p.stat().st_size > 0]
        if partial:
            proc.send_signal(signal.SIGKILL)
            killed_at = partial[0].stat().st_size
            break
        time.sleep(0.005)
    proc.wait()
    assert killed_at > 0, "the backup finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    after = _tree(root)
    # the previous generation, its sidecar and current are as they were; only the
    # incoming file (and maybe whole new blobs no generation links) were added
    assert {k: v for k, v in after.items() if k.startswith("images/")} == {
        k: v for k, v in before.items() if k.startswith("images/")}
    assert _gen(root) == (gen, first)
    r = mini.cli("backup", "mimo")  # a rerun cleans up and writes the new generation
    assert r.returncode == 0, r.stderr
    assert not list(incoming.iterdir())
    new, sidecar = _gen(root)
    assert new != gen and gen.is_dir() and sidecar["hash12"] != first["hash12"]


def test_generations_are_pruned_to_keep_and_shared_layers_stay(mini: MiniStack) -> None:
    gen, first, _ = _built(mini)
    root = mini.root / "backups"
    first_top = _blob(root, first, str(first["layer_files"][-1]))  # type: ignore[index]
    base = _blob(root, first, str(first["layer_files"][0]))  # type: ignore[index]
    tpl = mini.root / "templates" / "vllm-node-mimo.Dockerfile.j2"
    for i in range(2):
        tpl.write_text(tpl.read_text() + f"# generation {i}\n")
        r = mini.cli("build", "mimo")
        assert r.returncode == 0, r.stderr
    kept = sorted(p.name for p in (root / "images" / "vllm-node-mimo").iterdir() if p.is_dir())
    assert len(kept) == 2 and gen.name not in kept  # keep: 2
    assert not (gen.parent / f"{gen.name}.json").exists() and not gen.exists()
    assert not first_top.exists()  # the dropped generation's own layer is gone
    assert base.is_file()  # the base the other generations and images share stays
    assert f"dropped older generation {gen.name}" in r.stderr, r.stderr


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
        assert _tree(small) == {}
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_disk_that_fills_up_mid_write_leaves_nothing_half_written(mini: MiniStack) -> None:
    """The free-space check passed (the engine's size claim was low), then the disk filled:
    the incoming file and the blobs of this run go, and the error says why."""
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
        (small / "keep-me").write_bytes(b"someone else's file")
        with pytest.raises(BackupError) as exc:
            write_backup(LocalDir(small), DockerEngine(), "vllm-node",
                         dataclasses.replace(info, size=1), 2, Quiet())
        assert "No space left on device" in exc.value.message
        assert "previous generations are intact" in exc.value.message
        assert exc.value.exit_code == 8
        assert list(_tree(small)) == ["keep-me"]
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_restore_without_a_backup_is_a_clear_error(mini: MiniStack, tmp_path: Path) -> None:
    (mini.root / "backups").mkdir(exist_ok=True)
    r = mini.cli("restore-from-tar")
    assert r.returncode == 8 and "no backups in" in r.stderr, r.stderr
    r = mini.cli("restore-from-tar", "mimo")
    assert r.returncode == 8, r.stderr
    assert f"{mini.root / 'backups'} holds no backup of vllm-node-mimo" in r.stderr
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
    assert not (mini.root / "backups" / "images" / "vllm-node-tf5").exists()


@pytest.mark.parametrize("head_store", HEAD_STORES)
def test_build_restores_a_missing_derivation_from_its_backup(mini: MiniStack) -> None:
    gen, sidecar, tag = _built(mini)
    _rmi(tag, "vllm-node-mimo:latest")
    r = mini.cli("build", "--dry-run", "mimo")
    assert f"restore from {gen}" in r.stdout, r.stdout
    r = mini.cli("build", "mimo")
    assert r.returncode == 0, r.stderr
    assert "built 0, restored 1, reused 2" in r.stdout
    assert DockerEngine().require(tag).id == sidecar["image_id"]


def test_a_remote_store_whose_own_directory_points_elsewhere_is_refused(bed: Bed) -> None:
    """Over ssh as on this host: a symlink (or a file) where the store keeps its blobs,
    leftovers, images or locks is refused (exit 8) before anything is written or removed
    (one round trip, nothing followed)."""
    remote = bed.root / "remote-backups" / f"layout-{uuid.uuid4().hex[:8]} x"
    elsewhere = remote.parent / f"{remote.name} elsewhere"
    try:
        for d in ("blobs/sha256", "blobs/.incoming", "images/vllm-node", "locks"):
            (remote / d).mkdir(parents=True)
        elsewhere.mkdir()
        (elsewhere / ("a" * 64)).write_text("not the store's")
        there = SshDir(SshLocation(host="w1", path=str(remote)), str(bed.ssh_config))
        with StoreLock(there, "shared", "a backup"):
            pass
        assert there.not_directories(["blobs", "nothing-here"], "images") == []
        for path in ("blobs/.incoming", "blobs/sha256", "images/vllm-node", "locks"):
            target = remote / path
            os.rename(target, remote / "moved")
            target.symlink_to(elsewhere, target_is_directory=True)
            with pytest.raises(BackupError) as info:
                StoreLock(there, "exclusive", "pruning").acquire()
            assert info.value.exit_code == 8, path
            assert f"{path} is not a directory of the store's own" in info.value.message
            target.unlink()
            os.rename(remote / "moved", target)
        (remote / "images" / "a file").write_text("x")
        assert there.not_directories([], "images") == ["images/a file"]
        # reading a FIFO (it would hold cat forever) or a device is refused at once
        os.mkfifo(remote / "blobs" / "fifo")
        os.symlink("/dev/zero", remote / "blobs" / "zero")
        for name in ("blobs/fifo", "blobs/zero"):
            with pytest.raises(RemoteError, match="not a regular file"):
                list(there.read(name))
        assert (elsewhere / ("a" * 64)).read_text() == "not the store's"
        assert sorted(p.name for p in elsewhere.iterdir()) == ["a" * 64]
    finally:
        subprocess.run(["rm", "-rf", str(remote), str(elsewhere)])


def test_a_remote_ssh_store_works_against_a_worker(mini: MiniStack) -> None:
    # a directory whose name has a space, beside a file that pruning must not touch
    remote = mini.bed.root / "remote-backups" / f"{mini.root.parent.name} copy"
    remote.mkdir(parents=True)
    decoy = remote.parent / f"{mini.root.parent.name} blobs"
    decoy.write_text("not ours")
    mini.edit_spec("directory: backups", f"directory: ssh://w1{remote}")
    try:
        r = mini.cli("build", "mimo")
        assert r.returncode == 0, r.stderr
        gen, sidecar = _gen(remote)
        assert f"backup written to ssh://w1{gen}" in r.stderr
        for path, (digest, _size) in sidecar["files"].items():  # type: ignore[attr-defined]
            assert (gen / path).samefile(remote / "blobs" / "sha256" / digest)
        base = _blob(remote, sidecar, str(sidecar["layer_files"][0]))  # type: ignore[index]
        assert base.stat().st_nlink == 1 + len(NAMES)  # one blob for the three images
        assert not list((remote / "blobs" / ".incoming").iterdir())
        # a blob another run put there first is kept, its links with it (over ssh too)
        there = SshDir(SshLocation(host="w1", path=str(remote)), str(mini.bed.ssh_config))
        rel = str(base.relative_to(remote))
        for name in ("blobs/.incoming/same", "blobs/.incoming/new"):
            (remote / name).write_bytes(b"the same digest, written again")
        inode = base.stat().st_ino
        assert there.place("blobs/.incoming/same", rel) is False
        assert base.stat().st_ino == inode and base.stat().st_nlink == 1 + len(NAMES)
        assert there.place("blobs/.incoming/new", "blobs/placed") is True
        (remote / "blobs" / "placed").unlink()
        assert not list((remote / "blobs" / ".incoming").iterdir())
        r = mini.cli("backup", "mimo")
        assert r.returncode == 0 and "up to date" in r.stdout
        tag = _tags(mini)["vllm-node-mimo"]
        _rmi(tag, "vllm-node-mimo:latest")
        r = mini.cli("restore-from-tar", "mimo")
        assert r.returncode == 0, r.stderr
        assert DockerEngine().require(tag).id == sidecar["image_id"]
        # the substituter restores from the remote store too
        _rmi(tag, "vllm-node-mimo:latest")
        r = mini.cli("build", "mimo")
        assert r.returncode == 0 and "built 0, restored 1, reused 2" in r.stdout, r.stderr
        # distribute plans from the remote store too (the archive it would send is read
        # over ssh as it goes, through the same reader the restore above streamed through)
        r = mini.cli("distribute", "--json", "--dry-run", "--workers", "1", "mimo")
        assert r.returncode == 0, r.stderr
        planned = json.loads(r.stdout)["outcomes"]
        assert [o["worker"] for o in planned] == ["w1"] and planned[0]["ok"], planned
        assert planned[0]["bytes_planned"] > 0, planned
        # a one-line change writes only mimo's new layer there; generations beyond keep
        # (1 here, so one rebuild shows it) are pruned there
        mini.edit_spec("  keep: 2", "  keep: 1")
        tpl = mini.root / "templates" / "vllm-node-mimo.Dockerfile.j2"
        tpl.write_text(tpl.read_text() + "# generation 1\n")
        r = mini.cli("build", "mimo")
        assert r.returncode == 0, r.stderr
        kept = [p for p in (remote / "images" / "vllm-node-mimo").iterdir() if p.is_dir()]
        # the base: one blob, linked by node, tf5 and the one mimo generation kept
        assert len(kept) == 1 and not gen.exists() and base.stat().st_nlink == 1 + 3
        assert decoy.read_text() == "not ours"
        # a damaged remote blob is refused, nothing loaded; the check names it there too
        gen, sidecar = _gen(remote)
        top = str(sidecar["layer_files"][-1])  # type: ignore[index]
        _flip(_blob(remote, sidecar, top), 1000)
        _rmi(*DockerEngine().require(str(sidecar["image_id"])).tags)
        r = mini.cli("restore-from-tar", "mimo")
        assert r.returncode == 8 and f"{top} is damaged" in r.stderr, r.stderr
        assert DockerEngine().inspect(str(sidecar["image_id"])) is None
        r = mini.cli("backup", "--check")
        assert r.returncode == 8 and "DAMAGED blob" in r.stdout, r.stdout + r.stderr
    finally:
        subprocess.run(["rm", "-rf", str(remote), str(decoy)])
        testbed.cmd_reset_workers()


def _as_tar(gen: Path, sidecar: dict[str, object], dest: Path) -> Path:
    """The generation as a tar backup from before the layer store, with its sidecar."""
    # member names as docker save writes them (no "./"), manifest.json last
    names = sorted(os.listdir(gen), key=lambda n: (n == "manifest.json", n))
    subprocess.run(["tar", "-C", str(gen), "-cf", str(dest), *names], check=True)
    return _with_sidecar(dest, sidecar)


def _with_sidecar(tar: Path, sidecar: dict[str, object]) -> Path:
    """``tar`` with the sidecar a tar backup of mimo has, agreeing with its bytes."""
    data = tar.read_bytes()
    tar.with_name(tar.name + ".json").write_text(json.dumps({
        "image": "vllm-node-mimo", "image_id": sidecar["image_id"],
        "fingerprint": sidecar["fingerprint"], "input_hash": sidecar["input_hash"],
        "tags": sidecar["tags"], "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(), "created": sidecar["created"],
        "mtime_ns": tar.stat().st_mtime_ns}))
    return tar


def test_tar_backups_from_before_the_store_restore_and_are_imported(mini: MiniStack) -> None:
    gen, sidecar, tag = _built(mini)
    root = mini.root / "backups"
    tar = _as_tar(gen, sidecar, root / "vllm-node-mimo.tar")
    subprocess.run(["rm", "-rf", str(root / "images" / "vllm-node-mimo")], check=True)
    _rmi(tag, "vllm-node-mimo:latest")
    r = mini.cli("restore-from-tar", "mimo")
    assert r.returncode == 0, r.stderr
    assert DockerEngine().require(tag).id == sidecar["image_id"]
    r = mini.cli("backup", "mimo")
    assert r.returncode == 0, r.stderr
    assert f"imported {tar.name} into the layer store" in r.stdout
    assert not tar.exists() and not tar.with_name(tar.name + ".json").exists()
    new, again = _gen(root)
    assert new == gen and again["image_id"] == sidecar["image_id"]


def test_a_tar_whose_manifest_would_move_a_tag_is_refused_before_loading(
        mini: MiniStack, tmp_path: Path) -> None:
    """A tar and a sidecar that agree (size, sha256), but whose manifest.json would make
    docker load move latest or another image's tag before the gate: nothing is loaded."""
    gen, sidecar, hash_tag = _built(mini)
    base_before = DockerEngine().require("imagebuild-bed/bookworm-python:1").id
    _rmi(hash_tag, "vllm-node-mimo:latest")
    for tag in ("vllm-node-mimo:latest", "imagebuild-bed/bookworm-python:1"):
        copy = tmp_path / "gen"
        subprocess.run(["cp", "-r", str(gen), str(copy)], check=True)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest[0]["RepoTags"] = [tag]
        os.chmod(copy / "manifest.json", 0o644)
        (copy / "manifest.json").unlink()
        (copy / "manifest.json").write_text(json.dumps(manifest))
        crafted = _as_tar(copy, sidecar, tmp_path / "crafted.tar")
        subprocess.run(["rm", "-rf", str(copy)], check=True)
        r = mini.cli("restore-from-tar", "--file", str(crafted))
        assert r.returncode == 8, r.stderr
        assert f"would tag {tag}" in r.stderr and "nothing was loaded" in r.stderr
        engine = DockerEngine()
        assert engine.inspect(str(sidecar["image_id"])) is None
        assert engine.inspect("vllm-node-mimo:latest") is None
        assert engine.require("imagebuild-bed/bookworm-python:1").id == base_before


def _gnu_member(ti: tarfile.TarInfo, data: bytes = b"", atime: bool = False) -> bytes:
    """One member as GNU tar writes it; ``atime``: with the atime field set, where a
    POSIX ustar header keeps a name prefix."""
    ti.size = len(data) if ti.isfile() else 0
    header = bytearray(ti.tobuf(tarfile.GNU_FORMAT))
    if atime:
        header[-512 + 345:-512 + 357] = b"14734236340\0"
        header[-512 + 148:-512 + 156] = b" " * 8
        header[-512 + 148:-512 + 156] = b"%06o\0 " % sum(header[-512:])
    return bytes(header) + data + b"\0" * (-len(data) % 512)


def _crafted(gen: Path, sidecar: dict[str, object], dest: Path, variant: str) -> Path:
    """The generation as a tar backup whose manifest.json is the sidecar's, followed at
    once by a second way to give docker load a manifest that tags vllm-node:latest and
    the base (each a way the reader once let through); the sidecar agrees with it."""
    manifest = json.loads((gen / "manifest.json").read_text())
    manifest[0]["RepoTags"] = ["vllm-node:latest", "imagebuild-bed/bookworm-python:1"]
    bad = json.dumps(manifest).encode()
    with dest.open("wb") as out:
        out.write(_gnu_member(tarfile.TarInfo("manifest.json"),
                              (gen / "manifest.json").read_bytes()))
        if variant == "./manifest.json":
            out.write(_gnu_member(tarfile.TarInfo("./manifest.json"), bad))
        elif variant == "gnu atime":
            out.write(_gnu_member(tarfile.TarInfo("manifest.json"), bad, atime=True))
        elif variant == "large":
            out.write(_gnu_member(tarfile.TarInfo("manifest.json"), bad + b" " * (4 << 20)))
        elif variant in ("hard link", "symlink"):  # manifest.json again, as a link
            out.write(_gnu_member(tarfile.TarInfo("repositories"), bad))
            link = tarfile.TarInfo("manifest.json")
            link.type = tarfile.LNKTYPE if variant == "hard link" else tarfile.SYMTYPE
            link.linkname = "repositories"
            out.write(_gnu_member(link))
        for path in sorted(gen.rglob("*")):
            rel = str(path.relative_to(gen))
            if rel == "manifest.json":
                continue
            ti = tarfile.TarInfo(rel)
            if path.is_symlink():
                ti.type, ti.linkname = tarfile.SYMTYPE, os.readlink(path)
                out.write(_gnu_member(ti))
            elif path.is_dir():
                ti.type = tarfile.DIRTYPE
                out.write(_gnu_member(ti))
            else:
                out.write(_gnu_member(ti, path.read_bytes()))
        out.write(b"\0" * 1024)
    return _with_sidecar(dest, sidecar)


def _every_tag() -> list[str]:
    r = subprocess.run(["docker", "images", "--no-trunc", "--format",
                        "{{.Repository}}:{{.Tag}} {{.ID}}"], capture_output=True, text=True,
                       check=True)
    return sorted(r.stdout.splitlines())


@pytest.mark.parametrize("head_store", HEAD_STORES)
def test_a_tar_with_a_second_way_to_name_its_manifest_moves_no_tag(
        mini: MiniStack, tmp_path: Path, head_store: str) -> None:
    """restore-from-tar --file with a tar and sidecar that agree, whose manifest.json is
    the image's own but which also names a manifest that would move vllm-node:latest and
    the base: refused (exit 8) before docker load gets it, on either image store, and no
    image's tags, the base's included, change."""
    gen, sidecar, hash_tag = _built(mini)
    _rmi(hash_tag, "vllm-node-mimo:latest")  # so that restore loads it, not a no-op
    before = _every_tag()
    assert any(t.startswith("vllm-node:latest ") for t in before)
    for variant in ("./manifest.json", "gnu atime", "hard link", "symlink", "large"):
        crafted = _crafted(gen, sidecar, tmp_path / "crafted.tar", variant)
        r = mini.cli("restore-from-tar", "--file", str(crafted))
        assert r.returncode == 8, (variant, r.stdout + r.stderr)
        assert "nothing was loaded" in r.stderr, (variant, r.stderr)
        assert _every_tag() == before, variant
    # the tar without the second manifest: loads, and tags only what its sidecar names
    r = mini.cli("restore-from-tar", "--file", str(_crafted(gen, sidecar, tmp_path /
                                                             "good.tar", "none")))
    assert r.returncode == 0, r.stdout + r.stderr
    after = _every_tag()
    added = {t.split()[0] for t in set(after) - set(before)}
    assert set(before) <= set(after) and hash_tag in added
    assert added <= {hash_tag, "vllm-node-mimo:latest"}, added  # latest: after the gate


@pytest.mark.parametrize("head_store", ["containerd"])
def test_an_incomplete_save_is_refused_and_nothing_is_kept(mini: MiniStack,
                                                           tmp_path: Path) -> None:
    """On the containerd store, docker save leaves out a blob missing from the content
    store (moby#49473). Remove one for real (ctr content rm) and back up again: the
    archive is refused (exit 8), no generation appears and no new blob stays."""
    gen, sidecar, _ = _built(mini)
    root = mini.root / "backups"
    good = _as_tar(gen, sidecar, tmp_path / "good.tar")  # to give the blob back after
    top = str(sidecar["layer_files"][-1])  # type: ignore[index]
    blob = "sha256:" + top.rsplit("/", 1)[1]  # mimo's top layer, gzip-compressed
    assert blob != DockerEngine().require("vllm-node-mimo:latest").diff_ids[-1]
    subprocess.run(["rm", "-rf", str(gen), f"{gen}.json"], check=True)
    before = _tree(root)
    testbed.ctr(mini.bed.head_node, "content", "rm", blob, capture_output=True)
    try:
        # Docker 28.5 names the image by another ID once its content lacks a blob: the
        # gate knows no record for that ID yet (the image still runs: verify passes)
        r = mini.cli("verify", "mimo")
        assert r.returncode == 0, r.stdout + r.stderr
        r = mini.cli("backup", "mimo")
        assert r.returncode == 8, r.stdout + r.stderr
        # (docker 26.1 stops at the missing blob: what would follow it is left out too;
        # docker 28.5 leaves out the image's config as well)
        assert "incomplete" in r.stderr and "is not in it" in r.stderr
        assert "moby#49473" in r.stderr
        assert not gen.exists() and not Path(f"{gen}.json").exists()
        assert {k: v for k, v in _tree(root).items() if ".incoming" not in k} == before
        assert not list((root / "blobs" / ".incoming").iterdir())
    finally:  # give the content store its blob back: load the good archive
        subprocess.run(["docker", "load", "-q", "-i", str(good)], check=True,
                       capture_output=True)
    assert mini.cli("verify", "mimo").returncode == 0  # 28.5: under its first ID again
    r = mini.cli("backup", "mimo")
    assert r.returncode == 0, r.stderr
    assert _gen(root)[0] == gen


def test_a_backup_restores_on_a_head_of_the_other_store(bed_env: Bed, tmp_path: Path) -> None:
    """A generation the classic head wrote (its image ID is the config's digest) restores
    on the containerd head (which names the image by its manifest): found by hash tag and
    content fingerprint, gated there (records are per image ID), then latest. A stack of
    its own: the builds are not reproducible, so the restored mimo is another content
    than a containerd-head build of the same derivation, and must not replace the warm
    one."""
    mini = MiniStack(tmp_path / "stack", bed_env, "xstore-" + uuid.uuid4().hex[:8])
    # built and backed up in one save: on the classic head, a layer two images hold
    # with the same content is saved once and linked from the other's directory, which
    # the containerd store's docker load does not follow: the restore stream sends it as
    # a copy. (Since the install groups, the test stack's images no longer repeat a
    # layer (mimo's copy of node's torch requirements was one); the link itself is
    # covered in the unit tier, test_layerstore and test_archive_directory.)
    _, sidecar, tag = _built(mini, every=True)
    other = mini.on("containerd")
    env = dict(os.environ, DOCKER_HOST=other.bed.docker_host)
    _rmi(tag, "vllm-node-mimo:latest", env=env)  # the containerd head loses mimo, if it had it
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


@pytest.mark.parametrize("head_store", HEAD_STORES)
def test_what_the_field_has_is_adopted_only_through_its_gate(warm: MiniStack,
                                                             tmp_path: Path) -> None:
    """A field tar (plain docker save, no sidecar) and an image in the engine (the field's
    own tag) become generations of the spec's images only if their checks pass; the
    adopted image is distributed and rolled back to like a built one."""
    mini = warm
    testbed.cmd_reset_workers()
    r = mini.cli("build", "mimo")
    assert r.returncode == 0, r.stderr
    engine = DockerEngine()
    node, mimo = engine.require("vllm-node:latest"), engine.require("vllm-node-mimo:latest")
    env = dict(os.environ, DOCKER_HOST=mini.bed.docker_host)
    # an image without torch (the bed's base), saved as the field saves: refused without
    # --adopt (which the refusal names), and its gate fails with it: nothing moves
    base_tar = tmp_path / "base.tar"
    subprocess.run(["docker", "save", "-o", str(base_tar), "imagebuild-bed/bookworm-python:1"],
                   env=env, check=True)
    r = mini.cli("restore-from-tar", "--file", str(base_tar))
    assert r.returncode == 8 and "--adopt" in r.stderr, r.stderr
    gens = sorted(p.name for p in (mini.root / "backups" / "images" / "vllm-node").iterdir())
    r = mini.cli("restore-from-tar", "node", "--file", str(base_tar), "--adopt")
    assert r.returncode == 1 and "NOT adopted" in r.stdout, r.stdout + r.stderr
    assert engine.require("vllm-node:latest").id == node.id
    assert not any(":adopt-" in t for i in engine.snapshot().images for t in i.tags)
    assert sorted(p.name for p in (mini.root / "backups" / "images" / "vllm-node").iterdir()
                  ) == gens
    # mimo saved by hand: loaded under quarantine (its own vllm-node-mimo:latest tag is
    # not applied by the load), labelled, verified, then latest
    mimo_tar = tmp_path / "vllm-node-mimo.tar"
    subprocess.run(["docker", "save", "-o", str(mimo_tar), "vllm-node-mimo:latest"],
                   env=env, check=True)
    r = mini.cli("restore-from-tar", "--file", str(mimo_tar), "--adopt")
    assert r.returncode == 0 and "adopted" in r.stdout, r.stdout + r.stderr
    adopted = engine.require("vllm-node-mimo:latest")
    assert adopted.id != mimo.id and adopted.labels[ADOPTED_LABEL] == mimo.fingerprint
    r = mini.cli("rollback", "mimo", "--to", hash12(input_hash(mimo) or ""))
    assert r.returncode == 0 and engine.require("vllm-node-mimo:latest").id == mimo.id
    # the field's own tag of node adopted, sent to a worker, rolled back from and to
    subprocess.run(["docker", "tag", "vllm-node:latest", "field/vllm-node:1"], env=env,
                   check=True)
    try:
        r = mini.cli("adopt", "field/vllm-node:1", "--as", "node")
        assert r.returncode == 0 and "adopted field/vllm-node:1" in r.stdout, r.stderr
        mine = engine.require("vllm-node:latest")
        assert mine.labels[ADOPTED_LABEL] == node.fingerprint
        r = mini.cli("distribute", "--json", "--workers", "1", "node")
        assert r.returncode == 0, r.stderr
        got = mini.bed.ssh("w1", "docker", "image", "inspect", "vllm-node:latest")
        assert got.returncode == 0, got.stderr
        labels = json.loads(got.stdout)[0]["Config"]["Labels"]
        assert labels[ADOPTED_LABEL] == node.fingerprint, labels
        r = mini.cli("rollback", "node", "--to", hash12(input_hash(node) or ""))
        assert r.returncode == 0 and engine.require("vllm-node:latest").id == node.id
        r = mini.cli("rollback", "node", "--to", hash12(input_hash(mine) or ""))
        assert r.returncode == 0 and engine.require("vllm-node:latest").id == mine.id
    finally:
        mini.cli("rollback", "node", "--to", hash12(input_hash(node) or ""))
        subprocess.run(["docker", "rmi", "field/vllm-node:1"], env=env, capture_output=True)
        testbed.cmd_reset_workers()


def test_backups_started_together_share_the_store(mini: MiniStack) -> None:
    """Two backups of a new generation and a third that prunes (keep: 1), at once: each
    ends well or with the lock's message (exit 12), never anything else, and the store
    checks clean after, its locks gone."""
    _built(mini)
    root = mini.root / "backups"
    mini.edit_spec("  keep: 2", "  keep: 1")
    tpl = mini.root / "templates" / "vllm-node-mimo.Dockerfile.j2"
    tpl.write_text(tpl.read_text() + "RUN head -c 32000000 /dev/urandom > /var/tmp/filler\n")
    assert mini.cli("build", "--no-backup", "mimo").returncode == 0
    env = dict(os.environ, DOCKER_HOST=mini.bed.docker_host)
    runs = [subprocess.Popen([sys.executable, "-m", "imagebuild", "-f", str(mini.spec),
                              "backup", *names], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
            for names in (["mimo"], ["mimo"], [])]
    done = [(p.wait(timeout=600), *p.communicate()) for p in runs]
    for code, out, err in done:
        assert code == 0 or (code == 12 and "is locked by" in err), (code, out, err)
    assert any(code == 0 for code, _o, _e in done)
    gen, _sidecar = _gen(root)
    kept = [p for p in (root / "images" / "vllm-node-mimo").iterdir() if p.is_dir()]
    assert gen in kept
    r = mini.cli("backup", "--check")
    assert r.returncode == 0, r.stdout + r.stderr
    r = mini.cli("backup")  # alone: it prunes what the concurrent runs had to keep
    assert r.returncode == 0, r.stderr
    assert [p for p in (root / "images" / "vllm-node-mimo").iterdir() if p.is_dir()] == [gen]
    assert list((root / "locks").iterdir()) == []


def _mirror_sent(out: str) -> int:
    """The blobs the one mirror received, from a backup's summary line."""
    [line] = [ln for ln in out.splitlines() if ln.startswith("mirror ssh://")]
    assert "up to date (" in line, line
    return int(line.split("up to date (", 1)[1].split(" blob", 1)[0])


def test_a_mirror_on_a_worker_follows_the_store_and_restores_without_it(
        mini: MiniStack) -> None:
    remote = mini.bed.root / "mirrors" / f"{mini.root.parent.name} mirror"
    remote.mkdir(parents=True)
    mini.edit_spec("  keep: 2\n", f"  keep: 2\n  mirror: ssh://w1{remote}\n")
    root = mini.root / "backups"

    def blobs(where: Path) -> dict[str, int]:
        return {p.name: p.stat().st_size for p in (where / "blobs" / "sha256").iterdir()}

    try:
        r = mini.cli("build", "mimo")  # the first backup sends every unique layer once
        assert r.returncode == 0, r.stderr
        assert blobs(remote) == blobs(root) and _mirror_sent(r.stdout) == len(blobs(root))
        gen, sidecar = _gen(remote)
        assert gen.name == _gen(root)[0].name
        base = _blob(remote, sidecar, str(sidecar["layer_files"][0]))  # type: ignore[index]
        assert base.stat().st_nlink == 1 + len(NAMES)  # hard links kept there too
        # a rebuild of mimo sends only its new layers
        before = blobs(root)
        tpl = mini.root / "templates" / "vllm-node-mimo.Dockerfile.j2"
        tpl.write_text(tpl.read_text() + "# generation 1\n")
        r = mini.cli("build", "mimo")
        assert r.returncode == 0, r.stderr
        new = set(blobs(root)) - set(before)
        assert _mirror_sent(r.stdout) == len(new) and blobs(remote) == blobs(root)
        r = mini.cli("status", "--check-backups")
        assert f"mirror ssh://w1{remote}: current" in r.stdout, r.stdout + r.stderr
        # a blob damaged on the mirror: found there, repaired by the next backup
        gen, sidecar = _gen(remote)
        top = str(sidecar["layer_files"][-1])  # type: ignore[index]
        _flip(_blob(remote, sidecar, top), 100)
        r = mini.cli("backup", "--check", "--mirror")
        assert r.returncode == 13 and "DAMAGED blob" in r.stdout, r.stdout + r.stderr
        r = mini.cli("backup")
        assert r.returncode == 0 and _mirror_sent(r.stdout) == 1, r.stdout + r.stderr
        r = mini.cli("backup", "--check", "--mirror")
        assert r.returncode == 0 and "every blob matches" in r.stdout, r.stdout + r.stderr
        # the head's store lost entirely: restore-from-tar restores from the mirror
        tag = _tags(mini)["vllm-node-mimo"]
        image_id = DockerEngine().require(tag).id
        _rmi(tag, "vllm-node-mimo:latest")
        subprocess.run(["rm", "-rf", str(root)], check=True)
        r = mini.cli("restore-from-tar", "mimo")
        assert r.returncode == 0 and "verified" in r.stdout, r.stdout + r.stderr
        assert DockerEngine().require("vllm-node-mimo:latest").id == image_id
        # the mirror unreachable during a backup: a warning and exit 13, the backup here
        # written in full
        mini.edit_spec(f"  mirror: ssh://w1{remote}\n", f"  mirror: ssh://w1:2{remote}\n")
        r = mini.cli("backup", "mimo")
        assert r.returncode == 13, r.stdout + r.stderr
        assert "WARNING: mirror" in r.stderr and "NOT up to date" in r.stdout
        assert _gen(root)[1]["image_id"] == image_id
        r = mini.cli("backup", "--check")
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        subprocess.run(["rm", "-rf", str(remote)])
