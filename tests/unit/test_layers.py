"""Install layers planned from the lock: the grouping rules, the spec's ``layers:``, what a
change to one wheel changes (only its group's requirements file), children installing
only what differs from their parent, and the wheel server's stable port (the build arg
is part of the builder cache key)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from imagebuild import cli
from imagebuild.context import load
from imagebuild.derivation import Derivation, plan
from imagebuild.errors import SpecError
from imagebuild.layers import DEFAULT_LAYERS, LayerGroup, assign, group_for
from imagebuild.render import render_image
from imagebuild.wheelserve import PORT_BASE, PORT_SPAN, WheelServer, preferred_port

from .conftest import CLOSURE, SPEC, Stack, _dist

VLLM = "vllm-0.22.1rc1.dev124+gace95c9cf.d20260603.cu132-py3-none-any.whl"
NAMES = ["vllm-node", "vllm-node-tf5", "vllm-node-mimo"]


def _files(d: Derivation) -> dict[str, str]:
    return {f.arcname: (f.data or b"").decode() for f in d.context
            if f.arcname.startswith("install-")}


def _plan(stack: Stack) -> dict[str, Derivation]:
    spec = stack.load()
    return {d.name: d for d in plan(spec, load(str(spec.path)).lock)}


def _installed(d: Derivation) -> dict[str, list[str]]:
    return {name: [ln.split()[0] for ln in text.splitlines() if not ln.startswith("#")]
            for name, text in _files(d).items()}


# -- the grouping rules --------------------------------------------------------------------


@pytest.mark.parametrize(("name", "local", "group"), [
    ("nvidia-cublas", False, "cuda"),
    ("nvidia-nccl-cu13", False, "cuda"),
    ("cuda-bindings", False, "cuda"),
    ("triton", False, "cuda"),
    ("torch", False, "torch"),
    ("torchvision", False, "deps"),  # not named, no pattern: the rest of the closure
    ("transformers", False, "deps"),
    ("flashinfer-jit-cache", True, "flashinfer"),  # a pattern beats local
    ("flashinfer-python", False, "flashinfer"),
    ("vllm", True, "wheels"),
    ("my-patched-lib", True, "wheels"),
    ("vllm", False, "deps"),  # vllm from an index is just another dependency
])
def test_each_distribution_goes_to_one_default_group(name: str, local: bool,
                                                     group: str) -> None:
    assert group_for(name, local, DEFAULT_LAYERS).name == group


def test_an_exact_name_beats_a_pattern_and_every_group_is_listed_in_order() -> None:
    layers = (LayerGroup("big", ("nvidia-*",)), LayerGroup("nccl", ("nvidia-nccl-cu13",)),
              LayerGroup("rest", ("*",)), LayerGroup("mine", (), local=True))
    got = assign([("nvidia-nccl-cu13", False), ("nvidia-cublas", False), ("vllm", True),
                  ("six", False)], layers)
    assert got == {"big": ["nvidia-cublas"], "nccl": ["nvidia-nccl-cu13"], "rest": ["six"],
                   "mine": ["vllm"]}
    assert list(got) == ["big", "nccl", "rest", "mine"]


# -- what a build installs, group by group ---------------------------------------------------


def test_node_installs_its_whole_closure_and_the_children_only_their_difference(
        stack: Stack) -> None:
    ds = _plan(stack)
    node = _installed(ds["vllm-node"])
    assert node["install-torch.txt"] == ["torch"]
    assert node["install-wheels.txt"] == ["vllm"]
    assert node["install-flashinfer.txt"] == ["flashinfer-python"]
    # tf5's lock is node's here: it installs nothing at all
    assert all(v == [] for v in _installed(ds["vllm-node-tf5"]).values())
    # mimo: transformers 5 and its own wheel; never torch, vllm or flashinfer again
    mimo = _installed(ds["vllm-node-mimo"])
    assert [n for v in mimo.values() for n in v] == ["transformers", "extra-mimo"]
    assert [p.name for p in ds["vllm-node-mimo"].installs] == ["extra-mimo", "transformers"]


def test_a_new_vllm_changes_only_the_vllm_group_and_the_hashes_downstream(
        stack: Stack) -> None:
    before = _plan(stack)
    stack.wheel(VLLM, b"vllm bytes, rebuilt", requires=("torch==2.10.0",
                                                         "transformers<5,>=4.56.0"))
    stack.lock()
    after = _plan(stack)
    assert all(before[n].input_hash != after[n].input_hash for n in NAMES)
    changed = {(n, f) for n in NAMES for f, text in _files(after[n]).items()
               if _files(before[n])[f] != text}
    # the builder cache reuses every layer below the vllm group: its inputs are the same
    assert changed == {("vllm-node", "install-wheels.txt")}
    assert before["vllm-node"].dockerfile == after["vllm-node"].dockerfile


def test_transformers_bumped_in_mimo_only_changes_mimo_alone(stack: Stack) -> None:
    before = _plan(stack)
    closure = {**CLOSURE, "vllm-node-mimo": [_dist("transformers", "5.0.1", "f" * 64),
                                             *CLOSURE["vllm-node-mimo"][1:]]}
    stack.lock(closure)
    after = _plan(stack)
    assert [n for n in NAMES if before[n].input_hash != after[n].input_hash] == [
        "vllm-node-mimo"]
    assert [f for f, t in _files(after["vllm-node-mimo"]).items()
            if _files(before["vllm-node-mimo"])[f] != t] == ["install-deps.txt"]


# -- the spec's layers: ------------------------------------------------------------------------


CUSTOM = """\
layers:
  - {name: cuda, packages: ["nvidia-*"]}
  - {name: torch, packages: [Torch]}
  - {name: rest, packages: ["*"]}
  - {name: local, local: true}
"""


def test_custom_layers_render_and_plan(stack: Stack) -> None:
    stack.write_spec(CUSTOM + SPEC)
    spec = stack.load()
    assert [g.name for g in spec.layers] == ["cuda", "torch", "rest", "local"]
    assert spec.layers[1].packages == ("torch",)  # canonical
    text = render_image(spec, "vllm-node")
    assert "COPY install-rest.txt /tmp/imagebuild/install-rest.txt" in text
    assert "install-flashinfer" not in text
    node = _installed(_plan(stack)["vllm-node"])
    assert node["install-local.txt"] == ["flashinfer-python", "vllm"]


@pytest.mark.parametrize(("layers", "message"), [
    ("layers: []\n", "expected a list"),
    ("layers:\n  - {name: a, packages: [x]}\n", "exactly one group must hold '*'"),
    ("layers:\n  - {name: a, packages: ['*']}\n  - {name: b, packages: ['*']}\n",
     "exactly one group must hold '*'"),
    ("layers:\n  - {name: a, packages: ['*']}\n  - {name: a, packages: [x]}\n",
     "declared twice"),
    ("layers:\n  - {name: a, packages: ['*']}\n  - {name: b}\n", "takes nothing"),
    ("layers:\n  - {name: a, packages: ['*'], local: yes please}\n", "true or false"),
    ("layers:\n  - {name: a, packages: ['*'], local: true}\n  - {name: b, local: true}\n",
     "at most one group can be local"),
    ("layers:\n  - {name: \"a\\nRUN evil\", packages: ['*']}\n", "newline or control"),
    ("layers:\n  - {name: 'a b', packages: ['*']}\n", "not a valid group name"),
    ("layers:\n  - {name: a, packages: ['*', '../etc']}\n", "not a valid package name"),
    ("layers:\n  - {name: a, packages: ['*', 'x && rm']}\n", "not a valid package name"),
    ("layers:\n  - {name: a, packages: ['*'], from: x}\n", "unknown key 'from'"),
])
def test_bad_layers_are_refused_with_the_line(stack: Stack, layers: str,
                                              message: str) -> None:
    stack.write_spec(layers + SPEC)
    with pytest.raises(SpecError, match=message.replace("*", r"\*")) as info:
        stack.load()
    assert "imagebuild.yaml:" in info.value.message


# -- the wheel server's port -------------------------------------------------------------------


def test_the_wheel_servers_port_is_stable_per_stack_and_falls_back_when_taken(
        tmp_path: Path) -> None:
    port = preferred_port(tmp_path / "state")
    assert port == preferred_port(tmp_path / "state")
    assert PORT_BASE <= port < PORT_BASE + PORT_SPAN
    # another stack's state directory, another port (these two do not collide)
    assert preferred_port(Path("/srv/a/state")) != preferred_port(Path("/srv/b/state"))
    logged: list[str] = []
    with WheelServer({}, log=logged.append, port=port) as first:
        assert first.url == f"http://127.0.0.1:{port}"
        with WheelServer({}, log=logged.append, port=port) as second:  # taken: any port
            assert second.url != first.url
            assert "port" in logged[0] and "taken" in logged[0]
    with socket.socket() as s:  # closed again: the next build gets it back
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_plan_shows_what_each_group_installs(stack: Stack,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["-f", str(stack.spec_path), "plan"])
    out = capsys.readouterr().out
    assert info.value.code in (0, None)
    assert "installs: cuda 0" not in out
    assert "installs: torch 1, deps 2, flashinfer 1, wheels 1" in out
    assert "installs: nothing (vllm-node has all of its closure)" in out
    assert "installs: deps 1, wheels 1" in out
    with pytest.raises(SystemExit):
        cli.main(["-f", str(stack.spec_path), "plan", "--json", "mimo"])
    mimo = json.loads(capsys.readouterr().out)["images"][2]
    assert mimo["layers"] == [
        {"group": "cuda", "installs": []}, {"group": "torch", "installs": []},
        {"group": "deps", "installs": ["transformers==5.0.0"]},
        {"group": "flashinfer", "installs": []},
        {"group": "wheels", "installs": ["extra-mimo==1.0"]}]
