"""Files, a working directory, an entrypoint and a command declared into an image: the
spec's checks, the rendered Dockerfile, the input hash, the build context, and a file
changed after it was hashed refused before anything is built."""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from imagebuild import context
from imagebuild.build import context_stream, pin_files
from imagebuild.derivation import Derivation, plan
from imagebuild.errors import FileChanged, SpecError, UnresolvedHashError
from imagebuild.render import render_image

from .conftest import SPEC, Stack

NODE = "    checks: [torch-gate]\n  vllm-node-tf5:\n"


def _declare(stack: Stack, body: str) -> None:
    """``body`` (YAML lines at image level, indented 4) added to vllm-node."""
    assert NODE in SPEC
    stack.write_spec(SPEC.replace(NODE, "    checks: [torch-gate]\n" + body
                                  + "  vllm-node-tf5:\n"))


def _checkout(root: Path) -> Path:
    """A stand-in of the user's own checkout of the launcher: a script and a mods dir."""
    co = root / "checkout"
    (co / "mods" / "fix").mkdir(parents=True)
    script = co / "run-cluster-node.sh"
    script.write_text("#!/bin/sh\nexec ray start \"$@\"\n")
    script.chmod(0o755)
    (co / "mods" / "fix" / "run.sh").write_text("patch -p1 < fix.patch\n")
    (co / "mods" / "fix" / "fix.patch").write_text("--- a\n+++ b\n")
    return co


FILES = """\
    workdir: /workspace/vllm
    entrypoint: [/bin/sh, -c]
    cmd: ["exec sleep infinity"]
    files:
      - {src: checkout/run-cluster-node.sh, dest: /workspace/vllm/run-cluster-node.sh}
      - {src: checkout/mods, dest: /workspace/vllm/mods, mode: "0640"}
"""


def _node(stack: Stack) -> Derivation:
    spec = stack.load()
    return plan(spec, context.load(str(spec.path)).lock, ["node"])[0]


def test_declared_files_and_settings_render_as_copies_last(stack: Stack) -> None:
    _checkout(stack.root)
    _declare(stack, FILES)
    spec = stack.load()
    img = spec.images["vllm-node"]
    assert img.workdir == "/workspace/vllm" and img.cmd == ("exec sleep infinity",)
    assert img.files[0].source == stack.root / "checkout" / "run-cluster-node.sh"
    assert img.files[1].mode == 0o640
    text = render_image(spec, "vllm-node")
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert lines[-5:] == [
        'COPY ["files/0", "/workspace/vllm/run-cluster-node.sh"]',
        'COPY ["files/1", "/workspace/vllm/mods"]',
        "WORKDIR /workspace/vllm",
        'ENTRYPOINT ["/bin/sh", "-c"]',
        'CMD ["exec sleep infinity"]',
    ]
    # the children declare nothing: nothing of it in theirs
    assert "WORKDIR" not in render_image(spec, "vllm-node-tf5")


def test_the_context_carries_the_files_with_their_modes(stack: Stack) -> None:
    _checkout(stack.root)
    _declare(stack, FILES)
    node = _node(stack)
    assert [c.arcname for c in node.copied] == [
        "files/0", "files/1", "files/1/fix", "files/1/fix/fix.patch", "files/1/fix/run.sh"]
    with contextlib.ExitStack() as stack_:
        pinned = pin_files(node, stack_)
        data = b"".join(context_stream(node.context, node.copied, pinned))
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = {m.name: m for m in tf.getmembers()}
        script = members["files/0"]
        assert script.mode == 0o755 and script.uid == 0  # executable at the source: kept
        assert tf.extractfile(script).read().startswith(b"#!/bin/sh")  # type: ignore[union-attr]
        assert members["files/1"].isdir() and members["files/1/fix"].isdir()
        assert members["files/1/fix/run.sh"].mode == 0o640  # the declared mode
        assert "Dockerfile" in members


def test_a_changed_file_is_a_new_input_hash(stack: Stack) -> None:
    co = _checkout(stack.root)
    _declare(stack, FILES)
    first = _node(stack).input_hash
    assert first == _node(stack).input_hash  # same bytes, same hash
    (co / "mods" / "fix" / "run.sh").write_text("patch -p2 < fix.patch\n")
    second = _node(stack).input_hash
    assert second != first
    (co / "run-cluster-node.sh").chmod(0o644)  # the mode is an input too
    assert _node(stack).input_hash not in (first, second)


def test_a_file_changed_after_it_was_hashed_is_refused_before_the_build(
        stack: Stack) -> None:
    co = _checkout(stack.root)
    _declare(stack, FILES)
    node = _node(stack)
    (co / "run-cluster-node.sh").write_text("#!/bin/sh\nexec evil\n")
    with contextlib.ExitStack() as stack_, pytest.raises(FileChanged) as err:
        pin_files(node, stack_)
    assert "changed after it was hashed" in err.value.message and err.value.exit_code == 3


def test_a_file_written_while_it_streams_stops_the_context(stack: Stack) -> None:
    co = _checkout(stack.root)
    _declare(stack, FILES)
    node = _node(stack)
    with contextlib.ExitStack() as stack_:
        pinned = pin_files(node, stack_)
        # rewritten in place, after the check, through the same inode
        with (co / "run-cluster-node.sh").open("r+b") as f:
            f.write(b"#!/bin/XX")
        with pytest.raises(FileChanged, match="changed while it was sent"):
            b"".join(context_stream(node.context, node.copied, pinned))


def test_a_missing_file_leaves_the_image_unresolved(stack: Stack) -> None:
    _declare(stack, FILES)  # no checkout at all
    node = _node(stack)
    assert node.input_hash is None
    assert any("run-cluster-node.sh (declared file, not found)" in u for u in node.unresolved)
    with pytest.raises(UnresolvedHashError):
        _ = node.tag


def test_a_symbolic_link_inside_a_declared_directory_is_refused(stack: Stack) -> None:
    co = _checkout(stack.root)
    os.symlink("/etc/passwd", co / "mods" / "fix" / "passwd")
    _declare(stack, FILES)
    with pytest.raises(SpecError, match="symbolic link inside a declared directory"):
        _node(stack)


def test_a_special_file_inside_a_declared_directory_is_refused(stack: Stack) -> None:
    co = _checkout(stack.root)
    os.mkfifo(co / "mods" / "fix" / "pipe")  # a read of it would hang the plan
    _declare(stack, FILES)
    with pytest.raises(SpecError, match="pipe is neither a file nor a directory"):
        _node(stack)


@pytest.mark.parametrize(("body", "message"), [
    ("    files: [{src: a, dest: relative/path}]\n", "not a valid absolute path"),
    ("    files: [{src: a, dest: /a/../etc}]\n", "not a valid absolute path"),
    ("    files: [{src: a, dest: '/a/$HOME'}]\n", "not a valid absolute path"),
    ("    files: [{src: a, dest: '/a b'}]\n", "not a valid absolute path"),
    ("    files: [{src: a, dest: /}]\n", "not the image's root"),
    ("    files: [{src: a, dest: /x, mode: 99999}]\n", "is not a file mode"),
    ("    files: [{src: a, dest: /x, mode: rwx}]\n", "is not a file mode"),
    ("    files: [{src: a, dest: /x}, {src: b, dest: /x}]\n", "declared twice"),
    ("    files: [{src: a}]\n", "missing required key 'dest'"),
    ("    files: [{src: a, dest: /x, owner: root}]\n", "unknown key 'owner'"),
    ("    workdir: 'relative'\n", "not a valid absolute path"),
    ("    workdir: \"/w\\nRUN evil\"\n", "newline or control character"),
    ("    entrypoint: \"/bin/sh -c x\"\n", "expected a list of argument"),
    ("    cmd: [\"a\\nRUN evil\"]\n", "newline or control character"),
])
def test_bad_declarations_are_refused_with_the_line(stack: Stack, body: str,
                                                    message: str) -> None:
    _declare(stack, body)
    with pytest.raises(SpecError, match=message) as err:
        stack.load()
    assert "imagebuild.yaml:" in err.value.message


def test_an_entrypoint_with_quotes_renders_as_json(stack: Stack) -> None:
    _declare(stack, "    entrypoint: [python3, -c, 'print(\"hi\")']\n")
    text = render_image(stack.load(), "vllm-node")
    assert 'ENTRYPOINT ["python3", "-c", "print(\\"hi\\")"]' in text
