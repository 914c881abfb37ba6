#!/usr/bin/env python3
"""The imagebuild test bed: a cluster on one machine, from Debian packages.

    scripts/testbed up [--workers N]   start everything (idempotent); prints the env to use;
                                       N workers (default 3; 8 or more for benchmarks)
    scripts/testbed up --fresh         the same, from empty engines (keeps cache/; for CI)
    scripts/testbed up --head-store containerd
                                       DOCKER_HOST in the env is the containerd-store head
                                       (default: classic, or $IMAGEBUILD_BED_HEAD_STORE)
    scripts/testbed down               stop what 'up' started (by its pid files)
    scripts/testbed env [--head-store S]  print the environment variables
    scripts/testbed status             what runs, what does not
    scripts/testbed reset-workers      remove every container and image from the worker engines
    scripts/testbed builder [--head-store S]
                                       import the wheel builder's image into both heads (or
                                       the one on store S); tests do it when they need it

Everything lives under $IMAGEBUILD_BED (default /var/lib/imagebuild-bed):

    head/                 the head node's dockerd on the classic store (overlay2; own
                          data-root, exec-root, socket, pidfile)
    chead/                logs and pid files of a second head on the containerd image store
                          (Docker 28.5, in c1's chroot with its own containerd, data-root and
                          socket); both heads always run, --head-store picks the env's
    workers/wN/           worker N: a dockerd plus the sshd on 127.0.0.(N+1):2222 that reaches it
    c1/                   a worker on the containerd image store: Docker 28.5 and containerd
                          2.1 from Debian sid in a debootstrapped chroot (Debian 12's docker.io
                          20.10 has no containerd store), behind its sshd on 127.0.0.9:2222;
                          inventory in cluster-containerd.yaml
    ssh/                  client key, known_hosts (host keys of the workers), ssh_config
    wheels/               the test stack's local fixture wheels (vllm, flashinfer)
    git/vllm, git/flashinfer, git/spdlog (a submodule of flashinfer)
                          fixture source repositories for the wheel builder to clone (no
                          network), with the same commit hashes everywhere: vllm has a C
                          extension (ccache-aware setup.py), two commits and tag v0.22.1rc1
    index/simple/         a PEP 503 index on 127.0.0.1:18080 (torch, transformers, uv, ...)
    registry/             CNCF distribution (Debian's docker-registry) on 127.0.0.1:15000,
                          plain HTTP; every engine lists it in insecure-registries
    cache/                the debootstrap rootfs tarballs and the uv wheel, kept across 'down'
    cluster.yaml          the cluster inventory for the test stack's spec
    env                   shell exports (DOCKER_HOST of the head engine, IMAGEBUILD_BED, ...)

Images, imported from debootstrapped rootfs tarballs: imagebuild-bed/bookworm-python:1 on
both heads ('up'), and imagebuild-bed/bookworm-builder:1 (python3-dev, gcc, ccache: what the
wheel builder compiles with) once 'builder' or a test asked for it.

Standard library only: it runs before the project's virtualenv exists.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from base64 import urlsafe_b64encode
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

BED = Path(os.environ.get("IMAGEBUILD_BED") or "/var/lib/imagebuild-bed").absolute()
INDEX_HOST = "127.0.0.1"
INDEX_PORT = 18080
REGISTRY_ADDR = "127.0.0.1:15000"  # the bed's registry (CNCF distribution), plain HTTP
SSH_PORT = 2222
BASE_IMAGE = "imagebuild-bed/bookworm-python:1"
BUILDER_IMAGE = "imagebuild-bed/bookworm-builder:1"  # see ensure_builder_image()
UV_VERSION = "0.9.7"
# real Ray for the images' runtime contract (the launcher forms a Ray cluster): downloaded
# once on the host for the bed's Python and the test stack's target, served by its index
RAY_VERSION = "2.60.0"
# The test stack follows the host's architecture (examples/mini/imagebuild.yaml reads
# these from the bed's env): uname -m -> the architecture as wheel tags name it
ARCHES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
UV_WHEELS = {  # the uv wheel the test stack's images install, per architecture
    "x86_64": f"uv-{UV_VERSION}-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    "aarch64": f"uv-{UV_VERSION}-py3-none-manylinux_2_28_aarch64.whl",
}
UV_PLATFORMS = {"x86_64": "manylinux_2_17_x86_64", "aarch64": "manylinux_2_28_aarch64"}


def host_arch(machine: str | None = None) -> str:
    """The host's architecture, as the test stack names it (x86_64 or aarch64)."""
    m = machine if machine is not None else os.uname().machine
    if m not in ARCHES:
        die(f"the test bed and the test stack run on x86_64 and aarch64 hosts, not {m}",
            "use an x86_64 or aarch64 (GB10) machine")
    return ARCHES[m]


def arch_env(arch: str) -> dict[str, str]:
    """What examples/mini/imagebuild.yaml reads for ``arch``: its target and uv wheel."""
    return {"IMAGEBUILD_BED_ARCH": arch, "IMAGEBUILD_BED_UV_WHEEL": UV_WHEELS[arch]}


MINI_DIR = Path(__file__).resolve().parent.parent / "examples" / "mini"


def copy_test_stack(dest: Path, arch: str | None = None) -> str:
    """The test stack for ``arch`` (the host's by default) made concrete in ``dest``: that
    architecture's committed locks copied as wheels.lock and locks/, with files/; returns
    the spec's text with the architecture filled in and those two paths made plain (the
    caller adapts the rest and writes it)."""
    arch = arch or host_arch()
    shutil.copy(MINI_DIR / f"wheels.{arch}.lock", dest / "wheels.lock")
    shutil.copytree(MINI_DIR / "locks" / arch, dest / "locks")
    shutil.copytree(MINI_DIR / "files", dest / "files")
    text = (MINI_DIR / "imagebuild.yaml").read_text()
    for old, new in (("lock: wheels.${IMAGEBUILD_BED_ARCH:-x86_64}.lock", "lock: wheels.lock"),
                     ("locks: locks/${IMAGEBUILD_BED_ARCH:-x86_64}", "locks: locks")):
        if old not in text:
            die(f"{MINI_DIR / 'imagebuild.yaml'} has no {old!r} line to make concrete")
        text = text.replace(old, new)
    text = text.replace("${IMAGEBUILD_BED_ARCH:-x86_64}", arch)
    return re.sub(r"\$\{IMAGEBUILD_BED_UV_WHEEL:-[^}]*\}", UV_WHEELS[arch], text)


def ray_platforms(arch: str) -> tuple[str, ...]:
    """The platform tags of the ray wheels for ``arch`` (glibc 2.28 and older)."""
    return (*(f"manylinux_2_{n}_{arch}" for n in (28, 27, 24, 17)), f"manylinux2014_{arch}",
            *((f"manylinux_2_5_{arch}", f"manylinux1_{arch}") if arch == "x86_64" else ()))


SUITE = "bookworm"
CTRD = "c1"  # the containerd-store worker
CTRD_ADDR = "127.0.0.9"
CTRD_SUITE = "sid"  # the newest Docker Debian has (28.5), with containerd 2.1
CTRD_DOCKER = "28.5"  # the version of that Docker (the tests check the engine is it)
CTRD_RUN = "/run/imagebuild-bed"  # inside its chroot: sockets and pid files
CHEAD = "chead"  # the head on the containerd store: a second engine in c1's chroot
HEADS = {"classic": "head", "containerd": CHEAD}  # head store -> node
CHROOT_ENGINES = (CTRD, CHEAD)
MIRROR = os.environ.get("IMAGEBUILD_BED_MIRROR", "http://deb.debian.org/debian")
PACKAGES = {  # binary -> Debian package
    "dockerd": "docker.io",
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "debootstrap": "debootstrap",
    "git": "git",  # the fixture repos (ensure_fixture_repos)
    "docker-registry": "docker-registry",  # CNCF distribution: distribute --via registry
}
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def log(msg: str) -> None:
    print(f"[testbed] {msg}", file=sys.stderr, flush=True)


def die(msg: str, hint: str = "") -> None:
    print(f"[testbed] error: {msg}", file=sys.stderr)
    if hint:
        print(f"[testbed]   hint: {hint}", file=sys.stderr)
    raise SystemExit(1)


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, **kw)  # type: ignore[call-overload]


# -- packages ------------------------------------------------------------------------------


def which(binary: str) -> str | None:
    return shutil.which(binary, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def ensure_packages() -> None:
    missing = sorted({pkg for b, pkg in PACKAGES.items() if which(b) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        die(f"missing Debian packages: {' '.join(missing)}",
            f"run as root, or: sudo apt-get install -y {' '.join(missing)}")
    log(f"installing {' '.join(missing)} (apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)
    # The openssh-server package may start the system sshd; we leave it alone (port 22).


# -- pid files -----------------------------------------------------------------------------


def pid_alive(pidfile: Path, marker: str) -> int | None:
    """The pid in ``pidfile`` if that process runs and its command line names ``marker``."""
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, ValueError):
        return None
    return pid if marker in cmdline else None


def stop_pidfile(pidfile: Path, marker: str, what: str) -> None:
    pid = pid_alive(pidfile, marker)
    if pid is None:
        pidfile.unlink(missing_ok=True)
        return
    os.kill(pid, signal.SIGTERM)
    for _ in range(150):
        if pid_alive(pidfile, marker) is None:
            break
        time.sleep(0.1)
    else:
        log(f"{what} (pid {pid}) did not stop on SIGTERM; sending SIGKILL")
        os.kill(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)
    log(f"stopped {what} (pid {pid})")


def spawn(cmd: list[str], logfile: Path, pidfile: Path | None = None) -> int:
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with logfile.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    if pidfile is not None:
        pidfile.write_text(f"{proc.pid}\n")
    return proc.pid


# -- engines -------------------------------------------------------------------------------


def node_dir(node: str) -> Path:
    if node in ("head", CTRD, CHEAD):
        return BED / node
    return BED / "workers" / node


def chroot_root() -> Path:
    """The Debian chroot (CTRD_SUITE) both containerd-store engines (c1, chead) run in."""
    return node_dir(CTRD) / "root"


def run_dir(node: str) -> str:
    """Where a chroot engine keeps its sockets and pid files, as seen inside the chroot."""
    return CTRD_RUN if node == CTRD else f"{CTRD_RUN}/{node}"


def socket_of(node: str) -> Path:
    if node in CHROOT_ENGINES:
        return chroot_root() / run_dir(node).lstrip("/") / "docker.sock"
    return node_dir(node) / "docker.sock"


def head_node(store: str) -> str:
    if store not in HEADS:
        die(f"unknown head store {store!r}", f"use one of: {', '.join(HEADS)}")
    return HEADS[store]


def docker(node: str, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return run(["docker", "-H", f"unix://{socket_of(node)}", *args], **kw)


def engine_answers(node: str) -> bool:
    return engine_answers_at(socket_of(node))


def engine_answers_at(sock: Path) -> bool:
    r = subprocess.run(["docker", "-H", f"unix://{sock}", "version", "--format",
                        "{{.Server.Version}}"], capture_output=True, text=True)
    return r.returncode == 0


def start_dockerd(node: str) -> None:
    start_dockerd_at(node_dir(node), socket_of(node), f"dockerd {node}",
                     [f"--insecure-registry={REGISTRY_ADDR}"])


def start_dockerd_at(d: Path, sock: Path, what: str, extra: list[str]) -> None:
    """A classic-store dockerd with its data, exec root and pid file under ``d``, its API
    on ``sock`` (idempotent: a running one that answers is left alone)."""
    pidfile = d / "docker.pid"
    if pid_alive(pidfile, str(d)) and engine_answers_at(sock):
        return
    stop_pidfile(pidfile, str(d), what)
    for sub in ("data", "exec"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    sock.unlink(missing_ok=True)
    cmd = [which("dockerd") or "dockerd",
           "--data-root", str(d / "data"), "--exec-root", str(d / "exec"),
           "--host", f"unix://{sock}", "--pidfile", str(pidfile),
           "--bridge=none", "--iptables=false", "--ip-masq=false", "--ip-forward=false",
           "--storage-driver=overlay2", *extra]
    spawn(cmd, d / "dockerd.log")
    log(f"starting {what}")


def wait_engine(node: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine_answers(node):
            return
        time.sleep(0.3)
    tail = (node_dir(node) / "dockerd.log").read_text(errors="replace").splitlines()[-15:]
    die(f"dockerd {node} did not answer within {timeout:.0f}s; last log lines:\n  "
        + "\n  ".join(tail), f"see {node_dir(node) / 'dockerd.log'}")


# -- the containerd-store worker -----------------------------------------------------------


def _mounted() -> set[str]:
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return set()
    return {ln.split()[1] for ln in lines if len(ln.split()) > 1}


# What a base image for tests does not need: documentation (copyright notices stay, as
# Debian's policy for slim images has it), manuals, translations, apt's package lists and
# the byte-compiled stdlib. Half of the base's bytes, which every test saves, loads, backs
# up and sends to workers again and again.
SLIM_EXCLUDES = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
                 "var/lib/apt/lists")
SLIM_DPKG_CFG = """# imagebuild test bed: later package installs stay as slim as the base
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
"""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def slim(root: Path) -> None:
    """Remove SLIM_EXCLUDES from an unpacked rootfs (copyright files stay) and tell dpkg to
    leave them out of later installs too."""
    for rel in SLIM_EXCLUDES:
        top = root / rel
        if not top.is_dir():
            continue
        for entry in top.iterdir():
            if rel == "usr/share/doc" and entry.is_dir() and not entry.is_symlink():
                for sub in entry.iterdir():
                    if sub.name != "copyright":
                        _remove(sub)
            else:
                _remove(entry)
    # the byte-compiled stdlib Debian's postinst writes (a sixth of the base): Python
    # compiles in memory instead (PYTHONDONTWRITEBYTECODE in the image, so no RUN leaves
    # .pyc files in a layer either)
    for cache in sorted(root.glob("usr/lib/python3*/**/__pycache__")):
        shutil.rmtree(cache)
    cfg = root / "etc/dpkg/dpkg.cfg.d"
    cfg.mkdir(parents=True, exist_ok=True)
    (cfg / "imagebuild-bed-slim").write_text(SLIM_DPKG_CFG)


def cached_rootfs(suite: str, packages: str, what: str, slimmed: bool = False) -> Path:
    """A debootstrapped ``suite`` with ``packages``, as a tarball in cache/ (made once);
    ``slimmed``: without documentation, manuals and translations (see slim())."""
    tarball = BED / "cache" / f"{suite}-{what}{'-slim' if slimmed else ''}-rootfs.tar"
    if tarball.is_file():
        return tarball
    tmp = tarball.with_suffix(".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    log(f"debootstrap --variant=minbase {suite} with {packages} "
        "(about a minute, cached afterwards)")
    t0 = time.monotonic()
    run([which("debootstrap") or "debootstrap", "--variant=minbase", f"--include={packages}",
         suite, str(tmp), MIRROR], stdout=subprocess.DEVNULL)
    (tmp / "var/lib/apt/lists").mkdir(parents=True, exist_ok=True)
    for deb in (tmp / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    if slimmed:
        slim(tmp)
    partial = tarball.with_suffix(".partial")
    run(["tar", "--numeric-owner", "-C", str(tmp), "-cf", str(partial), "."])
    os.replace(partial, tarball)
    shutil.rmtree(tmp)
    log(f"rootfs ready in {time.monotonic() - t0:.0f}s: {tarball}")
    return tarball


SUITE_MARK = "etc/imagebuild-bed-suite"  # in the chroot: the suite it was made from


def chroot_suite() -> str | None:
    """The Debian suite the chroot engines run from (None: no chroot yet). A chroot made
    before the mark existed is trixie's."""
    root = chroot_root()
    if not (root / "usr" / "sbin" / "dockerd").is_file():
        return None
    try:
        return (root / SUITE_MARK).read_text().strip()
    except FileNotFoundError:
        return "trixie"


def ensure_chroot() -> Path:
    """c1's chroot, unpacked and mounted (proc, sys, dev), its root a mount point."""
    root = chroot_root()
    if not (root / "usr" / "sbin" / "dockerd").is_file():
        tarball = cached_rootfs(CTRD_SUITE, "docker.io,containerd,ca-certificates", "docker")
        root.mkdir(parents=True, exist_ok=True)
        run(["tar", "--numeric-owner", "-C", str(root), "-xf", str(tarball)])
        (root / SUITE_MARK).write_text(CTRD_SUITE + "\n")
    mounted = _mounted()
    if str(root) not in mounted:
        # runc remounts the container's root relative to the engine's own "/": in a chroot
        # whose root is not a mount point that fails ("remount /, flags: 0x84000: invalid
        # argument") and no container runs. A bind mount of the root onto itself fixes it.
        run(["mount", "--rbind", str(root), str(root)])
        mounted = _mounted()
    for target, cmd in (("proc", ["mount", "-t", "proc", "proc"]),
                        ("sys", ["mount", "--rbind", "/sys"]),
                        ("dev", ["mount", "--rbind", "/dev"])):
        if str(root / target) not in mounted:
            run([*cmd, str(root / target)])
    (root / "etc" / "docker").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "docker" / "daemon.json").write_text(json.dumps(
        {"features": {"containerd-snapshotter": True},
         "insecure-registries": [REGISTRY_ADDR]}) + "\n")
    return root


def start_chroot_engine(node: str) -> None:
    """containerd and dockerd of ``node`` (c1 or chead) in the CTRD_SUITE chroot. c1 uses the
    default paths; chead its own containerd root and state, data-root and exec-root."""
    d = node_dir(node)
    rd = run_dir(node)
    if pid_alive(d / "docker.pid", rd + "/") and engine_answers(node):
        return
    stop_pidfile(d / "docker.pid", rd + "/", f"dockerd {node}")
    stop_pidfile(d / "containerd.pid", rd + "/", f"containerd {node}")
    d.mkdir(parents=True, exist_ok=True)
    root = ensure_chroot()
    (root / rd.lstrip("/")).mkdir(parents=True, exist_ok=True)
    own_ctrd: list[str] = []
    own_docker: list[str] = []
    if node != CTRD:
        own_ctrd = ["--root", f"/var/lib/containerd-{node}", "--state", f"/run/containerd-{node}"]
        own_docker = ["--data-root", f"/var/lib/docker-{node}",
                      "--exec-root", f"/run/docker-{node}"]
    spawn(["chroot", str(root), "containerd", "--address", f"{rd}/containerd.sock", *own_ctrd],
          d / "containerd.log", d / "containerd.pid")
    sock = root / rd.lstrip("/") / "containerd.sock"
    for _ in range(100):
        if sock.exists():
            break
        time.sleep(0.1)
    socket_of(node).unlink(missing_ok=True)
    spawn(["chroot", str(root), "dockerd", "--host", f"unix://{rd}/docker.sock",
           "--containerd", f"{rd}/containerd.sock", "--pidfile", f"{rd}/docker.pid", *own_docker,
           "--bridge=none", "--iptables=false", "--ip-masq=false", "--ip-forward=false"],
          d / "dockerd.log", d / "docker.pid")
    log(f"starting dockerd {node} (Docker from {CTRD_SUITE}, containerd image store)")


def stop_chroot_engine(node: str) -> None:
    d = node_dir(node)
    if not d.is_dir():
        return
    stop_pidfile(d / "sshd.pid", str(d / "sshd_config"), f"sshd {node}")
    stop_pidfile(d / "docker.pid", run_dir(node) + "/", f"dockerd {node}")
    stop_pidfile(d / "containerd.pid", run_dir(node) + "/", f"containerd {node}")


def ctr(node: str, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    """containerd's own client against a chroot engine's containerd, namespace moby
    (what dockerd uses): for tests that damage the content store on purpose."""
    return run(["chroot", str(chroot_root()), "ctr", "--address",
                f"{run_dir(node)}/containerd.sock", "--namespace", "moby", *args], **kw)


# -- base and builder images without a registry --------------------------------------------


IMPORT_CHANGES = ("--change", 'CMD ["/bin/bash"]', "--change", "ENV LANG=C.UTF-8",
                  "--change", "ENV PYTHONDONTWRITEBYTECODE=1")
# what the wheel builder compiles with: the headers for C extensions, gcc, and ccache (vllm's
# build uses a compiler cache when one is on PATH, and so does the vllm fixture's setup.py)
BUILDER_PACKAGES = ("python3,python3-pip,python3-setuptools,python3-wheel,python3-dev,gcc,"
                    "libc6-dev,ccache,ca-certificates")


def has_image(node: str, image: str) -> bool:
    r = subprocess.run(["docker", "-H", f"unix://{socket_of(node)}", "image", "inspect",
                        image], capture_output=True, text=True)
    return r.returncode == 0


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path``: tests in parallel processes may ask for the builder
    image or the fixture repos at once, and two makers would trip over each other's
    temporary directories (cached_rootfs() removes a leftover .tmp it finds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_base_image(node: str) -> None:
    if has_image(node, BASE_IMAGE):
        return
    tarball = cached_rootfs(SUITE, "python3,python3-pip,python3-venv,ca-certificates", "python",
                            slimmed=True)
    log(f"docker import {tarball.name} as {BASE_IMAGE} on {node}")
    docker(node, "import", *IMPORT_CHANGES, str(tarball), BASE_IMAGE,
           stdout=subprocess.DEVNULL)


def ensure_builder_image(node: str) -> None:
    """BUILDER_IMAGE on ``node``'s engine, imported from a debootstrapped rootfs like the
    base image. Not part of 'up' (a second debootstrap, 350 MB per head): the wheel-builder
    tests call it when they need it, or 'scripts/testbed builder' does."""
    if has_image(node, BUILDER_IMAGE):
        return
    with locked(BED / "cache" / "builder.lock"):
        if has_image(node, BUILDER_IMAGE):  # another test imported it while we waited
            return
        tarball = cached_rootfs(SUITE, BUILDER_PACKAGES, "builder", slimmed=True)
        log(f"docker import {tarball.name} as {BUILDER_IMAGE} on {node}")
        docker(node, "import", *IMPORT_CHANGES, str(tarball), BUILDER_IMAGE,
               stdout=subprocess.DEVNULL)


# -- fixture wheels and the index --------------------------------------------------------


def _record_hash(data: bytes) -> str:
    return "sha256=" + urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(outdir: Path, dist: str, version: str, files: dict[str, str],
               requires: list[str] | None = None, pad_bytes: int = 0) -> Path:
    """A real, byte-for-byte reproducible wheel (stored entries, fixed timestamps).

    ``pad_bytes`` adds an incompressible data file, to give layers a realistic size; it
    is generated and written in 1 MiB pieces, so memory stays flat for GB-sized wheels.
    """
    dist_norm = dist.replace("-", "_")
    filename = f"{dist_norm}-{version}-py3-none-any.whl"
    info = f"{dist_norm}-{version}.dist-info"
    meta = ["Metadata-Version: 2.1", f"Name: {dist}", f"Version: {version}"]
    meta += [f"Requires-Dist: {r}" for r in requires or []]
    entries: dict[str, bytes] = {k: v.encode() for k, v in sorted(files.items())}
    entries[f"{info}/METADATA"] = ("\n".join(meta) + "\n").encode()
    entries[f"{info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: imagebuild-testbed\n"
                                b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in entries.items())
    pad_name = f"{next(iter(files)).split('/')[0]}/_payload.bin"
    if pad_bytes:
        h = hashlib.sha256()
        for piece in _pad(f"{dist}-{version}", pad_bytes):
            h.update(piece)
        digest = urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
        record += f"{pad_name},sha256={digest},{pad_bytes}\n"
    record += f"{info}/RECORD,,\n"
    entries[f"{info}/RECORD"] = record.encode()
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / filename
    tmp = outdir / f".{filename}.tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for name, data in entries.items():
            if pad_bytes and name == f"{info}/METADATA":
                zi = _zipinfo(pad_name)
                with zf.open(zi, "w", force_zip64=pad_bytes > (1 << 31)) as out:
                    for piece in _pad(f"{dist}-{version}", pad_bytes):
                        out.write(piece)
            zf.writestr(_zipinfo(name), data)
    if path.is_file() and _file_sha(path) == _file_sha(tmp):
        tmp.unlink()
    else:
        os.replace(tmp, path)
    return path


def _zipinfo(name: str) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
    zi.external_attr = 0o644 << 16
    zi.compress_type = zipfile.ZIP_STORED
    return zi


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _pad(seed: str, size: int) -> Iterator[bytes]:
    """Deterministic, incompressible bytes in 1 MiB pieces."""
    rng = random.Random(seed)
    left = size
    while left > 0:
        n = min(left, 1 << 20)
        yield rng.randbytes(n)
        left -= n


VLLM_VERSION = "0.22.1rc1.dev124+gace95c9cf.d20260603.cu132"

TORCH_INIT = '''"""Test-bed stand-in for torch {version}."""
from . import version
__version__ = "{version}"
'''

VLLM_INIT = '''"""Test-bed stand-in for vllm {version}.

Like the real wheel, importing it with a CPU-only torch fails the way the field saw it.
"""
import torch

if torch.version.cuda is None:
    raise ImportError("libtorch_cuda.so: cannot open shared object file: No such file or directory")
__version__ = "{version}"
'''


def fixture_wheels(pad_mb: int = 0) -> tuple[list[Path], list[Path]]:
    """(local wheels for the stack's wheels/ directory, wheels served by the index)."""
    pad = pad_mb * 1024 * 1024
    local_dir = BED / "wheels"
    index_dir = BED / "index-files"
    local = [
        make_wheel(local_dir, "vllm", VLLM_VERSION,
                   {"vllm/__init__.py": VLLM_INIT.format(version=VLLM_VERSION)},
                   requires=["torch==2.10.0", "transformers<5,>=4.56.0"], pad_bytes=pad),
        # like the real one (May 2026): an unpinned torch, which a resolver fills with
        # whatever the index offers unless the lock says otherwise
        make_wheel(local_dir, "flashinfer-python", "0.6.12",
                   {"flashinfer/__init__.py": '__version__ = "0.6.12"\n'},
                   requires=["torch"]),
        make_wheel(local_dir, "flashinfer-cubin", "0.6.12",
                   {"flashinfer_cubin/__init__.py": '__version__ = "0.6.12"\n'}),
        make_wheel(local_dir, "flashinfer-jit-cache", "0.6.12",
                   {"flashinfer_jit_cache/__init__.py": '__version__ = "0.6.12"\n'}),
    ]
    # A small but real dependency graph: torch's CUDA build needs nvidia-* libraries,
    # both transformers lines need tokenizers (two versions on the index: a resolver
    # takes the newer, a lock keeps what it took).
    served = [
        make_wheel(index_dir, "torch", "2.11.0+cu130",
                   {"torch/__init__.py": TORCH_INIT.format(version="2.11.0+cu130"),
                    "torch/version.py": 'cuda = "13.0"\n'}, pad_bytes=pad,
                   requires=[f"{n}=={v}; platform_system == 'Linux'" for n, v in NVIDIA]),
        make_wheel(index_dir, "torch", "2.10.0+cpu",
                   {"torch/__init__.py": TORCH_INIT.format(version="2.10.0+cpu"),
                    "torch/version.py": "cuda = None\n"}, pad_bytes=pad),
        make_wheel(index_dir, "transformers", "4.57.1",
                   {"transformers/__init__.py": '__version__ = "4.57.1"\n'},
                   requires=["tokenizers<=0.23.0,>=0.22.0"]),
        make_wheel(index_dir, "transformers", "5.0.0",
                   {"transformers/__init__.py": '__version__ = "5.0.0"\n'},
                   requires=["tokenizers<=0.23.0,>=0.22.0"]),
        *(fixture_package(index_dir, n, v) for n, v in NVIDIA),
        *(fixture_package(index_dir, "tokenizers", v) for v in TOKENIZERS),
    ]
    return local, served


NVIDIA = (("nvidia-cublas", "13.0.0.19"), ("nvidia-cuda-runtime", "13.0.48"))
TOKENIZERS = ("0.22.0", "0.22.1")


def fixture_package(index_dir: Path, dist: str, version: str) -> Path:
    """A dependency-only fixture: one module reporting its version."""
    module = dist.replace("-", "_")
    return make_wheel(index_dir, dist, version,
                      {f"{module}/__init__.py": f'__version__ = "{version}"\n'})


def index_files() -> list[Path]:
    """What the index serves: the fixtures, what tests published since 'up', uv, and
    real ray[default] with everything it needs."""
    _local, served = fixture_wheels(int(os.environ.get("IMAGEBUILD_BED_PAD_MB", "0")))
    return [*served, *sorted((BED / "index-extra").glob("*.whl")), *uv_wheels(),
            *ensure_ray_wheels()]


def ensure_ray_wheels() -> list[Path]:
    """``ray[default]`` and its dependencies as wheels for the bed's images (CPython 3.11,
    the host's architecture, glibc 2.28 and older: the test stack's target), downloaded
    once from PyPI on the host (a build on this machine cannot check PyPI's certificate)
    and cached."""
    arch = host_arch()
    cache = BED / "cache" / f"ray-{RAY_VERSION}{'' if arch == 'x86_64' else '-' + arch}"
    done = cache / ".complete"
    if done.is_file():
        return sorted(cache.glob("*.whl"))
    log(f"downloading ray[default] {RAY_VERSION} and its dependencies from PyPI "
        f"(about 110 MB, once; cached)")
    partial = cache.with_name(cache.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    platforms = [arg for p in ray_platforms(arch) for arg in ("--platform", p)]
    run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
         "--only-binary", ":all:", *platforms, "--python-version", "3.11",
         "--implementation", "cp", "--abi", "cp311", "-d", str(partial),
         f"ray[default]=={RAY_VERSION}"])
    (partial / ".complete").write_text(RAY_VERSION + "\n")
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(partial, cache)
    return sorted(cache.glob("*.whl"))


def publish(wheel: Path) -> None:
    """Add ``wheel`` to the running index (tests: a new upload after a lock)."""
    extra = BED / "index-extra"
    extra.mkdir(exist_ok=True)
    shutil.copy2(wheel, extra / wheel.name)
    build_index(index_files())


def unpublish(filename: str) -> None:
    """Take a file that publish() added off the running index again."""
    (BED / "index-extra" / filename).unlink(missing_ok=True)
    build_index(index_files())


def ensure_uv_wheel(arch: str | None = None) -> Path:
    """The uv wheel of the test stack for ``arch`` (the host's by default), downloaded
    from PyPI once and cached."""
    arch = arch or host_arch()
    cache = BED / "cache"
    wheel = cache / UV_WHEELS[arch]
    if wheel.is_file():
        return wheel
    log(f"downloading uv {UV_VERSION} for {arch} from PyPI (once; cached)")
    cache.mkdir(parents=True, exist_ok=True)
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode:
        die(f"{sys.executable} has no pip to download the uv wheel with",
            "run scripts/test or scripts/try once (they create .venv), or install python3-pip")
    run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
         "--platform", UV_PLATFORMS[arch], "-d", str(cache), f"uv=={UV_VERSION}"])
    if not wheel.is_file():
        die(f"pip download did not produce {wheel.name} in {cache}")
    return wheel


def uv_wheels() -> list[Path]:
    """Both architectures' uv wheels: the index serves both, so the test stack's locks
    for either can be checked on any host."""
    return [ensure_uv_wheel(a) for a in UV_WHEELS]


def build_index(files: list[Path]) -> None:
    """A PEP 503 simple index with sha256 fragments, written atomically as a directory,
    and beside it (not on the index) the files release() published under releases/."""
    build_index_at(BED / "index", files, sorted((BED / "releases").glob("*.whl")))


def release(wheel: Path) -> str:
    """Publish ``wheel`` as a release download (a URL of its own, not on the index: what
    a spec's wheels.url fetches); returns its URL."""
    releases = BED / "releases"
    releases.mkdir(exist_ok=True)
    shutil.copy2(wheel, releases / wheel.name)
    build_index(index_files())
    return f"http://{INDEX_HOST}:{INDEX_PORT}/releases/{wheel.name}"


def build_index_at(root: Path, files: list[Path], releases: list[Path] | None = None) -> None:
    """build_index() into ``root`` (its temporary and old copies beside it): the bed's
    index, or a benchmark's own."""
    tmp = root.with_name(root.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    if releases:
        (tmp / "releases").mkdir(parents=True)
        for f in releases:
            shutil.copy2(f, tmp / "releases" / f.name)
    by_project: dict[str, list[Path]] = {}
    for f in files:
        project = f.name.split("-")[0].replace("_", "-").lower()
        by_project.setdefault(project, []).append(f)
    simple = tmp / "simple"
    simple.mkdir(parents=True)
    for project, wheels in sorted(by_project.items()):
        pdir = simple / project
        pdir.mkdir()
        links = []
        for w in sorted(wheels):
            os.link(w, pdir / w.name) if _same_fs(w, pdir) else shutil.copy2(w, pdir / w.name)
            digest = _file_sha(w)
            # PEP 658: the wheel's METADATA beside it, so resolvers need not download it
            meta = _wheel_metadata(w)
            (pdir / f"{w.name}.metadata").write_bytes(meta)
            msha = hashlib.sha256(meta).hexdigest()
            links.append(f'<a href="{w.name}#sha256={digest}" data-core-metadata="sha256={msha}"'
                         f' data-dist-info-metadata="sha256={msha}">{w.name}</a><br/>')
        (pdir / "index.html").write_text(
            f"<!DOCTYPE html><html><body><h1>Links for {project}</h1>\n"
            + "\n".join(links) + "\n</body></html>\n")
    (simple / "index.html").write_text(
        "<!DOCTYPE html><html><body>\n"
        + "\n".join(f'<a href="{p}/">{p}</a><br/>' for p in sorted(by_project))
        + "\n</body></html>\n")
    if root.exists():
        old = root.with_name(root.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(root, old)
        os.replace(tmp, root)
        shutil.rmtree(old)
    else:
        os.replace(tmp, root)


def _wheel_metadata(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist()
                    if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        return zf.read(name)


def _same_fs(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev


def index_answers() -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{INDEX_HOST}:{INDEX_PORT}/simple/torch/",
                                    timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start_index() -> None:
    pidfile = BED / "index.pid"
    marker = str(BED / "index")
    if pid_alive(pidfile, marker) and index_answers():
        return
    stop_pidfile(pidfile, marker, "wheel index")
    spawn([sys.executable, "-m", "http.server", "--bind", INDEX_HOST, str(INDEX_PORT),
           "--directory", marker], BED / "index.log", pidfile)
    for _ in range(50):
        if index_answers():
            log(f"wheel index on http://{INDEX_HOST}:{INDEX_PORT}/simple")
            return
        time.sleep(0.1)
    die(f"the wheel index did not answer on {INDEX_HOST}:{INDEX_PORT}",
        f"is the port taken? see {BED / 'index.log'}")


# -- real-size stand-ins and a second index (benchmarks only, never the tests' index) -------

BENCH_REAL = BED / "bench-real"  # kept by 'up --fresh' (wipe_engines leaves it alone)
BENCH_INDEX_PORT = 18090  # a benchmark's own index, beside the bed's on INDEX_PORT

# Sizes in MiB at scale 1, in the real stack's proportions: a CUDA devel base of about
# 2 GiB, torch 2.11.0+cu130 about 1 GB pinning CUDA libraries of about 1.5 GB, vllm about
# 0.4 GB, flashinfer-jit-cache about 0.5 GB, the rest small.
REAL_BASE_MIB = 2048
REAL_NVIDIA = (  # (distribution, version, MiB): what the stand-in torch 2.11.0+cu130 pins
    ("nvidia-cudnn-cu13", "9.13.0.50", 480),
    ("nvidia-cublas", "13.0.0.19", 400),
    ("nvidia-nccl-cu13", "2.27.7", 200),
    ("nvidia-cusparse", "12.6.2.49", 150),
    ("nvidia-cufft", "12.0.0.15", 120),
    ("nvidia-cusolver", "12.0.3.29", 100),
    ("nvidia-cuda-nvrtc", "13.0.48", 60),
    ("nvidia-nvjitlink", "13.0.39", 24),
    ("nvidia-cuda-runtime", "13.0.48", 2),
)
REAL_MIB = {"torch": 1024, "vllm": 400, "flashinfer-jit-cache": 512, "flashinfer-cubin": 8,
            "flashinfer-python": 2, "torchvision": 8, "transformers": 10, "tokenizers": 3}
TORCHVISION_VERSION = "0.25.0"
REAL_TRANSFORMERS = ("4.57.1", "5.0.0")
REAL_TRANSFORMERS_NEXT = "5.0.1"  # a later upload (real_size_served(transformers_next=True))


def real_size_dir(scale: float) -> Path:
    """Where the stand-ins of ``scale`` are kept (one directory per scale)."""
    return BENCH_REAL / f"scale-{scale:g}"


def _scaled(mib: float, scale: float) -> int:
    return int(mib * scale * (1 << 20))


def cached_wheel(outdir: Path, dist: str, version: str, files: dict[str, str],
                 requires: list[str] | None = None, pad_bytes: int = 0) -> Path:
    """make_wheel(), made only when ``outdir`` has no wheel made from the same arguments
    (a file beside it records them): GB-sized stand-ins are written once. make_wheel is
    deterministic, so a cached wheel is the one it would make again."""
    args = json.dumps({"dist": dist, "version": version, "files": files,
                       "requires": requires or [], "pad_bytes": pad_bytes}, sort_keys=True)
    path = outdir / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl"
    record = outdir / f".{path.name}.args"
    if path.is_file() and record.is_file() and record.read_text() == args:
        return path
    record.unlink(missing_ok=True)
    made = make_wheel(outdir, dist, version, files, requires=requires, pad_bytes=pad_bytes)
    record.write_text(args)
    return made


def _rebuilt(text: str, rev: int) -> str:
    """A source file as a rebuild from a patched tree has it: one line more per revision."""
    return text + (f"# rebuild {rev}\n" if rev else "")


def real_size_local(scale: float, vllm_rev: int = 0, jit_rev: int = 0) -> list[Path]:
    """The real-size stand-in stack's local wheels at ``scale``: vllm (pinning
    torch==2.10.0, torchvision and transformers<5 like the real one; its import fails on
    a CPU torch), flashinfer-python, flashinfer-cubin, flashinfer-jit-cache.
    ``vllm_rev``/``jit_rev`` N > 0: the same version rebuilt with other content, each
    revision cached in a directory of its own (the file names are the same)."""
    d = real_size_dir(scale) / "local"
    return [
        cached_wheel(d / f"vllm-r{vllm_rev}", "vllm", VLLM_VERSION,
                     {"vllm/__init__.py": _rebuilt(VLLM_INIT.format(version=VLLM_VERSION),
                                                   vllm_rev)},
                     requires=["torch==2.10.0", f"torchvision=={TORCHVISION_VERSION}",
                               "transformers<5,>=4.56.0"],
                     pad_bytes=_scaled(REAL_MIB["vllm"], scale)),
        # like the real one: an unpinned torch
        cached_wheel(d / "flashinfer-python", "flashinfer-python", "0.6.12",
                     {"flashinfer/__init__.py": '__version__ = "0.6.12"\n'}, requires=["torch"],
                     pad_bytes=_scaled(REAL_MIB["flashinfer-python"], scale)),
        cached_wheel(d / "flashinfer-cubin", "flashinfer-cubin", "0.6.12",
                     {"flashinfer_cubin/__init__.py": '__version__ = "0.6.12"\n'},
                     pad_bytes=_scaled(REAL_MIB["flashinfer-cubin"], scale)),
        cached_wheel(d / f"flashinfer-jit-cache-r{jit_rev}", "flashinfer-jit-cache", "0.6.12",
                     {"flashinfer_jit_cache/__init__.py":
                      _rebuilt('__version__ = "0.6.12"\n', jit_rev)},
                     pad_bytes=_scaled(REAL_MIB["flashinfer-jit-cache"], scale)),
    ]


def real_size_served(scale: float, transformers_next: bool = False) -> list[Path]:
    """What the real-size stand-in stack's index serves at ``scale``: torch 2.11.0+cu130
    (``torch.version.cuda == "13.0"``) pinning the nvidia-* libraries of REAL_NVIDIA,
    torch 2.10.0+cpu (``None``, small), torchvision pinning torch==2.10.0, transformers
    4.57.1 and 5.0.0 (and REAL_TRANSFORMERS_NEXT with ``transformers_next``: a later
    upload), tokenizers, and uv."""
    d = real_size_dir(scale) / "served"
    transformers = [*REAL_TRANSFORMERS, *([REAL_TRANSFORMERS_NEXT] if transformers_next else [])]
    return [
        cached_wheel(d, "torch", "2.11.0+cu130",
                     {"torch/__init__.py": TORCH_INIT.format(version="2.11.0+cu130"),
                      "torch/version.py": 'cuda = "13.0"\n'},
                     requires=[f"{n}=={v}; platform_system == 'Linux'" for n, v, _ in REAL_NVIDIA],
                     pad_bytes=_scaled(REAL_MIB["torch"], scale)),
        cached_wheel(d, "torch", "2.10.0+cpu",
                     {"torch/__init__.py": TORCH_INIT.format(version="2.10.0+cpu"),
                      "torch/version.py": "cuda = None\n"}),
        cached_wheel(d, "torchvision", TORCHVISION_VERSION,
                     {"torchvision/__init__.py": f'__version__ = "{TORCHVISION_VERSION}"\n'},
                     requires=["torch==2.10.0"], pad_bytes=_scaled(REAL_MIB["torchvision"], scale)),
        *(cached_wheel(d, "transformers", v, {"transformers/__init__.py": f'__version__ = "{v}"\n'},
                       requires=["tokenizers<=0.23.0,>=0.22.0"],
                       pad_bytes=_scaled(REAL_MIB["transformers"], scale)) for v in transformers),
        *(cached_wheel(d, "tokenizers", v, {"tokenizers/__init__.py": f'__version__ = "{v}"\n'},
                       pad_bytes=_scaled(REAL_MIB["tokenizers"], scale)) for v in TOKENIZERS),
        *(cached_wheel(d, n, v, {f"{n.replace('-', '_')}/__init__.py": f'__version__ = "{v}"\n'},
                       pad_bytes=_scaled(mib, scale)) for n, v, mib in REAL_NVIDIA),
        ensure_uv_wheel(),
    ]


def index_answers_at(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{INDEX_HOST}:{port}/simple/", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def start_index_at(root: Path, port: int) -> None:
    """Serve the index build_index_at() wrote to ``root`` on INDEX_HOST:``port``, as
    start_index() serves the bed's (pid file and log beside ``root``); stop_index_at()."""
    pidfile, marker = root.with_name(root.name + ".pid"), str(root)
    if pid_alive(pidfile, marker) and index_answers_at(port):
        return
    stop_pidfile(pidfile, marker, f"wheel index {root}")
    spawn([sys.executable, "-m", "http.server", "--bind", INDEX_HOST, str(port),
           "--directory", marker], root.with_name(root.name + ".log"), pidfile)
    for _ in range(50):
        if index_answers_at(port):
            log(f"wheel index {root} on http://{INDEX_HOST}:{port}/simple")
            return
        time.sleep(0.1)
    die(f"the wheel index {root} did not answer on {INDEX_HOST}:{port}",
        f"is the port taken? see {root.with_name(root.name + '.log')}")


def stop_index_at(root: Path) -> None:
    """Stop what start_index_at(``root``, ...) started (by its pid file)."""
    stop_pidfile(root.with_name(root.name + ".pid"), str(root), f"wheel index {root}")


# -- engines of a benchmark's own --------------------------------------------------------------
#
# A benchmark that measures what reaches each worker cannot share engines with tests
# running at the same time: they build images of the same names on the head and
# reset-workers empties every worker under workers/. These are a head and workers of
# the same kind (dockerd on the classic store; each worker behind its own sshd) under
# bench-real/engines/, on addresses the bed does not use (127.0.1.N:2222); 'testbed
# down', reset-workers and 'up --fresh' never touch them.

BENCH_ENGINES = BENCH_REAL / "engines"


def bench_engine_dir(node: str) -> Path:
    """'head' or 'w1', 'w2', ... of the benchmark's own engines."""
    return BENCH_ENGINES / node


def bench_socket(node: str) -> Path:
    return bench_engine_dir(node) / "docker.sock"


def bench_worker_addr(i: int) -> str:
    if not 1 <= i <= 254:
        die(f"the benchmark's engines have room for 254 workers, not {i}")
    return f"127.0.1.{i}"


def bench_ssh_config() -> Path:
    return BENCH_ENGINES / "ssh" / "config"


def bench_inventory() -> Path:
    """The cluster inventory of the benchmark's workers, for a spec's cluster.inventory."""
    return BENCH_ENGINES / "cluster.yaml"


def bench_engines_up(n: int = 3) -> list[str]:
    """Start (idempotent) the benchmark's head and ``n`` workers, with the bed's base image
    on the head; returns the workers' names. bench_engines_down() stops them."""
    if os.geteuid() != 0:
        die("the benchmark's engines run dockerd and sshd, which need root")
    workers = workers_list(n)
    write_ssh(BENCH_ENGINES / "ssh", [(w, bench_worker_addr(i), bench_engine_dir(w))
                                      for i, w in enumerate(workers, 1)], "imagebuild-bench")
    for node in ["head", *workers]:
        start_dockerd_at(bench_engine_dir(node), bench_socket(node), f"bench dockerd {node}",
                         [])
    for i, node in enumerate(["head", *workers]):
        deadline = time.monotonic() + 60
        while not engine_answers_at(bench_socket(node)):
            if time.monotonic() > deadline:
                die(f"bench dockerd {node} did not answer within 60s",
                    f"see {bench_engine_dir(node) / 'dockerd.log'}")
            time.sleep(0.3)
        if i:
            start_sshd_at(bench_worker_addr(i), node, bench_engine_dir(node),
                          bench_socket(node), BENCH_ENGINES / "ssh")
    for w in workers:
        r = subprocess.run(["ssh", "-F", str(bench_ssh_config()), w, "docker", "version",
                            "--format", "{{.Server.Version}}"], capture_output=True, text=True,
                           timeout=30)
        if r.returncode != 0:
            die(f"ssh to bench worker {w} does not reach its engine: {r.stderr.strip()}")
    bench_inventory().write_text("\n".join(
        ["# cluster inventory of the benchmark's own workers (testbed.bench_engines_up)",
         f"ssh_config: {bench_ssh_config()}", "workers:",
         *(f"  - name: {w}\n    address: {w}" for w in workers)]) + "\n")
    head = ["docker", "-H", f"unix://{bench_socket('head')}"]
    if subprocess.run([*head, "image", "inspect", BASE_IMAGE], capture_output=True).returncode:
        tarball = cached_rootfs(SUITE, "python3,python3-pip,python3-venv,ca-certificates",
                                "python", slimmed=True)
        run([*head, "import", *IMPORT_CHANGES, str(tarball), BASE_IMAGE],
            stdout=subprocess.DEVNULL)
    return workers


def bench_engines_down() -> None:
    """Stop the benchmark's engines and sshds (by their pid files); their data stays."""
    if not BENCH_ENGINES.is_dir():
        return
    for d in sorted(p for p in BENCH_ENGINES.iterdir() if (p / "docker.pid").exists()
                    or (p / "sshd.pid").exists()):
        stop_pidfile(d / "sshd.pid", str(d / "sshd_config"), f"bench sshd {d.name}")
        stop_pidfile(d / "docker.pid", str(d), f"bench dockerd {d.name}")


def bench_reset(node: str, keep: tuple[str, ...] = ()) -> None:
    """Remove every container and every image but ``keep`` (references) from one of the
    benchmark's engines."""
    cli = ["docker", "-H", f"unix://{bench_socket(node)}"]
    ids = run([*cli, "ps", "-aq"], capture_output=True).stdout.split()
    if ids:
        run([*cli, "rm", "-f", *ids], capture_output=True)
    kept = {subprocess.run([*cli, "image", "inspect", "--format", "{{.Id}}", ref],
                           capture_output=True, text=True).stdout.strip() for ref in keep}
    for _ in range(5):  # a parent goes once its children have gone
        images = run([*cli, "images", "-q", "--no-trunc"], capture_output=True).stdout.split()
        drop = sorted(set(images) - kept)
        if not drop:
            return
        subprocess.run([*cli, "rmi", "-f", *drop], capture_output=True)


# -- the registry ----------------------------------------------------------------------------


def registry_answers() -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{REGISTRY_ADDR}/v2/", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start_registry() -> None:
    """CNCF distribution from Debian's docker-registry package on REGISTRY_ADDR, plain
    HTTP, its blobs under registry/data (the engines list it in insecure-registries)."""
    d = BED / "registry"
    pidfile, conf = d / "registry.pid", d / "config.yml"
    if pid_alive(pidfile, str(conf)) and registry_answers():
        return
    stop_pidfile(pidfile, str(conf), "registry")
    (d / "data").mkdir(parents=True, exist_ok=True)
    conf.write_text(json.dumps({
        "version": 0.1, "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(d / "data")},
                    "delete": {"enabled": True}},
        "http": {"addr": REGISTRY_ADDR},
    }, indent=2) + "\n")
    spawn([which("docker-registry") or "docker-registry", "serve", str(conf)],
          d / "registry.log", pidfile)
    for _ in range(100):
        if registry_answers():
            log(f"registry on http://{REGISTRY_ADDR}")
            return
        time.sleep(0.1)
    die(f"the registry did not answer on {REGISTRY_ADDR}", f"see {d / 'registry.log'}")


def stop_registry() -> None:
    d = BED / "registry"
    stop_pidfile(d / "registry.pid", str(d / "config.yml"), "registry")


# -- fixture git repositories (sources for the wheel builder) ------------------------------

VLLM_SRC_VERSION = "0.22.1rc1.dev124+gace95c9cf"
FIXTURE_GIT_ID = ("imagebuild test bed", "testbed@imagebuild.invalid")
FIXTURE_KERNEL_FILES = 6
FIXTURE_KERNELS_PER_FILE = 100  # 1.4-1.9 s of gcc -O2 per file on one core of a 2-core VM

# The import of the compiled extension that the fixture appends to VLLM_INIT: 'import vllm'
# succeeds only where the wheel's _C was built for that interpreter and loads.
VLLM_EXT_INIT = '''
# the compiled kernels (csrc/)
from . import _C

KERNELS = _C.kernel_count()
FIXTURE_REVISION = {revision}
'''

VLLM_SETUP = '''import os
import shutil

from setuptools import Extension, setup

# Like vllm's own build, which makes ccache CMake's compiler launcher when it is on PATH:
# distutils splits CC into words and derives LDSHARED from it.
if shutil.which("ccache") and "CC" not in os.environ:
    os.environ["CC"] = "ccache gcc"

setup(
    name="vllm",
    version="{version}",
    packages=["vllm"],
    python_requires=">=3.9",
    install_requires=["torch==2.10.0", "transformers<5,>=4.56.0"],
    ext_modules=[
        Extension(
            "vllm._C",
            sources=["csrc/module.c"] + [f"csrc/kernels_{{i}}.c" for i in range({files})],
            extra_compile_args=["-O2"],
        )
    ],
)
'''

SETUPTOOLS_BUILD = '''[build-system]
requires = ["setuptools", "wheel"]
build-backend = "setuptools.build_meta"
'''

# a [project] table: setuptools 61 and later (Debian bookworm has 66.1) read it
FLASHINFER_PYPROJECT = SETUPTOOLS_BUILD + '''
[project]
name = "flashinfer-python"
version = "0.6.12"
requires-python = ">=3.9"
dependencies = ["torch"]

[tool.setuptools]
packages = ["flashinfer", "flashinfer.spdlog"]

# from the 3rdparty/spdlog submodule (as the real flashinfer's build reads its
# 3rdparty/cutlass and spdlog): a wheel built without the submodule fails here
[tool.setuptools.package-dir]
"flashinfer.spdlog" = "3rdparty/spdlog/include"
'''

# the submodule of the fixture flashinfer, by a relative URL (resolved against wherever
# the superproject is fetched from, as git does), so its commit is the same on every bed
FLASHINFER_GITMODULES = """[submodule "3rdparty/spdlog"]
\tpath = 3rdparty/spdlog
\turl = ../spdlog
"""
SPDLOG_VERSION_PY = 'VERSION = "1.14.1"  # the fixture spdlog, a submodule of flashinfer\n'

FIXTURE_GITIGNORE = "build/\n*.egg-info/\n__pycache__/\n*.so\n"

VLLM_MODULE_C = '''/* vllm._C of the imagebuild test bed: the generated kernels, two functions. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

{decls}

static PyObject *kernel_count(PyObject *self, PyObject *unused)
{{
    return PyLong_FromLong({count});
}}

static PyObject *checksum(PyObject *self, PyObject *unused)
{{
    uint32_t x[64], s = 0;
    for (int i = 0; i < 64; i++)
        x[i] = (uint32_t)i * 2654435761u;
{calls}
    return PyLong_FromUnsignedLong(s);
}}

static PyMethodDef methods[] = {{
    {{"kernel_count", kernel_count, METH_NOARGS, "How many kernels the extension holds."}},
    {{"checksum", checksum, METH_NOARGS, "Every kernel run once on fixed input."}},
    {{NULL, NULL, 0, NULL}},
}};

static struct PyModuleDef module = {{PyModuleDef_HEAD_INIT, "_C", NULL, -1, methods}};

PyMODINIT_FUNC PyInit__C(void)
{{
    return PyModule_Create(&module);
}}
'''

KERNEL_C = '''uint32_t k{f}_{i}(const uint32_t *x, int n)
{{
    uint32_t acc = {c0}u, aux = {c1}u;
    for (int j = 0; j < n; j++) {{
        uint32_t v = x[j] * {c2}u + acc;
        switch ((v >> {shift}) & 7) {{
        case 0: acc += v ^ {c3}u; break;
        case 1: acc = (acc << {rot}) | (acc >> {rrot}); break;
        case 2: aux ^= acc * {c4}u; acc -= aux; break;
        case 3: acc ^= (v >> 3) + (aux << 5); break;
        case 4: for (int k = 0; k < (int)(v & 3); k++) aux += acc ^ x[(j + k) % n]; break;
        case 5: acc = acc * {c5}u + (v % {mod}u); break;
        case 6: aux = (aux >> 1) ^ (-(aux & 1) & {c6}u); acc += aux; break;
        default: acc ^= v * {c1}u;
        }}
        if (acc & {bit}u) acc -= aux;
    }}
    return acc ^ aux;
}}
'''


def _det_ints(seed: str) -> Iterator[int]:
    """Deterministic 32-bit numbers from sha256 (not random: its algorithms may change
    between Python versions, and the fixture commits must be the same everywhere)."""
    n = 0
    while True:
        digest = hashlib.sha256(f"{seed}:{n}".encode()).digest()
        n += 1
        for i in range(0, 32, 4):
            yield int.from_bytes(digest[i:i + 4], "little")


def kernels_c(f: int) -> str:
    """csrc/kernels_<f>.c: FIXTURE_KERNELS_PER_FILE functions with loops and switches, all
    external and all called from one checksum function, so gcc optimises each of them (the
    compile time a compiler cache saves)."""
    r = _det_ints(f"vllm-kernels-{f}")
    out = [f"/* generated by the imagebuild test bed: kernels of file {f} */",
           "#include <stdint.h>", ""]
    for i in range(FIXTURE_KERNELS_PER_FILE):
        c = [next(r) | 1 for _ in range(7)]
        rot = 1 + next(r) % 30
        out.append(KERNEL_C.format(
            f=f, i=i, c0=c[0], c1=c[1], c2=c[2], c3=c[3], c4=c[4], c5=c[5], c6=c[6],
            shift=next(r) % 24, rot=rot, rrot=32 - rot, mod=3 + next(r) % 997,
            bit=1 << (next(r) % 32)))
    out.append(f"uint32_t kernels_{f}_checksum(const uint32_t *x, int n)\n{{\n"
               "    uint32_t s = 0;")
    out += [f"    s = s * 31u + k{f}_{i}(x, n);" for i in range(FIXTURE_KERNELS_PER_FILE)]
    out.append("    return s;\n}\n")
    return "\n".join(out)


# A fixture repo: its commits oldest first, as (message, author and committer date, the
# files the commit writes), and its annotated tags as name -> index of the commit. A file
# whose text is SUBMODULE + a fixture repo's name is a gitlink to that repo's newest
# commit (the repo is made first: fixture_specs lists it earlier).
FixtureCommit = tuple[str, str, dict[str, str]]
SUBMODULE = "submodule:"


def vllm_init(revision: int) -> str:
    return (VLLM_INIT.format(version=VLLM_SRC_VERSION)
            + VLLM_EXT_INIT.format(revision=revision))


def fixture_specs() -> dict[str, tuple[list[FixtureCommit], dict[str, int]]]:
    files = range(FIXTURE_KERNEL_FILES)
    module_c = VLLM_MODULE_C.format(
        decls="\n".join(f"uint32_t kernels_{f}_checksum(const uint32_t *x, int n);"
                        for f in files),
        count=FIXTURE_KERNEL_FILES * FIXTURE_KERNELS_PER_FILE,
        calls="\n".join(f"    s ^= kernels_{f}_checksum(x, 64);" for f in files))
    vllm_tree = {
        ".gitignore": FIXTURE_GITIGNORE,
        "pyproject.toml": SETUPTOOLS_BUILD,
        "setup.py": VLLM_SETUP.format(version=VLLM_SRC_VERSION, files=FIXTURE_KERNEL_FILES),
        "vllm/__init__.py": vllm_init(1),
        "csrc/module.c": module_c,
        **{f"csrc/kernels_{f}.c": kernels_c(f) for f in files},
    }
    flashinfer_tree = {
        ".gitignore": FIXTURE_GITIGNORE,
        "pyproject.toml": FLASHINFER_PYPROJECT,
        "flashinfer/__init__.py": '__version__ = "0.6.12"\n',
        ".gitmodules": FLASHINFER_GITMODULES,
        "3rdparty/spdlog": SUBMODULE + "spdlog",
    }
    return {
        "spdlog": ([("spdlog fixture", "2026-06-01T12:00:00+00:00",
                     {"include/spdlog_version.py": SPDLOG_VERSION_PY})], {}),
        # the second commit changes one line of Python: a rebuild compiles the same C
        "vllm": ([("vllm fixture", "2026-06-03T12:00:00+00:00", vllm_tree),
                  ("vllm fixture: revision 2", "2026-06-04T12:00:00+00:00",
                   {"vllm/__init__.py": vllm_init(2)})],
                 {"v0.22.1rc1": 0}),
        "flashinfer": ([("flashinfer fixture", "2026-06-03T12:00:00+00:00", flashinfer_tree)],
                       {}),
    }


def fixture_git(repo: Path, *args: str, date: str = "2026-06-03T12:00:00+00:00",
                **kw: object) -> subprocess.CompletedProcess[str]:
    """git in ``repo`` with nothing from the host that could change a commit hash: no GIT_*
    variables, no system or global config (HOME), a fixed identity, dates and branch."""
    name, email = FIXTURE_GIT_ID
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull, LC_ALL="C", TZ="UTC",
               GIT_AUTHOR_NAME=name, GIT_AUTHOR_EMAIL=email, GIT_AUTHOR_DATE=date,
               GIT_COMMITTER_NAME=name, GIT_COMMITTER_EMAIL=email, GIT_COMMITTER_DATE=date)
    return run(["git", "-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false",
                "-c", "tag.gpgsign=false", "-c", f"user.name={name}", "-c", f"user.email={email}",
                "-c", "core.autocrlf=false", "-c", "core.fileMode=true",
                "-C", str(repo), *args], env=env, **kw)


def _fixture_digest(spec: tuple[list[FixtureCommit], dict[str, int]]) -> str:
    """Of the repo's content, and of every fixture repo it has as a submodule."""
    subs = sorted({t.removeprefix(SUBMODULE) for _m, _d, files in spec[0]
                   for t in files.values() if t.startswith(SUBMODULE)})
    specs = fixture_specs()
    material = [spec, *(_fixture_digest(specs[n]) for n in subs)]
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _fixture_marker(repo: Path) -> Path:
    return repo / ".git" / "imagebuild-fixture"


def _make_fixture_repo(repo: Path, spec: tuple[list[FixtureCommit], dict[str, int]]) -> None:
    commits, tags = spec
    repo.mkdir(parents=True)
    fixture_git(repo, "init", "-q")
    for n, (message, date, files) in enumerate(commits):
        links = {rel: t for rel, t in files.items() if t.startswith(SUBMODULE)}
        for rel, text in sorted(files.items()):
            path = repo / rel
            if rel in links:
                path.mkdir(parents=True, exist_ok=True)  # as a checkout without it has
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(text.encode())
            path.chmod(0o644)  # the tree records the mode: no executable bit, whatever umask
        fixture_git(repo, "add", "-A", date=date)
        for rel, text in sorted(links.items()):
            sha = fixture_commits(text.removeprefix(SUBMODULE))[-1]
            fixture_git(repo, "update-index", "--add", "--cacheinfo", f"160000,{sha},{rel}",
                        date=date)
        fixture_git(repo, "commit", "-q", "-m", message, date=date)
        for tag in sorted(t for t, i in tags.items() if i == n):
            fixture_git(repo, "tag", "-a", tag, "-m", tag, date=date)
    _fixture_marker(repo).write_text(_fixture_digest(spec) + "\n")  # last: the repo is whole


def ensure_fixture_repos() -> dict[str, Path]:
    """Plain git repositories under git/ for the wheel builder to clone (no network), with
    the same commit hashes on every machine; made again when missing or when their content
    here changed (the marker holds a digest of it)."""
    paths: dict[str, Path] = {}
    with locked(BED / "git" / "fixtures.lock"):
        for name, spec in fixture_specs().items():
            repo = BED / "git" / name
            paths[name] = repo
            marker = _fixture_marker(repo)
            if marker.is_file() and marker.read_text().strip() == _fixture_digest(spec):
                continue
            tmp = BED / "git" / f".{name}.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            _make_fixture_repo(tmp, spec)
            if repo.exists():
                shutil.rmtree(repo)
            os.replace(tmp, repo)
            log(f"fixture repo {repo} at {fixture_commits(name)[-1][:12]}")
    return paths


def fixture_commits(name: str) -> list[str]:
    """The full commit hashes of fixture repo ``name`` (vllm, flashinfer), oldest first."""
    repo = BED / "git" / name
    if not _fixture_marker(repo).is_file():
        die(f"no fixture repo {repo}", "scripts/testbed up makes it (ensure_fixture_repos())")
    out = fixture_git(repo, "rev-list", "--reverse", "HEAD", capture_output=True).stdout
    return out.split()


# -- ssh workers ---------------------------------------------------------------------------


def worker_addr(i: int) -> str:
    """w1 on 127.0.0.2, ...; 127.0.0.9 is c1's, so w8 and up are one further."""
    last = i + 1 if i + 1 < 9 else i + 2
    if last > 254:
        die(f"the bed has room for 252 workers, not {i}")
    return f"127.0.0.{last}"


def keygen(path: Path, comment: str) -> None:
    if path.is_file():
        return
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def ensure_ssh(workers: list[tuple[str, str]]) -> None:
    """Client key, known_hosts and ssh config for ``(name, address)`` workers."""
    write_ssh(BED / "ssh", [(w, addr, node_dir(w)) for w, addr in workers],
              "imagebuild-testbed")


def write_ssh(sshdir: Path, workers: list[tuple[str, str, Path]], who: str) -> None:
    """In ``sshdir``: a client key (authorized on every worker), known_hosts with each
    worker's host key (made in its directory) and an ssh config, for ``(name, address,
    directory)`` workers on SSH_PORT."""
    sshdir.mkdir(parents=True, exist_ok=True)
    os.chmod(sshdir, 0o700)
    keygen(sshdir / "id_ed25519", f"{who}-client")
    (sshdir / "authorized_keys").write_text((sshdir / "id_ed25519.pub").read_text())
    known = []
    config = [f"# ssh config of {who}: ssh -F {sshdir / 'config'} w1 docker info"]
    for w, addr, wd in workers:
        wd.mkdir(parents=True, exist_ok=True)
        keygen(wd / "ssh_host_ed25519_key", f"{who}-{w}")
        hostkey = (wd / "ssh_host_ed25519_key.pub").read_text().split()
        known.append(f"[{addr}]:{SSH_PORT} {hostkey[0]} {hostkey[1]}")
        config += [
            "", f"Host {w}", f"  HostName {addr}", f"  Port {SSH_PORT}", "  User root",
            f"  IdentityFile {sshdir / 'id_ed25519'}", "  IdentitiesOnly yes",
            f"  UserKnownHostsFile {sshdir / 'known_hosts'}", "  StrictHostKeyChecking yes",
            "  BatchMode yes", "  ConnectTimeout 5", "  ServerAliveInterval 5",
            "  ServerAliveCountMax 3",
        ]
    (sshdir / "known_hosts").write_text("\n".join(known) + "\n")
    (sshdir / "config").write_text("\n".join(config) + "\n")


def start_sshd(addr: str, w: str) -> None:
    start_sshd_at(addr, w, node_dir(w), socket_of(w), BED / "ssh")


def start_sshd_at(addr: str, w: str, wd: Path, sock: Path, sshdir: Path) -> None:
    """Worker ``w``'s sshd on ``addr``: its sessions talk to the dockerd on ``sock``."""
    pidfile = wd / "sshd.pid"
    conf = wd / "sshd_config"
    conf.write_text("\n".join([
        f"# sshd of worker {w}: its sessions talk to this worker's dockerd",
        f"ListenAddress {addr}:{SSH_PORT}",
        f"HostKey {wd / 'ssh_host_ed25519_key'}",
        f"PidFile {pidfile}",
        f"AuthorizedKeysFile {sshdir / 'authorized_keys'}",
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "PrintMotd no",
        f"SetEnv DOCKER_HOST=unix://{sock}",
        "MaxStartups 50:30:100",
        "",
    ]))
    if pid_alive(pidfile, str(conf)):
        return
    Path("/run/sshd").mkdir(exist_ok=True)
    run([which("sshd") or "/usr/sbin/sshd", "-f", str(conf), "-E", str(wd / "sshd.log")])
    for _ in range(50):
        if pid_alive(pidfile, str(conf)):
            return
        time.sleep(0.1)
    die(f"sshd for {w} did not start", f"see {wd / 'sshd.log'}")


def ssh_answers(w: str) -> bool:
    r = subprocess.run(["ssh", "-F", str(BED / "ssh" / "config"), w, "docker", "version",
                        "--format", "{{.Server.Version}}"], capture_output=True, text=True,
                       timeout=30)
    return r.returncode == 0


# -- commands ------------------------------------------------------------------------------


def workers_list(n: int) -> list[str]:
    return [f"w{i}" for i in range(1, n + 1)]


def write_inventory(workers: list[str]) -> None:
    lines = ["# cluster inventory of the imagebuild test bed (written by scripts/testbed up)",
             f"ssh_config: {BED / 'ssh' / 'config'}", "workers:"]
    lines += [f"  - name: {w}\n    address: {w}" for w in workers]
    (BED / "cluster.yaml").write_text("\n".join(lines) + "\n")
    (BED / "workers.count").write_text(f"{len(workers)}\n")
    (BED / "cluster-containerd.yaml").write_text("\n".join([
        "# the containerd-store worker of the imagebuild test bed", 
        f"ssh_config: {BED / 'ssh' / 'config'}", "workers:",
        f"  - name: {CTRD}\n    address: {CTRD}"]) + "\n")


def env_text(store: str) -> str:
    return "\n".join([
        f"# the test bed, its head on the {store} image store",
        f"export IMAGEBUILD_BED={BED}",
        f"export DOCKER_HOST=unix://{socket_of(head_node(store))}",
        f"export IMAGEBUILD_SSH_CONFIG={BED / 'ssh' / 'config'}",
        "# the test stack's architecture: this host's",
        *(f"export {k}={v}" for k, v in arch_env(host_arch()).items()),
    ]) + "\n"


def default_head_store() -> str:
    """--head-store when not given: $IMAGEBUILD_BED_HEAD_STORE, else classic."""
    return os.environ.get("IMAGEBUILD_BED_HEAD_STORE") or "classic"


def wipe_engines() -> None:
    """Stop the bed and remove every engine's data and the bed's state, keeping cache/."""
    cmd_down()
    left = bed_mounts()
    if left:  # never remove a tree with a mount under it: c1 binds the host's /dev
        die(f"refusing to wipe {BED}: still mounted there: {', '.join(left[:3])}")
    for name in ("head", "workers", CTRD, CHEAD, "state", "backups", "remote-backups",
                 "bench", "registry"):
        path = BED / name
        if path.exists():
            shutil.rmtree(path)
    log("wiped the engines' data (kept the cache)")


def cmd_up(n: int, fresh: bool = False, store: str = "classic") -> None:
    t0 = time.monotonic()
    head_node(store)  # a bad --head-store fails before anything starts
    if os.geteuid() != 0:
        die("the test bed runs dockerd and sshd, which need root", "run it as root (or sudo)")
    if fresh and BED.is_dir():
        wipe_engines()
    elif BED.is_dir() and chroot_suite() not in (None, CTRD_SUITE):
        # the containerd-store engines' Docker changed: their data is the old engine's
        log(f"the containerd-store engines move from Debian {chroot_suite()} to "
            f"{CTRD_SUITE}: starting every engine empty (the cache stays)")
        wipe_engines()
    BED.mkdir(parents=True, exist_ok=True)
    ensure_packages()
    ensure_fixture_repos()
    workers = workers_list(n)
    shutil.rmtree(BED / "index-extra", ignore_errors=True)  # 'up' serves the fixtures only
    build_index(index_files())
    start_index()
    start_registry()
    start_dockerd("head")
    ensure_ssh([*((w, worker_addr(i)) for i, w in enumerate(workers, 1)), (CTRD, CTRD_ADDR)])
    for w in workers:
        start_dockerd(w)
    for node in CHROOT_ENGINES:
        start_chroot_engine(node)
    wait_engine("head")
    ensure_base_image("head")
    wait_engine(CHEAD)
    ensure_base_image(CHEAD)
    for i, w in enumerate(workers, 1):
        wait_engine(w)
        start_sshd(worker_addr(i), w)
    wait_engine(CTRD)
    start_sshd(CTRD_ADDR, CTRD)
    for w in [*workers, CTRD]:
        if not ssh_answers(w):
            die(f"ssh to worker {w} does not reach its engine",
                f"try: ssh -F {BED / 'ssh' / 'config'} -v {w} docker info; logs in {node_dir(w)}")
    write_inventory(workers)
    (BED / "env").write_text(env_text(store))
    log(f"up in {time.monotonic() - t0:.1f}s: heads on both image stores (env: {store}), "
        f"{n} ssh workers, a containerd-store worker ({CTRD}), wheel index, registry")
    print(env_text(store), end="")


def worker_nodes() -> list[str]:
    wdir = BED / "workers"
    nodes = sorted(p.name for p in wdir.iterdir()) if wdir.is_dir() else []
    return [*nodes, CTRD] if node_dir(CTRD).is_dir() else nodes


def all_nodes() -> list[str]:
    heads = ["head", *([CHEAD] if node_dir(CHEAD).is_dir() else [])]
    return [*heads, *worker_nodes()]


def engine_marker(node: str) -> str:
    """What the command line of ``node``'s dockerd contains (pid files are checked)."""
    return run_dir(node) + "/" if node in CHROOT_ENGINES else str(node_dir(node))


def cmd_down() -> None:
    if not BED.is_dir():
        return
    for node in CHROOT_ENGINES:
        stop_chroot_engine(node)
    for node in reversed(all_nodes()):
        d = node_dir(node)
        if node not in HEADS.values():
            stop_pidfile(d / "sshd.pid", str(d / "sshd_config"), f"sshd {node}")
        stop_pidfile(d / "docker.pid", engine_marker(node), f"dockerd {node}")
    stop_pidfile(BED / "index.pid", str(BED / "index"), "wheel index")
    stop_registry()
    unmount_leftovers()


def bed_mounts() -> list[str]:
    """Mount points at or below BED, as /proc/mounts lists them (one per mount)."""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return []
    points = [ln.split()[1] for ln in lines if len(ln.split()) > 1]
    return [p for p in points if p == str(BED) or p.startswith(str(BED) + "/")]


def unmount_leftovers() -> None:
    """Unmount what the bed's engines left mounted under the bed (exec-root/netns, c1's
    proc, sys, dev and its root bind), so the bed directory can be removed. Mounts can be
    stacked (a bind over a directory that has mounts of its own): read /proc/mounts
    again after each round until none is left. Only mount points below BED are touched."""
    for _ in range(10):
        ours = bed_mounts()
        if not ours:
            return
        for point in sorted(set(ours), key=len, reverse=True):
            r = subprocess.run(["umount", "-l", point], capture_output=True, text=True)
            if r.returncode == 0:
                log(f"unmounted {point}")
    left = bed_mounts()
    if left:
        die(f"{len(left)} mounts under {BED} would not unmount: {', '.join(left[:3])}",
            "unmount them by hand before removing the bed")


def cmd_status() -> int:
    bad = 0
    for node in all_nodes():
        d = node_dir(node)
        ok = bool(pid_alive(d / "docker.pid", engine_marker(node))) and engine_answers(node)
        line = f"{node:6} dockerd {'up' if ok else 'DOWN'}"
        bad += not ok
        if node not in HEADS.values():
            sok = bool(pid_alive(d / "sshd.pid", str(d / "sshd_config")))
            line += f", sshd {'up' if sok else 'DOWN'}"
            bad += not sok
        print(line)
    iok = index_answers()
    print(f"index  {'up' if iok else 'DOWN'} (http://{INDEX_HOST}:{INDEX_PORT}/simple)")
    rok = registry_answers()
    print(f"registry {'up' if rok else 'DOWN'} (http://{REGISTRY_ADDR}/v2/)")
    return 1 if bad or not iok or not rok else 0


def cmd_builder(nodes: list[str]) -> None:
    for node in nodes:
        if not engine_answers(node):
            die(f"the {node} engine does not answer", "start the bed first: scripts/testbed up")
        ensure_builder_image(node)
    log(f"{BUILDER_IMAGE} is on {', '.join(nodes)}")


def cmd_reset_workers() -> None:
    """Empty the bed's worker engines (only ours: reached through the bed's own sockets),
    all at once: the engines are independent, and tests call this before each scenario."""
    with ThreadPoolExecutor(max_workers=len(worker_nodes()) or 1) as pool:
        list(pool.map(reset_node, worker_nodes()))


def reset_node(node: str) -> None:
    if engine_answers(node):
        ids = docker(node, "ps", "-aq", capture_output=True).stdout.split()
        if ids:
            docker(node, "rm", "-f", *ids, capture_output=True)
        images = docker(node, "images", "-aq", capture_output=True).stdout.split()
        if images:
            docker(node, "rmi", "-f", *sorted(set(images)), capture_output=True)
        hidden = []
        if node in CHROOT_ENGINES:
            # records docker does not list: Docker 26.1's containerd store hides a tagged
            # image whose target a moby-dangling@ record shares (left when an image held
            # by a container is replaced under its tag), and every list goes empty
            hidden = ctr(node, "images", "ls", "-q", capture_output=True).stdout.split()
            if hidden:
                ctr(node, "images", "rm", *hidden, capture_output=True)
        log(f"reset {node}: removed {len(ids)} containers, {len(set(images))} images"
            + (f", {len(hidden)} image records docker did not list" if hidden else ""))


def main() -> int:
    p = argparse.ArgumentParser(prog="testbed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up")
    up.add_argument("--workers", type=int, default=int(os.environ.get("IMAGEBUILD_BED_WORKERS", 3)))
    up.add_argument("--fresh", action="store_true",
                    help="start from empty engines (the debootstrap and uv cache is kept)")
    for p_ in (up, sub.add_parser("env")):
        p_.add_argument("--head-store", choices=sorted(HEADS), default=default_head_store(),
                        help="the image store of the head DOCKER_HOST names (both run)")
    sub.add_parser("down")
    sub.add_parser("status")
    sub.add_parser("reset-workers")
    builder = sub.add_parser("builder", help=f"import {BUILDER_IMAGE} into the heads")
    builder.add_argument("--head-store", choices=sorted(HEADS), default=None,
                         help="only into the head on this image store (default: both)")
    args = p.parse_args()
    if args.cmd == "up":
        cmd_up(args.workers, fresh=args.fresh, store=args.head_store)
    elif args.cmd == "down":
        cmd_down()
    elif args.cmd == "env":
        print(env_text(args.head_store), end="")
    elif args.cmd == "status":
        return cmd_status()
    elif args.cmd == "reset-workers":
        cmd_reset_workers()
    elif args.cmd == "builder":
        cmd_builder([head_node(args.head_store)] if args.head_store else list(HEADS.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
