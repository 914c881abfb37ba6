"""imagebuild lock with uv against the bed's index: the closure, pins that stay, the
conflict check, hand edits, and what a lock change rebuilds."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagebuild.closure import read_closure

from .conftest import MINI, MiniStack, testbed

pytestmark = pytest.mark.bed

NAMES = ["vllm-node", "vllm-node-tf5", "vllm-node-mimo"]


def _hashes(mini: MiniStack) -> dict[str, str]:
    r = mini.cli("plan", "--json")
    assert r.returncode == 0, r.stderr
    return {i["name"]: i["input_hash"] for i in json.loads(r.stdout)["images"]}


def _locked(mini: MiniStack, image: str) -> dict[str, str]:
    lock = read_closure(mini.root / "locks" / f"pylock.{image}.toml", image)
    return {p.name: p.version for p in lock.packages}


@pytest.fixture
def newer_tokenizers(tmp_path: Path) -> Iterator[str]:
    """tokenizers 0.22.2 uploaded to the index after the lock was written."""
    wheel = testbed.fixture_package(tmp_path, "tokenizers", "0.22.2")
    testbed.publish(wheel)
    yield wheel.name
    testbed.unpublish(wheel.name)


@pytest.mark.parametrize("arch", sorted(testbed.UV_WHEELS))
def test_the_committed_test_stack_lock_is_current(bed_env: object, arch: str) -> None:
    # each architecture's locks, on any host: the bed's index serves both uv wheels, and
    # uv resolves for the spec's target, not for the machine it runs on
    r = subprocess.run([str(Path(__file__).parents[2] / ".venv" / "bin" / "imagebuild"),
                        "-f", str(MINI), "lock", "--check"], capture_output=True, text=True,
                       env=dict(os.environ, **testbed.arch_env(arch)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("is up to date") == 4
    assert f"wheels.{arch}.lock" in r.stdout and f"locks/{arch}/" in r.stdout, r.stdout


def test_the_closure_is_the_whole_graph_with_the_overrides(mini: MiniStack) -> None:
    node = _locked(mini, "vllm-node")
    # torch's CUDA libraries, transformers' tokenizers (the newer of two), the wheels
    assert node == {
        "flashinfer-cubin": "0.6.12", "flashinfer-jit-cache": "0.6.12",
        "flashinfer-python": "0.6.12", "nvidia-cublas": "13.0.0.19",
        "nvidia-cuda-runtime": "13.0.48", "tokenizers": "0.22.1", "torch": "2.11.0+cu130",
        "transformers": "4.57.1", "vllm": "0.22.1rc1.dev124+gace95c9cf.d20260603.cu132"}
    assert _locked(mini, "vllm-node-tf5") == node
    assert _locked(mini, "vllm-node-mimo") == {**node, "transformers": "5.0.0"}


def test_a_new_upload_changes_nothing_until_asked_for(mini: MiniStack,
                                                      newer_tokenizers: str) -> None:
    before = _hashes(mini)
    texts = {p.name: p.read_text() for p in (mini.root / "locks").iterdir()}
    r = mini.cli("lock")
    assert r.returncode == 0, r.stderr
    # the pins stay: same locks, same input hashes, so a build installs what it did
    assert {p.name: p.read_text() for p in (mini.root / "locks").iterdir()} == texts
    assert mini.cli("lock", "--check").returncode == 0
    assert _hashes(mini) == before
    # asked for: only tokenizers moves, and every image installing it is rebuilt
    r = mini.cli("lock", "--upgrade", "tokenizers")
    assert r.returncode == 0, r.stderr
    assert "tokenizers 0.22.1 -> 0.22.2" in r.stdout
    for image in NAMES:
        assert _locked(mini, image)["tokenizers"] == "0.22.2"
        assert _locked(mini, image)["transformers"] in ("4.57.1", "5.0.0")
    after = _hashes(mini)
    assert all(after[n] != before[n] for n in NAMES)
    r = mini.cli("plan")
    assert r.returncode == 0 and r.stdout.count("FROM") == 3


def test_without_the_torch_override_lock_refuses_with_the_conflict(mini: MiniStack) -> None:
    spec = mini.spec.read_text()
    start = spec.index("    overrides:\n      - requirement: torch==2.11.0+cu130")
    end = spec.index("    checks:", start)
    mini.spec.write_text(spec[:start] + spec[end:])
    texts = {p.name: p.read_text() for p in (mini.root / "locks").iterdir()}
    r = mini.cli("lock")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "vllm-node: the closure conflicts with what its wheels require" in r.stderr
    assert ("vllm-0.22.1rc1.dev124+gace95c9cf.d20260603.cu132-py3-none-any.whl requires "
            "'torch==2.10.0'; the closure has torch 2.11.0+cu130") in r.stderr
    assert "images.vllm-node.overrides" in r.stderr
    assert 'requirement: "torch==2.11.0+cu130"' in r.stderr
    assert {p.name: p.read_text() for p in (mini.root / "locks").iterdir()} == texts


def test_a_lock_edited_by_hand_is_refused_before_the_engine_is_touched(
        mini: MiniStack) -> None:
    path = mini.root / "locks" / "pylock.vllm-node-mimo.toml"
    text = path.read_text()
    sha = read_closure(path, "vllm-node-mimo").packages[-1].sha256
    path.write_text(text.replace(sha, "0" * 64))
    def images() -> set[str]:
        return set(mini.bed.docker("images", "-aq").stdout.split())

    before = images()
    r = mini.cli("build", "mimo")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "pylock.vllm-node-mimo.toml: the lock was changed by hand" in r.stderr
    assert images() == before


def test_a_requirement_no_index_satisfies_is_uvs_clear_refusal(mini: MiniStack) -> None:
    mini.edit_spec('requires: ["transformers>=4.57,<5"]', 'requires: ["transformers>=9"]')
    texts = {p.name: p.read_text() for p in (mini.root / "locks").iterdir()}
    r = mini.cli("lock")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "vllm-node-tf5: uv failed to resolve the closure" in r.stderr
    assert "transformers" in r.stderr and "hint:" in r.stderr
    assert {p.name: p.read_text() for p in (mini.root / "locks").iterdir()} == texts


def test_an_override_silences_only_what_its_covers_lists(mini: MiniStack) -> None:
    # uv itself resolves here: the torch override would silence the vllm wheel's
    # torch==2.10.0, so without covers: [vllm] the lock refuses it by name
    covers = "        covers: [vllm]       # the requirement it silences: vllm's torch==2.10.0\n"
    mini.edit_spec(covers, "")
    texts = {p.name: p.read_text() for p in (mini.root / "locks").iterdir()}
    r = mini.cli("lock")
    assert r.returncode == 2, r.stdout + r.stderr
    assert ("requires 'torch==2.10.0'; the closure has torch 2.11.0+cu130 (the override "
            "torch==2.11.0+cu130 would silence it; its covers: does not list vllm)") in r.stderr
    assert "covers: [vllm]" in r.stderr  # the hint
    assert {p.name: p.read_text() for p in (mini.root / "locks").iterdir()} == texts
    mini.edit_spec("        reason: >-\n          the vllm wheel's metadata pins torch==2.10.0",
                   f"{covers}        reason: >-\n          the vllm wheel's metadata pins "
                   f"torch==2.10.0")
    assert mini.cli("lock", "--check").returncode == 0
    assert ('covered = ["vllm requires torch==2.10.0 (override torch==2.11.0+cu130)"]'
            in (mini.root / "locks" / "pylock.vllm-node.toml").read_text())


SECOND_INDEX_PORT = 18094  # beside the bed's 18080 (and the benchmarks' 18090)
TORCH_DECL = ("    - file: torch-2.11.0+cu130-py3-none-any.whl\n"
              "      url: http://127.0.0.1:18080/simple\n")


def test_an_extra_index_serves_only_what_is_assigned_to_it(mini: MiniStack,
                                                           tmp_path: Path) -> None:
    # a second index, as the cu130 one: torch, and a newer transformers it also carries
    # (the pytorch index mirrors packages)
    newer = testbed.make_wheel(tmp_path / "files", "transformers", "4.57.2",
                               {"transformers/__init__.py": '__version__ = "4.57.2"\n'},
                               requires=["tokenizers<=0.23.0,>=0.22.0"])
    five = testbed.BED / "index-files" / "transformers-5.0.0-py3-none-any.whl"
    torch = testbed.BED / "index-files" / TORCH_DECL.split()[2]
    root = tmp_path / "cu130"
    testbed.build_index_at(root, [torch, newer])
    testbed.start_index_at(root, SECOND_INDEX_PORT)
    try:
        url = f"http://127.0.0.1:{SECOND_INDEX_PORT}/simple"
        mini.edit_spec(TORCH_DECL, TORCH_DECL.replace("http://127.0.0.1:18080/simple", url))
        r = mini.cli("lock", "--upgrade", "transformers")
        assert r.returncode == 0, r.stdout + r.stderr
        # torch is its own index's file, given to uv by URL; transformers never comes from
        # that index, though it carries a newer one
        node = (mini.root / "locks" / "pylock.vllm-node.toml").read_text()
        assert f'url = "{url}/torch/torch-2.11.0+cu130-py3-none-any.whl"' in node, node
        tf5 = _locked(mini, "vllm-node-tf5")
        assert tf5["torch"] == "2.11.0+cu130" and tf5["transformers"] != "4.57.2"
        assert "18094" not in node.replace(f"{url}/torch/", "")
        assert mini.cli("lock", "--check").returncode == 0
        # listed under its packages:, but pinned to no one version: refused by name
        mini.edit_spec(f"      url: {url}\n", f"      url: {url}\n"
                                               f"      packages: [transformers]\n")
        texts = {p.name: p.read_text() for p in (mini.root / "locks").iterdir()}
        r = mini.cli("lock")
        assert r.returncode == 2, r.stdout + r.stderr
        assert re.search(rf"transformers [0-9.]+ came from the primary index, but {url} "
                         r"serves it, at the one version the spec pins: none is pinned",
                         r.stderr), r.stderr
        assert {p.name: p.read_text() for p in (mini.root / "locks").iterdir()} == texts
        # pinned (node and tf5 by a requirement, mimo by its override): that index's files
        testbed.build_index_at(root, [torch, newer, five])
        mini.edit_spec("    torch: torch\n    overrides:\n",
                       '    torch: torch\n    requires: ["transformers==4.57.2"]\n'
                       "    overrides:\n")
        mini.edit_spec("      - requirement: transformers>=5.0.0\n",
                       "      - requirement: transformers==5.0.0\n")
        r = mini.cli("lock")
        assert r.returncode == 0, r.stdout + r.stderr
        assert _locked(mini, "vllm-node-tf5")["transformers"] == "4.57.2"
        assert _locked(mini, "vllm-node-mimo")["transformers"] == "5.0.0"  # its override
        mimo = (mini.root / "locks" / "pylock.vllm-node-mimo.toml").read_text()
        assert f'url = "{url}/transformers/transformers-5.0.0-py3-none-any.whl"' in mimo
    finally:
        testbed.stop_index_at(root)
