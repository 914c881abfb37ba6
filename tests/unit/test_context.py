from __future__ import annotations

import contextlib
import io
import tarfile

import pytest

from imagebuild.build import Action, Step, context_stream, execute, log_path, preflight
from imagebuild.context import load
from imagebuild.derivation import plan
from imagebuild.errors import EngineError, UnresolvedHashError, WheelHashMismatch
from imagebuild.lock import sha256_file
from imagebuild.progress import Quiet

from ..fake_engine import FakeEngine
from .conftest import Stack

VLLM = "vllm-0.22.1rc1.dev124+gace95c9cf.d20260603.cu132-py3-none-any.whl"


def test_context_holds_only_the_dockerfile_and_the_pinned_requirement_files(
        stack: Stack) -> None:
    spec = stack.load()
    mimo = plan(spec, load(str(spec.path)).lock, ["mimo"])[-1]
    with contextlib.ExitStack() as pins:
        pinned = preflight(spec, mimo, pins)
        assert sorted(pinned) == sorted(w.filename for w in mimo.served)
    data = b"".join(context_stream(mimo.context))
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert sorted(tf.getnames()) == [
            "Dockerfile", "install-cuda.txt", "install-deps.txt", "install-flashinfer.txt",
            "install-torch.txt", "install-wheels.txt"]
        df = tf.extractfile("Dockerfile")
        assert df is not None and df.read().decode() == mimo.dockerfile
        files = {}
        for name in tf.getnames():
            f = tf.extractfile(name)
            assert f is not None
            files[name] = f.read().decode()
    # what mimo's lock has that tf5's does not, nothing more: transformers 5 from its
    # index, and the wheel only mimo declares; vllm, flashinfer and torch are tf5's
    # already and are not installed again. Local wheels by a URL under the server's
    # address, index files by their URL, each pinned by its locked sha256.
    wheels = spec.wheels_dir
    assert files["install-deps.txt"].splitlines() == [
        "transformers @ http://127.0.0.1:9/simple/transformers-5.0.0-py3-none-any.whl "
        f"--hash=sha256:{'e' * 64}"]
    assert files["install-wheels.txt"].splitlines() == [
        f"extra-mimo @ ${{IMAGEBUILD_WHEELS}}/extra_mimo-1.0-py3-none-any.whl "
        f"--hash=sha256:{sha256_file(wheels / 'extra_mimo-1.0-py3-none-any.whl')}"]
    for group in ("cuda", "torch", "flashinfer"):  # a comment: nothing to install
        assert files[f"install-{group}.txt"] == (
            f"# vllm-node-mimo installs nothing in group {group}: vllm-node-tf5 has all "
            f"of it\n")
    assert "torch" not in files["install-deps.txt"] + files["install-wheels.txt"]
    assert [w.filename for w in mimo.served] == ["extra_mimo-1.0-py3-none-any.whl"]
    # tf5's closure adds nothing to vllm-node's here: nothing to serve, nothing to install
    tf5 = plan(spec, load(str(spec.path)).lock, ["tf5"])[-1]
    assert tf5.served == () and tf5.installs == ()
    assert all(f.data is not None and f.data.startswith(b"# vllm-node-tf5 installs nothing")
               for f in tf5.context if f.arcname.startswith("install-"))
    # vllm-node installs all of its closure: torch in its own group, the local wheels last
    node = plan(spec, load(str(spec.path)).lock, ["node"])[0]
    files = {f.arcname: (f.data or b"").decode() for f in node.context}
    assert files["install-torch.txt"].startswith(
        "torch @ http://127.0.0.1:9/simple/torch/torch-")
    assert [ln.split()[0] for ln in files["install-flashinfer.txt"].splitlines()] == [
        "flashinfer-python"]
    assert [ln.split()[0] for ln in files["install-wheels.txt"].splitlines()] == ["vllm"]
    assert [ln.split()[0] for ln in files["install-deps.txt"].splitlines()] == [
        "tokenizers", "transformers"]


def test_preflight_refuses_a_mismatching_wheel(stack: Stack) -> None:
    spec = stack.load()
    node = plan(spec, load(str(spec.path)).lock, ["node"])[0]
    stack.wheel("flashinfer_python-0.6.12-py3-none-any.whl", b"not what was locked")
    with pytest.raises(WheelHashMismatch, match=r"does not match wheels\.lock"):
        preflight(spec, node, contextlib.ExitStack())


def test_preflight_names_an_unresolved_wheel(stack: Stack) -> None:
    (stack.root / "wheels" / "extra_mimo-1.0-py3-none-any.whl").unlink()
    stack.lock()  # the wheel is not on this machine: recorded as unresolved
    spec = stack.load()
    mimo = plan(spec, load(str(spec.path)).lock, ["mimo"])[-1]
    assert mimo.input_hash is None
    with pytest.raises(UnresolvedHashError, match=r"extra_mimo-1\.0-py3-none-any\.whl"):
        preflight(spec, mimo, contextlib.ExitStack())


def test_a_build_that_needs_served_wheels_refuses_an_engine_on_another_host(
        stack: Stack) -> None:
    spec = stack.load()
    node = plan(spec, load(str(spec.path)).lock, ["node"])[0]
    engine = FakeEngine(name="head-node", local=False)  # e.g. DOCKER_HOST=ssh://head-node
    engine.add_base("example/base:1", [b"base"])
    with pytest.raises(EngineError, match="is not on this machine") as info:
        execute(spec, engine, [Step(node, Action.BUILD)], progress=Quiet())
    assert info.value.exit_code == 4 and engine.builds == []
    assert not log_path(spec, node).exists()


@pytest.mark.parametrize("value", ["plain", 'a "quoted" $HOME ${X} \\ back', "0.6.12 sha256:ab",
                                   "ünïcode", ""])
def test_labels_go_in_one_instruction_that_reads_back_exactly(value: str) -> None:
    from imagebuild.build import label_instruction

    from ..fake_engine import dockerfile_labels

    labels = {"org.imagebuild.image": "vllm-node", "org.example.v": value}
    line = label_instruction(labels)
    assert line.startswith("LABEL ") and line.count("\n") == 1 and line.endswith("\n")
    assert dockerfile_labels("FROM x\n" + line) == labels


@pytest.mark.parametrize("value", ["two\nlines", "cr\r", "nul\0", "tab\t"])
def test_a_label_cannot_add_a_line_to_the_dockerfile(value: str) -> None:
    from imagebuild.build import label_instruction
    from imagebuild.errors import SpecError

    with pytest.raises(SpecError, match="control character"):
        label_instruction({"k": value})
