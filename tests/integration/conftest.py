"""Fixtures on the real test bed (scripts/testbed): engines, ssh workers, the test stack.

A test that needs the bed carries ``@pytest.mark.bed``. When the bed is not up, those
tests are skipped on a developer machine — and fail the run when ``CI=true``: in CI a
missing engine is a failure, never a silent skip.

The bed runs two heads: ``head`` on the classic store (Docker 20.10, overlay2) and
``chead`` on the containerd image store (Docker 28.5). A test's head is the
``head_store`` fixture ("classic" unless the test is parametrized over ``HEAD_STORES``);
``bed_env``, ``mini`` and ``warm`` follow it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import testbed  # noqa: E402

MINI = REPO / "examples" / "mini" / "imagebuild.yaml"
HEAD_STORES = ("classic", "containerd")
# vllm-node's wheels in the test stack (mimo's line is followed by its own overrides)
NODE_WHEELS = ("    wheels: [vllm, flashinfer-python, flashinfer-cubin, flashinfer-jit-cache]\n"
               "    torch: torch\n    overrides:\n      - requirement: torch==2.11.0+cu130\n")


@dataclass(frozen=True)
class Bed:
    root: Path
    head_socket: Path
    ssh_config: Path
    workers: tuple[str, ...]
    head_store: str = "classic"

    def on(self, store: str) -> Bed:
        """The same bed with its head on ``store``."""
        return replace(self, head_store=store,
                       head_socket=testbed.socket_of(testbed.HEADS[store]))

    @property
    def head_node(self) -> str:
        return testbed.HEADS[self.head_store]

    @property
    def docker_host(self) -> str:
        return f"unix://{self.head_socket}"

    def ssh(self, worker: str, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        """Run a command on a worker through its sshd (the bed's ssh config, host keys on)."""
        return subprocess.run(["ssh", "-F", str(self.ssh_config), worker, *args],
                              capture_output=True, text=True, timeout=120, **kw)  # type: ignore

    def docker(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["docker", "-H", self.docker_host, *args], capture_output=True,
                              text=True, timeout=300)


def _bed_problem() -> str | None:
    if not testbed.BED.is_dir():
        return f"no test bed at {testbed.BED}: run scripts/testbed up"
    try:
        if testbed.cmd_status() != 0:
            return f"the test bed at {testbed.BED} is not fully up: run scripts/testbed up"
    except Exception as exc:
        return f"cannot inspect the test bed: {exc}"
    return None


@pytest.fixture(scope="session")
def bed() -> Iterator[Bed]:
    problem = _bed_problem()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and the test bed is required: {problem}", pytrace=False)
        pytest.skip(problem)
    count = int((testbed.BED / "workers.count").read_text())
    testbed.cmd_reset_workers()
    yield Bed(root=testbed.BED, head_socket=testbed.socket_of("head"),
              ssh_config=testbed.BED / "ssh" / "config",
              workers=tuple(testbed.workers_list(count)))


@pytest.fixture
def head_store() -> str:
    """The head's image store; tests override it with
    ``@pytest.mark.parametrize("head_store", HEAD_STORES)``."""
    return "classic"


@pytest.fixture
def bed_env(bed: Bed, head_store: str, monkeypatch: pytest.MonkeyPatch) -> Bed:
    """The environment `scripts/testbed env --head-store S` prints, applied to this test."""
    bed = bed.on(head_store)
    monkeypatch.setenv("IMAGEBUILD_BED", str(bed.root))
    monkeypatch.setenv("DOCKER_HOST", bed.docker_host)
    return bed


class MiniStack:
    """A private copy of the test stack (spec, templates, lock, wheels, state) in tmp.

    ``salt`` goes into vllm-node's env, so every copy has its own input hashes and its
    first build is really cold, whatever earlier runs left in the head engine.
    """

    def __init__(self, root: Path, bed: Bed, salt: str) -> None:
        self.root = root
        self.bed = bed
        shutil.copytree(REPO / "templates", root / "templates")
        shutil.copytree(bed.root / "wheels", root / "wheels")
        text = testbed.copy_test_stack(root)
        text = text.replace("templates: ../../templates", "templates: templates")
        text = text.replace("${IMAGEBUILD_BED:-/var/lib/imagebuild-bed}/wheels", "wheels")
        text = text.replace("${IMAGEBUILD_BED:-/var/lib/imagebuild-bed}/state", "state")
        text = text.replace("${IMAGEBUILD_BED:-/var/lib/imagebuild-bed}/backups", "backups")
        text = text.replace("        TORCH_CUDA_ARCH_LIST: 12.1a\n",
                            f"        TORCH_CUDA_ARCH_LIST: 12.1a\n"
                            f"        IMAGEBUILD_TEST_SALT: {salt}\n")
        assert "IMAGEBUILD_TEST_SALT" in text
        self.spec = root / "imagebuild.yaml"
        self.spec.write_text(text)

    def on(self, store: str) -> MiniStack:
        """The same stack (spec, state, backups) driven against the head on ``store``."""
        other = copy.copy(self)
        other.bed = self.bed.on(store)
        return other

    def edit_spec(self, old: str, new: str) -> None:
        text = self.spec.read_text()
        assert old in text, old
        self.spec.write_text(text.replace(old, new))

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, DOCKER_HOST=self.bed.docker_host, IMAGEBUILD_BED=str(self.bed.root))
        return subprocess.run([sys.executable, "-m", "imagebuild", "-f", str(self.spec), *args],
                              capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def mini(bed_env: Bed, tmp_path: Path) -> MiniStack:
    """A stack of its own: its first build is cold."""
    return MiniStack(tmp_path / "stack", bed_env, uuid.uuid4().hex[:12])


WARM_SALT = "warm-" + uuid.uuid4().hex[:8]  # one per test session


@pytest.fixture
def warm(bed_env: Bed, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[MiniStack]:
    """A stack of its own (spec, state, backups) whose images are the same derivations
    in every test of the session: the first such test builds them, the others reuse
    them by input hash, and start with the verify records earlier tests on this head
    wrote (a record holds for exactly one image ID, content and check set; the gate
    still judges it). Backups are each test's own. For tests that need built images,
    not a cold build."""
    stack = MiniStack(tmp_path / "stack", bed_env, WARM_SALT)
    records = tmp_path_factory.getbasetemp() / f"warm-records-{bed_env.head_store}"
    verified = stack.root / "state" / "verified"
    if records.is_dir():
        shutil.copytree(records, verified, dirs_exist_ok=True)
    yield stack
    if verified.is_dir():
        records.mkdir(exist_ok=True)
        for record in verified.glob("*.json"):
            shutil.copy2(record, records / record.name)


CLASSIC_CLUSTER = "inventory: ${IMAGEBUILD_BED:-/var/lib/imagebuild-bed}/cluster.yaml"
BOTH_CLUSTER = "inventory: ${IMAGEBUILD_BED:-/var/lib/imagebuild-bed}/cluster-both.yaml"


def use_every_worker_kind(stack: MiniStack) -> None:
    """Point the stack's cluster at the three classic workers and c1 (cluster-both.yaml,
    written from the bed's two inventories)."""
    bed = stack.bed.root
    both = (bed / "cluster.yaml").read_text() + (
        (bed / "cluster-containerd.yaml").read_text().split("workers:\n", 1)[1])
    (bed / "cluster-both.yaml").write_text(both)
    stack.edit_spec(CLASSIC_CLUSTER, BOTH_CLUSTER)


@contextlib.contextmanager
def full_disk(bed: Bed, worker: str) -> Iterator[None]:
    """A 4 MiB tmpfs over a classic worker's <data-root>/tmp, where dockerd unpacks a
    load and downloads a pull's layers: its next transfer runs out of space."""
    tmp = bed.root / "workers" / worker / "data" / "tmp"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "imagebuild-bed-full", str(tmp)],
                   check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(tmp)], check=True)
