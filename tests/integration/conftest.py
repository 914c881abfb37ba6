"""Fixtures on the real test bed (scripts/testbed): engines, ssh workers, the test stack.

A test that needs the bed carries ``@pytest.mark.bed``. When the bed is not up, those
tests are skipped on a developer machine — and fail the run when ``CI=true``: in CI a
missing engine is a failure, never a silent skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import testbed  # noqa: E402

MINI = REPO / "examples" / "mini" / "imagebuild.yaml"


@dataclass(frozen=True)
class Bed:
    root: Path
    head_socket: Path
    ssh_config: Path
    workers: tuple[str, ...]

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
    except Exception as exc:  # noqa: BLE001 - any failure to inspect means "not up"
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
def bed_env(bed: Bed, monkeypatch: pytest.MonkeyPatch) -> Bed:
    """The environment `scripts/testbed env` prints, applied to this test."""
    monkeypatch.setenv("IMAGEBUILD_BED", str(bed.root))
    monkeypatch.setenv("DOCKER_HOST", bed.docker_host)
    monkeypatch.setenv("IMAGEBUILD_STATE", str(bed.root / "state"))
    return bed
