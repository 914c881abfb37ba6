"""Wheels built from source on the bed: the fixture repositories (a vllm with a C
extension, a pure-Python flashinfer), the builder image, the head's engine.

Every test converts its own copy of the test stack: vllm and flashinfer-python move from
``wheels.local`` to ``wheels.build`` (the stack's own state directory holds the wheel
store and the git mirrors, so each test starts with neither)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from imagebuild.wheelbuild import JOB_LABEL

from .conftest import REPO, Bed, MiniStack, testbed

pytestmark = pytest.mark.bed

VLLM_LOCAL = "    - vllm-0.22.1rc1.dev124+gace95c9cf.d20260603.cu132-py3-none-any.whl\n"
FLASHINFER_LOCAL = "    - flashinfer_python-0.6.12-py3-none-any.whl\n"
BUILT_VLLM = f"vllm-0.22.1rc1.dev124+gace95c9cf-cp311-cp311-linux_{testbed.host_arch()}.whl"
BUILT_FLASHINFER = "flashinfer_python-0.6.12-py3-none-any.whl"
CUBIN = "flashinfer_cubin-0.6.12-py3-none-any.whl"


@pytest.fixture
def built(mini: MiniStack) -> MiniStack:
    """The test stack with vllm and flashinfer-python built from the fixture repos, and
    flashinfer-cubin a prebuilt wheel downloaded from a release URL (the bed's index
    serves it outside the index, as a release page would)."""
    testbed.ensure_builder_image(mini.bed.head_node)
    vllm, flashinfer = testbed.fixture_commits("vllm")[-1], testbed.fixture_commits(
        "flashinfer")[-1]
    cubin = testbed.BED / "wheels" / CUBIN
    url = testbed.release(cubin)
    sha = hashlib.sha256(cubin.read_bytes()).hexdigest()
    mini.edit_spec(VLLM_LOCAL, "")
    mini.edit_spec(FLASHINFER_LOCAL, "")
    mini.edit_spec(f"    - {CUBIN}\n", "")
    mini.edit_spec("  index:\n", f"""  url:
    - url: {url}
      sha256: "{sha}"
  build:
    - name: vllm
      git: {testbed.BED}/git/vllm
      commit: {vllm}
      builder: {testbed.BUILDER_IMAGE}
      env: {{MAX_JOBS: "2"}}
    - name: flashinfer-python
      git: file://{testbed.BED}/git/flashinfer
      commit: {flashinfer}
      builder: {testbed.BUILDER_IMAGE}
  index:
""")
    return mini


def _patch(tmp: Path, repo: str, path: str, old: str, new: str) -> Path:
    """A patch file (git diff) that replaces ``old`` with ``new`` in ``path`` of the
    fixture repo's newest commit."""
    work = tmp / f"patch-{repo}-{abs(hash((path, old, new)))}"
    subprocess.run(["git", "clone", "-q", str(testbed.BED / "git" / repo), str(work)],
                   check=True)
    target = work / path
    text = target.read_text()
    assert old in text, (path, old)
    target.write_text(text.replace(old, new))
    diff = subprocess.run(["git", "-C", str(work), "diff"], check=True, capture_output=True,
                          text=True).stdout
    out = tmp / "stack" / "patches" / f"{repo}-{len(list(tmp.glob('stack/patches/*')))}.patch"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(diff)
    shutil.rmtree(work)
    return out


def _add_patch(stack: MiniStack, wheel_commit_line: str, patch: Path) -> None:
    stack.edit_spec(wheel_commit_line,
                    f"{wheel_commit_line}      patches: [patches/{patch.name}]\n")


def _commit_line(name: str) -> str:
    return f"      commit: {testbed.fixture_commits(name)[-1]}\n"


def _records(stack: MiniStack) -> list[Path]:
    return sorted((stack.root / "state" / "wheel-store" / "derivations").glob("*.json"))


def _job_containers(bed: Bed) -> str:
    return bed.docker("ps", "-aq", "--filter", f"label={JOB_LABEL}").stdout.strip()


def _run_in(bed: Bed, image: str, code: str) -> str:
    r = bed.docker("run", "--rm", "--network", "none", image, "python3", "-c", code)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_cold_build_then_reuse_then_a_patch_rebuilds_only_that_wheel(built: MiniStack,
                                                                    tmp_path: Path) -> None:
    stack, bed = built, built.bed
    r = stack.cli("plan")
    assert r.returncode == 0, r.stderr
    assert "vllm" in r.stdout and r.stdout.count("build from") == 2
    assert "not in wheels.lock yet" in r.stdout
    # the lock step refuses, naming the wheels to build first; it writes nothing
    lock_before = (stack.root / "wheels.lock").read_text()
    r = stack.cli("lock")
    assert r.returncode == 2
    assert "vllm" in r.stderr and "flashinfer-python" in r.stderr
    assert "build-wheels" in r.stderr
    assert (stack.root / "wheels.lock").read_text() == lock_before

    # cold: both wheels built, the lock rewritten, the images built on them and verified
    r = stack.cli("build", timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.count("building from") == 2
    assert "the locks now record the wheels built from source" in r.stdout
    assert r.stdout.count("verified") == 3
    lock = (stack.root / "wheels.lock").read_text()
    assert f'filename = "{BUILT_VLLM}"' in lock and "source = \"built/" in lock
    assert len(_records(stack)) == 2
    # the image holds the compiled extension of the fixture's newest revision
    assert _run_in(bed, "vllm-node:latest",
                   "import vllm; print(vllm.FIXTURE_REVISION, vllm.KERNELS)") == "2 600"
    # flashinfer-cubin came from its release URL, into the wheel store, checked
    assert "fetching flashinfer_cubin-0.6.12-py3-none-any.whl from http://" in r.stderr
    assert 'source = "fetched/http://' in lock
    assert _run_in(bed, "vllm-node:latest",
                   "import flashinfer_cubin; print(flashinfer_cubin.__version__)") == "0.6.12"
    # flashinfer's 3rdparty/spdlog submodule was checked out (from its own mirror, at the
    # commit flashinfer pins) and built into the wheel
    assert _run_in(bed, "vllm-node:latest",
                   "import flashinfer.spdlog.spdlog_version as v; print(v.VERSION)") == "1.14.1"
    log = next((stack.root / "state" / "logs").glob("wheel-flashinfer-python-*.log"))
    assert f"# submodule 3rdparty/spdlog {testbed.fixture_commits('spdlog')[-1]}" in (
        log.read_text())
    assert _job_containers(bed) == ""

    # again: nothing fetched, nothing built, nothing re-locked
    r = stack.cli("build", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "building from" not in r.stderr and "fetching" not in r.stderr  # nor downloading
    assert r.stderr.count("reused") >= 2
    assert "built 0, restored 0, reused 3" in r.stdout
    assert (stack.root / "wheels.lock").read_text() == lock
    hashes = {i["name"]: i["input_hash"]
              for i in json.loads(stack.cli("plan", "--json").stdout)["images"]}

    # a patch to flashinfer: its derivation changes; vllm's wheel is reused; the images
    # installing flashinfer (all three, in this stack) get new input hashes and rebuild
    patch = _patch(tmp_path, "flashinfer", "flashinfer/__init__.py", '"0.6.12"',
                   '"0.6.12"\nPATCHED = True')
    _add_patch(stack, _commit_line("flashinfer"), patch)
    r = stack.cli("plan", "--json")
    wheels = {w["name"]: w for w in json.loads(r.stdout)["wheels"]}
    assert wheels["vllm"]["action"] == "reuse" and wheels["vllm"]["locked"]
    assert wheels["flashinfer-python"]["action"] == "build"
    assert not wheels["flashinfer-python"]["locked"]
    r = stack.cli("build", timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.count("building from") == 1
    assert "flashinfer-python" in r.stderr.split("building from")[0].splitlines()[-1]
    assert "built 3, restored 0, reused 0" in r.stdout
    new = {i["name"]: i["input_hash"]
           for i in json.loads(stack.cli("plan", "--json").stdout)["images"]}
    assert all(new[n] != hashes[n] for n in hashes)
    assert _run_in(bed, "vllm-node-mimo:latest",
                   "import flashinfer; print(flashinfer.PATCHED)") == "True"
    assert len(_records(stack)) == 3

    # the unpatched flashinfer is referred to by nothing now: status says so, prune
    # removes it (and its record), the locked wheels stay
    store = json.loads(stack.cli("status", "--json", "--workers", "w1").stdout)["wheels"]
    uses = sorted((w["filename"], w["use"]) for w in store["wheels"])
    assert uses == [(CUBIN, "locked"), (BUILT_FLASHINFER, "locked"),
                    (BUILT_FLASHINFER, "unreferenced"), (BUILT_VLLM, "locked")]
    r = stack.cli("prune")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"wheel store: removed {BUILT_FLASHINFER}" in r.stdout
    assert len(_records(stack)) == 2
    store = json.loads(stack.cli("status", "--json", "--workers", "w1").stdout)["wheels"]
    assert sorted(w["use"] for w in store["wheels"]) == ["locked", "locked", "locked"]
    assert stack.cli("build", timeout=600).stderr.count("reused") >= 2  # nothing rebuilt


def test_a_patched_c_source_rebuilds_reproducibly(built: MiniStack, tmp_path: Path) -> None:
    stack = built
    patch = _patch(tmp_path, "vllm", "vllm/__init__.py", "FIXTURE_REVISION = 2",
                   "FIXTURE_REVISION = 3")
    _add_patch(stack, _commit_line("vllm"), patch)
    r = stack.cli("build-wheels", "vllm", timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"vllm: built {BUILT_VLLM}" in r.stdout
    assert "wheels.lock does not record vllm yet" in r.stdout
    stored = json.loads(_records(stack)[0].read_text())
    # built again without the compiler cache, into a scratch store: the same bytes
    r = stack.cli("build-wheels", "--check", "vllm", timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"vllm: reproducible: stored {stored['sha256'][:16]}" in r.stdout
    assert [json.loads(p.read_text())["sha256"] for p in _records(stack)] == [stored["sha256"]]
    # a second stack (its own store and mirror) builds the same derivation: same sha256
    other = MiniStack(tmp_path / "other", stack.bed, "other")
    shutil.copy(stack.spec, other.spec)
    shutil.copytree(stack.root / "patches", other.root / "patches")
    r = other.cli("build-wheels", "vllm", timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(_records(other)[0].read_text())["sha256"] == stored["sha256"]


def test_a_build_that_is_not_reproducible_is_reported(built: MiniStack) -> None:
    stack = built
    stack.edit_spec(f"      builder: {testbed.BUILDER_IMAGE}\n  index:\n",
                    f"      builder: {testbed.BUILDER_IMAGE}\n"
                    "      command: [sh, -c, 'echo \"STAMP = $(date +%s%N)\" >> "
                    "flashinfer/__init__.py && python3 -m pip wheel --no-deps "
                    "--no-build-isolation --wheel-dir /imagebuild/out .']\n  index:\n")
    assert stack.cli("build-wheels", "flashinfer-python").returncode == 0
    r = stack.cli("build-wheels", "--check", "flashinfer-python")
    assert r.returncode == 10, r.stdout + r.stderr
    assert "flashinfer-python: DIFFERS" in r.stdout
    assert "gave other bytes" in r.stderr
    assert len(_records(stack)) == 1  # the stored wheel is kept, the rebuild is not


@pytest.mark.parametrize("case", ["unknown commit", "patch does not apply", "compile fails",
                                  "no wheel made"])
def test_a_failed_wheel_build_says_why_and_records_nothing(built: MiniStack, tmp_path: Path,
                                                          case: str) -> None:
    stack = built
    if case == "unknown commit":
        stack.edit_spec(_commit_line("vllm"), "      commit: " + "0123abcd" * 5 + "\n")
        expect = "0123abcd0123abcd0123abcd0123abcd0123abcd is not in"
    elif case == "patch does not apply":
        patch = _patch(tmp_path, "vllm", "vllm/__init__.py", "FIXTURE_REVISION = 2",
                       "FIXTURE_REVISION = 3")
        patch.write_text(patch.read_text().replace("FIXTURE_REVISION = 2",
                                                   "FIXTURE_REVISION = 7"))
        _add_patch(stack, _commit_line("vllm"), patch)
        expect = f"patch {patch} does not apply to"
    elif case == "compile fails":
        patch = _patch(tmp_path, "vllm", "csrc/kernels_0.c", "#include <stdint.h>",
                       "#include <stdint.h>\nthis is not C;")
        _add_patch(stack, _commit_line("vllm"), patch)
        expect = "the build command exited with 1"
    else:
        stack.edit_spec("      env: {MAX_JOBS: \"2\"}\n", "      command: [\"true\"]\n")
        expect = "the build left no .whl file in /imagebuild/out"
    lock = (stack.root / "wheels.lock").read_text()
    r = stack.cli("build-wheels", "vllm", timeout=900)
    assert r.returncode == 5, r.stdout + r.stderr
    assert expect in r.stderr
    assert "full log: " in r.stderr and "nothing was recorded" in r.stderr
    if case == "compile fails":
        assert "csrc/kernels_0.c:3:" in r.stderr  # the compiler's own words, in the tail
    log = Path(r.stderr.split("full log: ")[1].split()[0])
    assert log.is_file() and "FAILED" in log.read_text()
    assert _records(stack) == []
    store = stack.root / "state" / "wheel-store"
    assert not list(store.glob("sha256/*/*.whl"))
    assert not list(store.glob("incoming/*"))  # the build's scratch output is gone
    assert (stack.root / "wheels.lock").read_text() == lock
    assert _job_containers(stack.bed) == ""
    # the images are not built on a wheel that failed
    r = stack.cli("build", timeout=900)
    assert r.returncode == 5
    assert "verified" not in r.stdout


def test_a_missing_builder_image_is_named_with_what_to_do(built: MiniStack) -> None:
    built.edit_spec(f"      builder: {testbed.BUILDER_IMAGE}\n      env",
                    "      builder: imagebuild-bed/no-such-builder:1\n      env")
    r = built.cli("build-wheels", "vllm")
    assert r.returncode == 6, r.stdout + r.stderr
    assert "imagebuild-bed/no-such-builder:1 is not present" in r.stderr
    assert "docker pull" in r.stderr
    assert _records(built) == []


BED_BUILDER_SPEC = """\
# the builder template on the bed: the bed's builder rootfs as the base (gcc, python3-dev,
# ccache), git from Debian, uv and the torch stand-in from the bed's index
schema: 2
templates: {templates}
dockerfiles: dockerfiles
lock: wheels.lock
locks: locks
state: state
target: {{python: "3.11", platform: {arch}-manylinux_2_28}}
wheels:
  directory: wheels
  index:
    - file: torch-2.11.0+cu130-py3-none-any.whl
      url: http://127.0.0.1:18080/simple
    - file: {uv}
      url: http://127.0.0.1:18080/simple
layers:
  - {{name: cuda, packages: ["nvidia-*"]}}
  - {{name: torch, packages: [torch]}}
  - {{name: deps, packages: ["*"], local: true}}
images:
  vllm-builder:
    template: vllm-builder.Dockerfile.j2
    base: {base}
    params:
      apt_packages: [git]
      env: {{TORCH_CUDA_ARCH_LIST: 12.1a, MAX_JOBS: "2"}}
      uv: uv
      pip_index: http://127.0.0.1:18080/simple
    torch: torch
    checks: [torch-gate]
checks:
  torch-gate:
    run: [python3, -c, "import torch; print(torch.__version__, torch.version.cuda)"]
    expect: "{{torch.version}} {{torch.cuda}}"
"""


def test_the_builder_template_builds_an_input_addressed_builder_that_builds_wheels(
        built: MiniStack, tmp_path: Path) -> None:
    stack, bed = built, built.bed
    root = tmp_path / "builder"
    (root / "wheels").mkdir(parents=True)
    spec = root / "imagebuild.yaml"
    arch = testbed.host_arch()
    spec.write_text(BED_BUILDER_SPEC.format(templates=REPO / "templates",
                                            base=testbed.BUILDER_IMAGE, arch=arch,
                                            uv=testbed.UV_WHEELS[arch]))
    env = dict(os.environ, DOCKER_HOST=bed.docker_host, IMAGEBUILD_BED=str(bed.root))

    def builder_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "imagebuild", "-f", str(spec), *args],
                              capture_output=True, text=True, timeout=900, env=env)

    for args in (("render",), ("lock",), ("build",)):
        r = builder_cli(*args)
        assert r.returncode == 0, (args, r.stdout + r.stderr)
    assert "verified" in r.stdout  # the torch gate, its expectation from the lock
    h12 = json.loads(builder_cli("plan", "--json").stdout)["images"][0]["input_hash"][:12]
    tag = f"vllm-builder:{h12}"
    assert _run_in(bed, tag, "import torch; print(torch.__version__)") == "2.11.0+cu130"
    # the wheels built with it name its input-addressed tag: a new builder, new wheels
    stack.edit_spec(f"      builder: {testbed.BUILDER_IMAGE}\n  index:\n",
                    f"      builder: {tag}\n  index:\n")
    r = stack.cli("build-wheels", "flashinfer-python", timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "flashinfer-python: built flashinfer_python-0.6.12-py3-none-any.whl" in r.stdout
    plan = json.loads(stack.cli("plan", "--json").stdout)["wheels"]
    assert [w["builder"] for w in plan if w["name"] == "flashinfer-python"] == [tag]
