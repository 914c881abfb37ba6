"""Each class of bad input found by the hardening review: a clear error with its exit
code (never a traceback), or a refusal where a value used to be accepted silently."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagebuild import cli, context
from imagebuild.errors import ImagebuildError, LockError, SpecError
from imagebuild.lock import read_lock
from imagebuild.render import render_image

from .conftest import SPEC, Stack

GATE = '    expect: "2.11.0+cu130 13.0"\n'


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    code = info.value.code
    assert isinstance(code, int)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("old, new, says", [
    (GATE, GATE + "    timeout: .nan\n", "more than 0"),
    (GATE, GATE + "    timeout: .inf\n", "more than 0"),
    (GATE, GATE + "    timeout: 1e30\n", "at most 86400"),
    (GATE, GATE + "    timeout: 0\n", "more than 0"),
    (GATE, '    expect: 2.10\n', "YAML reads an unquoted 2.10 as the number 2.1"),
    (GATE, '    expect: [a]\n', "not text"),
    (GATE, '    expect: "{torch.version"\n', "a lone '{'"),
    (GATE, '    expect: "torch}"\n', "a lone '}'"),
    (GATE, '    expect: "{torch.abi}"\n', "is not a field such as {torch.version}"),
    (GATE, '    expect: "{torch}"\n', "is not a field such as {torch.version}"),
    (GATE, '    expect: "{trorch.version}"\n', "wheel 'trorch' is not declared under wheels"),
    (GATE, '    expect: "{uv.cuda}"\n', "uv 0.9.7 names no CUDA release"),
    ("covers: [vllm]}", 'covers: ["vllm; rm -rf /"]}', "distribution name"),
    ("covers: [vllm]}", "covers: vllm}", "expected a list of distribution name"),
    ('    run: [python3, -c, "import torch; print(torch.__version__, torch.version.cuda)"]\n',
     '    run: [python3, null]\n', "is not a word of a command"),
    ('    run: [python3, -c, "import torch; print(torch.__version__, torch.version.cuda)"]\n',
     '    run: [python3, {a: 1}]\n', "is not a word of a command"),
    ("    - extra_mimo-1.0-py3-none-any.whl\n",
     "    - extra_mimo-1.0-py3-none-any.whl\n    - extra_mimo-1.1-py3-none-any.whl\n",
     "two files of extra-mimo are declared"),
    ("      uv: uv\n", "      uv: uv==0.9.7\n", "is not a valid wheel name"),
    ("      uv: uv\n", "      uv: torch-nope\n", "is not declared under wheels.index"),
])
def test_values_that_were_accepted_are_refused_at_load(stack: Stack, old: str, new: str,
                                                       says: str) -> None:
    assert old in SPEC
    stack.write_spec(SPEC.replace(old, new, 1))
    with pytest.raises(SpecError) as info:
        stack.load()
    assert says in str(info.value) and info.value.exit_code == 2
    assert f"{stack.spec_path}:" in str(info.value)  # file:line


def test_a_non_utf8_spec_template_dockerfile_or_lock_is_a_clear_error(
        stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    spec = str(stack.spec_path)
    good_spec = stack.spec_path.read_bytes()
    stack.spec_path.write_bytes(good_spec.replace(b"state: state", b"state: st\xffate"))
    code, err = _cli(["-f", spec, "plan"], capsys)
    assert code == 2 and "not UTF-8" in err
    stack.spec_path.write_bytes(good_spec)
    tpl = stack.root / "templates" / "vllm-node-tf5.Dockerfile.j2"
    good_tpl = tpl.read_bytes()
    tpl.write_bytes(good_tpl + b"# \xff\xfe\n")
    code, err = _cli(["-f", spec, "render"], capsys)
    assert code == 2 and "not UTF-8" in err and str(tpl) in err
    tpl.write_bytes(good_tpl)
    # a committed Dockerfile that is not text is drift (exit 1), not a traceback
    assert _cli(["-f", spec, "render"], capsys)[0] == 0
    committed = stack.root / "dockerfiles" / "vllm-node.Dockerfile"
    committed.write_bytes(b"\xff\xfe")
    code, err = _cli(["-f", spec, "render", "--check"], capsys)
    assert code == 1 and "differ" in err
    # a lock that is not UTF-8: every command refuses it, and 'lock' (the cure) rewrites it
    lock = stack.root / "wheels.lock"
    lock.write_bytes(lock.read_bytes() + b"\xff\xfe")
    code, err = _cli(["-f", spec, "plan"], capsys)
    assert code == 2 and "malformed lock file" in err
    code, err = _cli(["-f", spec, "lock"], capsys)
    assert code == 2 or code == 0, err  # refused cleanly or rewritten; never a traceback
    assert "Traceback" not in err


@pytest.mark.parametrize("body, says", [
    ("{% include 'vllm-node-tf5.Dockerfile.j2' %}\n", "includes or calls itself"),
    ("{{ 1 // 0 }}\n", "ZeroDivisionError"),
    ("{{ image.name.split(1, 2, 3, 4) }}\n", "rendering failed: TypeError"),
])
def test_a_template_that_fails_to_render_is_a_spec_error(stack: Stack, body: str,
                                                         says: str) -> None:
    tpl = stack.root / "templates" / "vllm-node-tf5.Dockerfile.j2"
    tpl.write_text(tpl.read_text() + body)
    with pytest.raises(SpecError, match=says) as info:
        render_image(stack.load(), "vllm-node-tf5")
    assert str(tpl) in str(info.value)


def test_the_lock_or_dockerfiles_path_of_the_wrong_kind(
        stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    spec = str(stack.spec_path)
    lock = stack.root / "wheels.lock"
    lock.unlink()
    lock.mkdir()
    code, err = _cli(["-f", spec, "plan"], capsys)
    assert code == 2 and "cannot read the lock file" in err
    code, err = _cli(["-f", spec, "lock"], capsys)
    assert code == 2 and "cannot" in err and "Traceback" not in err
    os.rmdir(lock)
    stack.lock()
    (stack.root / "dockerfiles").write_text("a file, not a directory")
    code, err = _cli(["-f", spec, "render"], capsys)
    assert code == 2 and "must name a directory" in err


@pytest.mark.parametrize("text, says", [
    ("version = 1\nwheel = 5\n", "must be an array of tables"),
    ("version = 1\n[[wheel]]\nname = 5\n", "lacks"),
    ("version = 1\nsurprise = true\n", "unknown top-level keys"),
    ('version = 1\n[[wheel]]\nname = "x"\nversion = "1"\nfilename = "x-1-py3-none-any.whl"\n'
     'sha256 = "unresolved"\nsource = "/etc/passwd"\n', "is neither wheels/"),
    ('version = 1\n[[wheel]]\nname = "x"\nversion = "1"\nfilename = "x-1-py3-none-any.whl"\n'
     'sha256 = "unresolved"\nsource = "wheels/x-1-py3-none-any.whl"\nextra = 1\n',
     "unknown keys extra"),
    ("version = " + "9" * 5000 + "\n", "malformed lock file"),
])
def test_lock_values_are_all_checked(tmp_path: Path, text: str, says: str) -> None:
    p = tmp_path / "wheels.lock"
    p.write_text(text)
    with pytest.raises(LockError, match=says):
        read_lock(p)


def test_every_refusal_here_is_an_imagebuild_error_with_exit_2(stack: Stack) -> None:
    stack.write_spec(SPEC + "backups:\n  directory: ssh://host:abc/x\n")
    with pytest.raises(ImagebuildError) as info:
        context.load(str(stack.spec_path))
    assert info.value.exit_code == 2


@pytest.mark.parametrize(("pattern", "good"), [
    ("imagebuild.spec._COMMIT", "a" * 40), ("imagebuild.lock.SHA256", "b" * 64),
    ("imagebuild.lock.INDEX_URL", "https://download.pytorch.org/whl/cu130"),
    ("imagebuild.lock.WHEEL_FILE", "torch-2.11.0-py3-none-any.whl"),
    ("imagebuild.spec._IMAGE_NAME", "vllm-node"), ("imagebuild.spec._GIT_URL",
                                                   "https://github.com/vllm-project/vllm.git"),
    ("imagebuild.wheelstore._HASH", "c" * 64), ("imagebuild.image._DIGEST", "sha256:" + "d" * 64),
])
def test_a_value_with_a_final_newline_matches_no_pattern(pattern: str, good: str) -> None:
    # "$" matches before a final newline: every pattern that checks a whole value ends
    # at the end of the text instead
    module, name = pattern.rsplit(".", 1)
    regex = getattr(importlib.import_module(module), name)
    assert regex.match(good)
    assert not regex.match(good + "\n") and not regex.fullmatch(good + "\n")


@pytest.mark.parametrize("which", ["imagebuild.yaml", "wheels.lock",
                                   "locks/pylock.vllm-node.toml"])
def test_a_fifo_in_place_of_the_spec_or_a_lock_is_refused_at_once(stack: Stack,
                                                                  which: str) -> None:
    """Opened without blocking and refused as not a file (exit 2): a FIFO no one writes
    would otherwise hold 'plan' forever."""
    path = stack.root / which
    path.unlink()
    os.mkfifo(path)
    r = subprocess.run([sys.executable, "-m", "imagebuild", "-f", str(stack.spec_path),
                        "plan"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "DOCKER_HOST": "unix:///nonexistent.sock"})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "not a regular file" in r.stderr and which.rsplit("/", 1)[-1] in r.stderr


DEEP = "[" * 100_000 + "]" * 100_000  # deeper than Python's recursion limit


def test_json_nested_too_deep_is_each_edge_s_own_error_never_a_traceback(
        tmp_path: Path) -> None:
    from imagebuild.archive import Manifest
    from imagebuild.errors import BackupError, RegistryError
    from imagebuild.layerstore import read_gen_sidecar
    from imagebuild.registry import docker_credentials
    from imagebuild.store import LocalDir
    from imagebuild.tarbackup import Sidecar, manifest_tags

    # a generation's sidecar (restore, backup --check and every store listing read it)
    store = LocalDir(tmp_path / "store")
    (store.directory / "images" / "vllm-node").mkdir(parents=True)
    (store.directory / "images" / "vllm-node" / ("a" * 12 + ".json")).write_text(DEEP)
    with pytest.raises(BackupError, match="nested too deeply"):
        read_gen_sidecar(store, "vllm-node", "a" * 12)
    # a tar backup's sidecar, a tar's manifest.json and index.json
    with pytest.raises(ValueError, match="nested too deeply"):
        Sidecar.from_json(DEEP)
    with pytest.raises(BackupError, match=r"manifest\.json is not JSON"):
        Manifest.parse(DEEP.encode(), "x.tar")
    with pytest.raises(BackupError, match=r"index\.json is malformed"):
        manifest_tags("index.json", DEEP.encode(), "x.tar")
    # the docker config
    config = tmp_path / "config.json"
    config.write_text(DEEP)
    with pytest.raises(RegistryError, match="is not JSON: JSON nested too deeply") as err:
        docker_credentials("registry:5000", config)
    assert err.value.exit_code == 11


def _wheel_with_metadata(path: Path, meta: bytes, *, flags: int = 0, method: int | None = None,
                         deflate: bool = False) -> Path:
    """A wheel whose METADATA entry comes first, its zip headers patched as asked: flag
    bit 0 (encrypted), or a compression method zipfile does not know."""
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(zipfile.ZipInfo("demo-1.0.dist-info/METADATA"), meta,
                    compress_type=zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
    data = bytearray(path.read_bytes())
    central = data.index(b"PK\x01\x02")
    for at, flag_at, method_at in ((0, 6, 8), (central, 8, 10)):
        if flags:
            data[at + flag_at] |= flags
        if method is not None:
            data[at + method_at:at + method_at + 2] = method.to_bytes(2, "little")
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(("kind", "says"), [
    ("encrypted", "cannot read its METADATA"),
    ("unknown compression", "cannot read its METADATA"),
    ("zip bomb", "larger than"),
])
def test_a_wheel_whose_metadata_cannot_be_read_safely_is_a_lock_error(
        tmp_path: Path, kind: str, says: str) -> None:
    from imagebuild.resolve import MAX_METADATA, wheel_metadata

    path = tmp_path / "demo-1.0-py3-none-any.whl"
    meta = b"Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n"
    if kind == "encrypted":
        _wheel_with_metadata(path, meta, flags=0x1)
    elif kind == "unknown compression":
        _wheel_with_metadata(path, meta, method=99)
    else:  # a few kB on disk, more than the limit unpacked
        _wheel_with_metadata(path, meta + b" " * (MAX_METADATA + 1), deflate=True)
        assert path.stat().st_size < 100_000
    with pytest.raises(LockError, match=says) as info:
        wheel_metadata(path)
    assert info.value.exit_code == 2


def test_an_error_is_printed_without_terminal_control_characters(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from imagebuild.errors import RemoteError

    text = str(RemoteError("w1: \x1b]0;owned\x07docker: \x1b[8mhidden\x1b[0m\rover\nnext\tx",
                           hint="\x1b[2Jcleared"))
    assert text == "w1: ?]0;owned?docker: ?[8mhidden?[0m?over\nnext\tx\n  hint: ?[2Jcleared"
    with pytest.raises(SystemExit) as info:  # a path or any remote text goes the same way
        cli.main(["-f", str(tmp_path / "spec\x1b[2J.yaml"), "plan"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "spec?[2J.yaml: spec file not found" in err
    assert "\x1b" not in err
