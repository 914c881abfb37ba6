"""The test bed itself: each part is real and does its job."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

from .conftest import HEAD_STORES, MINI, REPO, Bed, testbed

pytestmark = pytest.mark.bed


@pytest.mark.parametrize("head_store", HEAD_STORES)
def test_a_container_runs_on_the_head_engine(bed: Bed, head_store: str) -> None:
    """Both heads run containers (the containerd one only because its chroot's root is a
    mount point: runc's remount of / fails otherwise)."""
    r = bed.on(head_store).docker("run", "--rm", "--network", "none", testbed.BASE_IMAGE,
                                  "python3", "-c", "import sys; print(sys.version_info[:2])")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(3, 11)"


@pytest.mark.parametrize("head_store, root, driver, version", [
    ("classic", "head/data", "overlay2", "20.10."),
    ("containerd", "c1/root/var/lib/docker-chead", "overlayfs", testbed.CTRD_DOCKER + "."),
])
def test_the_head_engine_is_private(bed: Bed, head_store: str, root: str, driver: str,
                                    version: str) -> None:
    """Each head has an engine of its own; the second is on the containerd image store
    (docker info's DriverStatus names the snapshotter; its data-root is in c1's chroot)."""
    r = bed.on(head_store).docker("info", "--format",
                                  "{{.DockerRootDir}}|{{.Driver}}|{{.ServerVersion}}|"
                                  "{{json .DriverStatus}}")
    assert r.returncode == 0, r.stderr
    got_root, got_driver, got_version, status = r.stdout.strip().split("|")
    data_root = bed.root / "head" / "data" if head_store == "classic" else Path(
        "/var/lib/docker-chead")  # as the engine in the chroot sees it
    assert got_root == str(data_root)
    assert got_driver == driver and got_version.startswith(version)
    assert ("io.containerd.snapshotter" in status) == (head_store == "containerd")
    assert (bed.root / root).is_dir()


def test_each_worker_answers_over_ssh_with_its_own_engine_and_no_images(bed: Bed) -> None:
    roots = set()
    for w in bed.workers:
        r = bed.ssh(w, "docker", "info", "--format", "'{{.DockerRootDir}}'")
        assert r.returncode == 0, f"{w}: {r.stderr}"
        roots.add(r.stdout.strip())
        assert r.stdout.strip() == str(bed.root / "workers" / w / "data")
        images = bed.ssh(w, "docker", "images", "-q")
        assert images.returncode == 0 and images.stdout.strip() == "", f"{w}: {images.stdout}"
    assert len(roots) == len(bed.workers) == 3


def test_an_image_saved_on_the_head_loads_on_a_worker_over_ssh(bed: Bed) -> None:
    head_id = bed.docker("image", "inspect", "--format", "{{.Id}}", testbed.BASE_IMAGE)
    assert head_id.returncode == 0
    save = subprocess.Popen(["docker", "-H", bed.docker_host, "save", testbed.BASE_IMAGE],
                            stdout=subprocess.PIPE)
    load = subprocess.run(["ssh", "-F", str(bed.ssh_config), "w2", "docker", "load"],
                          stdin=save.stdout, capture_output=True, text=True, timeout=300)
    assert save.stdout is not None
    save.stdout.close()
    assert save.wait() == 0
    assert load.returncode == 0, load.stderr
    try:
        got = bed.ssh("w2", "docker", "image", "inspect", "--format", "'{{.Id}}'",
                      testbed.BASE_IMAGE)
        assert got.stdout.strip() == head_id.stdout.strip()
        assert bed.ssh("w1", "docker", "images", "-q").stdout.strip() == ""  # only w2 got it
    finally:
        bed.ssh("w2", "docker", "rmi", testbed.BASE_IMAGE)


def test_a_wrong_host_key_is_refused(bed: Bed, tmp_path: Path) -> None:
    wrong = tmp_path / "known_hosts"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")],
                   check=True)
    pub = (tmp_path / "k.pub").read_text().split()
    wrong.write_text(f"[127.0.0.2]:{testbed.SSH_PORT} {pub[0]} {pub[1]}\n")
    r = subprocess.run(["ssh", "-F", str(bed.ssh_config), "-o", f"UserKnownHostsFile={wrong}",
                        "w1", "docker", "version"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 255
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in r.stderr
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    r = subprocess.run(["ssh", "-F", str(bed.ssh_config), "-o", f"UserKnownHostsFile={empty}",
                        "w1", "docker", "version"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 255
    assert "Host key verification failed" in r.stderr


def _venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True).create(path)
    return path / "bin" / "python"


def _pip(py: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           "--index-url", f"http://{testbed.INDEX_HOST}:{testbed.INDEX_PORT}/simple",
                           *args], capture_output=True, text=True, timeout=300)


def test_the_index_serves_wheels_and_reproduces_the_torch_regression(bed: Bed,
                                                                     tmp_path: Path) -> None:
    py = _venv(tmp_path / "v")
    r = _pip(py, "torch==2.11.0+cu130")
    assert r.returncode == 0, r.stderr
    probe = "import torch; print(torch.__version__, torch.version.cuda)"
    out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True)
    assert out.stdout.strip() == "2.11.0+cu130 13.0"
    # The vllm wheel's metadata pins torch==2.10.0: a resolver lands the CPU build.
    vllm = next((bed.root / "wheels").glob("vllm-*.whl"))
    r = _pip(py, str(vllm))
    assert r.returncode == 0, r.stderr
    out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True)
    assert out.stdout.strip() == "2.10.0+cpu None"
    imp = subprocess.run([str(py), "-c", "import vllm"], capture_output=True, text=True)
    assert imp.returncode != 0 and "libtorch_cuda.so" in imp.stderr
    # ...and the force-reinstall, no deps, brings back the CUDA build.
    r = _pip(py, "--no-deps", "--force-reinstall", "torch==2.11.0+cu130")
    assert r.returncode == 0, r.stderr
    imp = subprocess.run([str(py), "-c", "import vllm, transformers; print(vllm.__version__,"
                          " transformers.__version__)"], capture_output=True, text=True)
    assert imp.returncode == 0, imp.stderr
    assert imp.stdout.split() == ["0.22.1rc1.dev124+gace95c9cf.d20260603.cu132", "4.57.1"]


def test_the_index_publishes_sha256_for_every_file(bed: Bed) -> None:
    import urllib.request

    base = f"http://{testbed.INDEX_HOST}:{testbed.INDEX_PORT}/simple"
    with urllib.request.urlopen(f"{base}/transformers/", timeout=5) as r:
        page = r.read().decode()
    assert "transformers-4.57.1-py3-none-any.whl#sha256=" in page
    assert "transformers-5.0.0-py3-none-any.whl#sha256=" in page


def test_the_test_stack_lock_matches_the_bed_wheels(bed_env: Bed) -> None:
    """The committed examples/mini/wheels.lock holds real hashes of what the bed built."""
    r = subprocess.run([sys.executable, "-m", "imagebuild", "-f", str(MINI), "lock", "--check"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 unresolved" in r.stdout


def test_up_is_idempotent_and_keeps_the_same_processes(bed: Bed) -> None:
    pid = (bed.root / "head" / "docker.pid").read_text()
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "testbed.py"), "up",
                        "--workers", str(len(bed.workers))], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"DOCKER_HOST={bed.docker_host}" in r.stdout
    assert (bed.root / "head" / "docker.pid").read_text() == pid
    assert "debootstrap" not in r.stderr
    env = subprocess.run([sys.executable, str(REPO / "scripts" / "testbed.py"), "env",
                          "--head-store", "containerd"], capture_output=True, text=True)
    assert env.returncode == 0 and f"DOCKER_HOST={bed.on('containerd').docker_host}" in env.stdout
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "testbed.py"), "up",
                          "--head-store", "zfs"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: 'zfs'" in bad.stderr
