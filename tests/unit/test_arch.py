"""The test stack on either architecture a head runs (x86_64, or aarch64 as a GB10 is):
the bed picks the host's, the spec reads it from the bed's env, and each architecture's
committed locks are its own. No aarch64 hardware needed: what is chosen is checked here,
and tests/integration/test_lock.py checks both architectures' locks against the bed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from imagebuild.closure import read_closure
from imagebuild.errors import SpecError
from imagebuild.lock import parse_wheel, read_lock
from imagebuild.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import testbed  # noqa: E402

MINI = REPO / "examples" / "mini" / "imagebuild.yaml"
IMAGES = ("vllm-node", "vllm-node-tf5", "vllm-node-mimo")


@pytest.mark.parametrize(("machine", "arch"), [
    ("x86_64", "x86_64"), ("amd64", "x86_64"), ("aarch64", "aarch64"), ("arm64", "aarch64")])
def test_the_host_architecture_names_the_test_stack_s(machine: str, arch: str) -> None:
    assert testbed.host_arch(machine) == arch
    env = testbed.arch_env(arch)
    assert env["IMAGEBUILD_BED_ARCH"] == arch
    assert parse_wheel(env["IMAGEBUILD_BED_UV_WHEEL"]).name == "uv"
    assert arch in env["IMAGEBUILD_BED_UV_WHEEL"]


def test_another_architecture_is_refused_with_what_is_supported(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        testbed.host_arch("riscv64")
    assert "x86_64 and aarch64 hosts, not riscv64" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_the_committed_stack_reads_its_architecture_from_the_env(
        arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in testbed.arch_env(arch).items():
        monkeypatch.setenv(key, value)
    spec = load_spec(MINI)
    assert spec.target.platform == f"{arch}-manylinux_2_28"
    assert spec.lock_path == MINI.parent / f"wheels.{arch}.lock"
    uv = next(d for d in spec.wheels if parse_wheel(d.filename).name == "uv")
    assert uv.filename == testbed.UV_WHEELS[arch]
    # that architecture's committed locks: the uv wheel and the closures' target
    locked = {w.name: w for w in read_lock(spec.lock_path).wheels}
    assert locked["uv"].filename == uv.filename and locked["uv"].sha256
    for image in IMAGES:
        path = spec.closure_lock_path(image)
        assert path.parent == MINI.parent / "locks" / arch
        assert read_closure(path, image).platform == f"{arch}-manylinux_2_28"


def test_without_the_bed_s_env_the_stack_is_x86_64(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGEBUILD_BED_ARCH", raising=False)
    monkeypatch.delenv("IMAGEBUILD_BED_UV_WHEEL", raising=False)
    spec = load_spec(MINI)
    assert spec.target.platform == "x86_64-manylinux_2_28"
    assert spec.lock_path.name == "wheels.x86_64.lock"


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_a_private_copy_of_the_stack_is_concrete(arch: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # what the bed's tests and benchmarks work on: no variable left for the architecture,
    # whatever the env says
    monkeypatch.setenv("IMAGEBUILD_BED_ARCH", "riscv64")
    text = testbed.copy_test_stack(tmp_path, arch)
    assert "${IMAGEBUILD_BED_ARCH" not in text and "${IMAGEBUILD_BED_UV_WHEEL" not in text
    text = text.replace("templates: ../../templates", f"templates: {REPO / 'templates'}")
    (tmp_path / "imagebuild.yaml").write_text(text)
    spec = load_spec(tmp_path / "imagebuild.yaml")
    assert spec.target.platform == f"{arch}-manylinux_2_28"
    assert spec.lock_path == tmp_path / "wheels.lock"
    assert read_lock(spec.lock_path).wheels == read_lock(
        MINI.parent / f"wheels.{arch}.lock").wheels
    assert sorted(p.name for p in (tmp_path / "locks").iterdir()) == sorted(
        f"pylock.{i}.toml" for i in IMAGES)


def test_a_variable_in_the_target_or_a_wheel_name_is_checked_once_expanded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = testbed.copy_test_stack(tmp_path, "x86_64").replace(
        "templates: ../../templates", f"templates: {REPO / 'templates'}")
    spec = tmp_path / "imagebuild.yaml"
    spec.write_text(text.replace("platform: x86_64-manylinux_2_28",
                                 "platform: ${NO_SUCH_ARCH}-manylinux_2_28"))
    monkeypatch.delenv("NO_SUCH_ARCH", raising=False)
    with pytest.raises(SpecError, match="uses the environment variable NO_SUCH_ARCH"):
        load_spec(spec)
    monkeypatch.setenv("NO_SUCH_ARCH", "x86 64")  # what it brings must pass the same check
    with pytest.raises(SpecError, match="is not a valid uv platform"):
        load_spec(spec)
    spec.write_text(text.replace(testbed.UV_WHEELS["x86_64"], "${UV_FILE}"))
    monkeypatch.setenv("UV_FILE", "uv.tar.gz")
    with pytest.raises(SpecError, match=r"'uv\.tar\.gz' is not a valid wheel filename"):
        load_spec(spec)


@pytest.mark.parametrize(("machine", "refused"), [
    ("x86_64", False), ("aarch64", False), ("arm64", False), ("riscv64", True)])
def test_try_and_test_refuse_a_host_the_test_stack_has_no_locks_for(
        machine: str, refused: bool, tmp_path: Path) -> None:
    # the check scripts/try and scripts/test make before installing anything, with a
    # uname that answers for the machine
    (tmp_path / "uname").write_text(f"#!/bin/sh\necho {machine}\n")
    (tmp_path / "uname").chmod(0o755)
    r = subprocess.run(["bash", "-c", '. scripts/setup.sh; ib_need_arch scripts/try; echo ok'],
                       cwd=REPO, capture_output=True, text=True,
                       env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    if refused:
        assert r.returncode == 1 and r.stdout == ""
        assert "scripts/try: the test bed and the test stack run on x86_64 and aarch64 " \
               "hosts, not riscv64" in r.stderr
    else:
        assert r.returncode == 0 and r.stdout == "ok\n", r.stderr
