"""imagebuild verify and the build gate, with the real torch regression."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from imagebuild.context import load
from imagebuild.engine_docker import DockerEngine
from imagebuild.errors import NotVerified
from imagebuild.verify import passing_record, read_record, require_verified

from .conftest import HEAD_STORES, MiniStack

pytestmark = pytest.mark.bed

# vllm-node's checks in the test stack
NODE_CHECKS = ("    checks: [torch-gate, vllm-locked, flashinfer-locked, vllm-imports, node-script,"
               " gb10-env]\n")


@pytest.fixture
def mini(warm: MiniStack) -> MiniStack:
    """These tests need built images, not a cold build: the session's warm stack."""
    return warm


def _no_check_containers() -> bool:
    r = subprocess.run(["docker", "ps", "-aq", "--filter", "label=org.imagebuild.check"],
                       capture_output=True, text=True)
    return r.stdout.strip() == ""


def _tags(mini: MiniStack) -> dict[str, str]:
    import json

    r = mini.cli("plan", "--json")
    return {i["name"]: i["tag"] for i in json.loads(r.stdout)["images"]}


@pytest.mark.parametrize("head_store", HEAD_STORES)
def test_the_good_stack_passes_every_check_and_records_it(mini: MiniStack) -> None:
    r = mini.cli("build", "mimo")
    assert r.returncode == 0, r.stderr
    r = mini.cli("verify")
    assert r.returncode == 0, r.stderr
    assert "all checks passed: vllm-node, vllm-node-tf5, vllm-node-mimo" in r.stdout
    assert r.stdout.count("pass") >= 13 and "FAIL" not in r.stdout
    ctx = load(str(mini.spec))
    spec, lock = ctx.spec, ctx.lock
    engine = DockerEngine()
    tags = _tags(mini)
    for name, tag in tags.items():
        info = engine.require(tag)
        assert engine.require(f"{name}:latest").id == info.id
        record = require_verified(spec, lock, name, info)
        assert record.passed and record.image_id == info.id
        assert record.fingerprint == info.fingerprint
        assert {res.check for res in record.results} == {*spec.images[name].checks,
                                                         "closure-locked"}
        assert record.checked_at.startswith("20")
    assert _no_check_containers()


def test_a_resolving_install_lands_the_cpu_torch_and_the_gate_stops_it(
        mini: MiniStack) -> None:
    """The field's May 2026 mistake, made on purpose: mimo's template resolves at build
    time instead of installing its lock (no --no-deps, no lock), and what it resolves
    is the vllm wheel's torch==2.10.0 from the index: the CPU torch lands over the cu130
    one its parent installed. The torch gate and the closure check both stop it."""
    assert mini.cli("build", "mimo").returncode == 0
    engine = DockerEngine()
    good_latest = engine.require("vllm-node-mimo:latest").id
    tpl = mini.root / "templates" / "vllm-node-mimo.Dockerfile.j2"
    text = tpl.read_text()
    include = '{% include "install-layers.j2" %}'
    assert include in text
    # (transformers 5 left out: the field had it as an override)
    tpl.write_text(text.replace(include, 'RUN uv pip install --index-url '
                                         'http://127.0.0.1:18080/simple "torch==2.10.0"'))
    bad_tag = _tags(mini)["vllm-node-mimo"]
    r = mini.cli("build", "mimo")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "vllm-node-mimo failed its checks: do NOT distribute" in r.stderr
    assert "torch-gate" in r.stderr
    assert "expected 2.11.0+cu130 13.0, got 2.10.0+cpu None" in r.stderr
    assert "force-reinstall" in r.stderr and "torch==2.10.0" in r.stderr  # the hint
    assert "libtorch_cuda.so" in r.stderr  # import vllm fails like in the field
    # the closure check names the drift from the lock
    assert "closure-locked" in r.stderr
    assert "torch 2.10.0+cpu (locked 2.11.0+cu130)" in r.stderr
    assert "transformers 4.57.1 (locked 5.0.0)" in r.stderr
    bad = engine.require(bad_tag)  # kept for inspection
    out = subprocess.run(["docker", "run", "--rm", "--entrypoint", "python3", bad.id, "-c",
                          "import torch; print(torch.__version__)"], capture_output=True,
                         text=True)
    assert out.stdout.strip() == "2.10.0+cpu"
    assert engine.require("vllm-node-mimo:latest").id == good_latest  # latest did not move
    ctx = load(str(mini.spec))
    with pytest.raises(NotVerified, match="imagebuild verify"):
        require_verified(ctx.spec, ctx.lock, "vllm-node-mimo", bad)
    record = read_record(ctx.spec, bad)
    assert record is not None and not record.passed
    # verify on its own says the same, with its own exit code
    r = mini.cli("verify", "mimo")
    assert r.returncode == 1 and "do NOT distribute" in r.stderr and "FAIL" in r.stdout
    # and for a script: the same verdict as one JSON document, the same exit code
    r = mini.cli("verify", "mimo", "--json")
    assert r.returncode == 1 and "do NOT distribute" in r.stderr
    doc = json.loads(r.stdout)
    assert not doc["ok"] and [i["image"] for i in doc["images"]] == ["vllm-node-mimo"]
    gate = doc["images"][0]["checks"][0]
    assert gate["check"] == "torch-gate" and not gate["passed"]
    assert gate["expected"] == "2.11.0+cu130 13.0"  # filled from the lock
    assert _no_check_containers()


def test_tf5_with_transformers_5_fails_its_specifier_and_stops_the_chain(
        mini: MiniStack) -> None:
    # only an override gets transformers 5 past the vllm wheel's <5 into tf5's lock
    mini.edit_spec('    requires: ["transformers>=4.57,<5"]\n',
                   '    requires: ["transformers>=4.57,<5"]\n    overrides:\n'
                   '      - {requirement: transformers>=5.0.0, reason: a mistake,\n'
                   '         covers: [vllm]}\n')
    lock = mini.cli("lock")
    assert lock.returncode == 0, lock.stderr
    tags = _tags(mini)
    r = mini.cli("build", "mimo")
    assert r.returncode == 1
    assert "transformers-4" in r.stderr and "expected <5, got 5.0.0" in r.stderr
    assert "images after it were not built" in r.stderr
    engine = DockerEngine()
    assert engine.inspect(tags["vllm-node-tf5"]) is not None
    assert engine.inspect(tags["vllm-node-mimo"]) is None
    assert _no_check_containers()


def test_a_hanging_check_is_killed_at_its_timeout(mini: MiniStack) -> None:
    mini.edit_spec("checks:\n  torch-gate:\n",
                   "checks:\n  hang:\n    run: [python3, -c, 'import time; time.sleep(300)']\n"
                   "    succeeds: true\n    timeout: 3\n  torch-gate:\n")
    mini.edit_spec(NODE_CHECKS + "\n  vllm-node-tf5:",
                   "    checks: [hang, torch-gate]\n\n  vllm-node-tf5:")
    assert mini.cli("build", "node").returncode == 1
    t0 = time.monotonic()
    r = mini.cli("verify", "node")
    elapsed = time.monotonic() - t0
    assert r.returncode == 1
    assert "timed out after 3s (killed)" in r.stdout
    assert elapsed < 60
    assert _no_check_containers()


def test_changed_checks_invalidate_the_record(mini: MiniStack) -> None:
    assert mini.cli("build", "node").returncode == 0
    ctx = load(str(mini.spec))
    info = DockerEngine().require(_tags(mini)["vllm-node"])
    assert passing_record(ctx.spec, ctx.lock, "vllm-node", info) is not None
    mini.edit_spec(NODE_CHECKS + "\n  vllm-node-tf5:",
                   "    checks: [torch-gate]\n\n  vllm-node-tf5:")
    ctx = load(str(mini.spec))
    assert passing_record(ctx.spec, ctx.lock, "vllm-node", info) is None


def test_verify_of_a_missing_image_and_a_down_engine(mini: MiniStack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    mini.edit_spec("\nchecks:\n", "\n  never-built:\n    template: vllm-node-tf5.Dockerfile.j2\n"
                   "    parent: vllm-node\n    requires: [transformers<5]\n"
                   "\nchecks:\n")
    lock = mini.cli("lock")  # the new image's closure
    assert lock.returncode == 0, lock.stderr
    r = mini.cli("verify", "never-built")
    assert r.returncode == 6 and "imagebuild build never-built" in r.stderr
    import os
    import sys

    env = dict(os.environ, DOCKER_HOST=f"unix://{tmp_path}/none.sock")
    r = subprocess.run([sys.executable, "-m", "imagebuild", "-f", str(mini.spec), "verify"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 4 and "cannot reach the Docker engine" in r.stderr
