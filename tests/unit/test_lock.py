from __future__ import annotations

from pathlib import Path

import pytest

from imagebuild.errors import LockError, UnresolvedHashError, WheelHashMismatch
from imagebuild.fsutil import atomic_write_text
from imagebuild.lock import (
    check_wheel_digest,
    compute_lock,
    format_lock,
    parse_wheel,
    read_lock,
    sha256_file,
)

from .conftest import REPO, TORCH_SHA, Stack

VLLM = "vllm-0.22.1rc1.dev124+gace95c9cf.d20260603.cu132-cp312-cp312-linux_aarch64.whl"


def test_parse_field_wheel_names() -> None:
    w = parse_wheel(VLLM)
    assert (w.name, w.version) == ("vllm", "0.22.1rc1.dev124+gace95c9cf.d20260603.cu132")
    j = parse_wheel("flashinfer_jit_cache-0.6.12-cp39-abi3-manylinux_2_28_aarch64.whl")
    assert (j.name, j.version) == ("flashinfer-jit-cache", "0.6.12")
    with pytest.raises(LockError, match="does not parse"):
        parse_wheel("vllm.whl")


def test_real_lock_has_field_pins_and_no_made_up_hash() -> None:
    lock = read_lock(REPO / "wheels.lock")
    names = {w.name: w for w in lock.wheels}
    assert names["vllm"].filename == VLLM
    assert names["torch"].version == "2.11.0+cu130"
    assert names["torch"].source == "https://download.pytorch.org/whl/cu130"
    assert {"flashinfer-python", "flashinfer-cubin", "flashinfer-jit-cache"} <= set(names)
    assert all(names[n].version == "0.6.12" for n in names if n.startswith("flashinfer"))
    # the real wheels are not on this machine, nor is the cu130 index: their hashes are
    # recorded as unresolved; uv's comes from PyPI, which this machine reaches
    assert all(w.sha256 is None for w in lock.wheels if w.name != "uv")
    assert names["uv"].source == "https://pypi.org/simple"
    assert names["uv"].filename.endswith("aarch64.whl") and names["uv"].sha256
    with pytest.raises(UnresolvedHashError, match="imagebuild lock"):
        names["vllm"].require_sha256(lock.path)


def test_lock_is_sorted_deterministic_and_round_trips(stack: Stack) -> None:
    lock = read_lock(stack.root / "wheels.lock")
    assert [w.name for w in lock.wheels] == sorted(w.name for w in lock.wheels)
    text = (stack.root / "wheels.lock").read_text()
    assert "Written by 'imagebuild lock'" in text
    assert format_lock(reversed(lock.wheels), "imagebuild.yaml") == text
    by = {w.name: w for w in lock.wheels}
    assert by["torch"].sha256 == TORCH_SHA
    assert by["vllm"].sha256 == sha256_file(stack.root / "wheels" / by["vllm"].filename)


def test_missing_local_wheel_keeps_previous_hash_else_unresolved(stack: Stack) -> None:
    prev = read_lock(stack.root / "wheels.lock")
    vllm = prev.get("vllm")
    (stack.root / "wheels" / vllm.filename).unlink()
    decls = [(w.filename, w.index) for w in prev.wheels]
    kept = compute_lock(stack.root / "wheels", decls, prev)
    assert {w.name: w.sha256 for w in kept.wheels}["vllm"] == vllm.sha256
    assert any("kept the locked sha256" in n for n in kept.notes)
    local_only = [d for d in decls if d[1] is None]
    fresh = compute_lock(stack.root / "wheels", local_only, None)
    assert {w.name: w.sha256 for w in fresh.wheels}["vllm"] is None
    assert any("recorded as unresolved" in n for n in fresh.notes)


def test_index_that_does_not_list_the_file_is_an_error(stack: Stack) -> None:
    with pytest.raises(LockError, match="does not list"):
        compute_lock(stack.root / "wheels",
                     [("torch-2.11.0+cu130-py3-none-any.whl", "http://127.0.0.1:9/simple")],
                     None, fetch=lambda url: "<html></html>")


def test_index_unreachable_is_unresolved_not_invented(stack: Stack) -> None:
    def down(url: str) -> str:
        raise ConnectionError("no route")

    res = compute_lock(stack.root / "wheels",
                       [("torch-2.11.0+cu130-py3-none-any.whl", "http://127.0.0.1:9/simple")],
                       None, fetch=down)
    assert res.wheels[0].sha256 is None
    assert "unreachable" in res.notes[0]


def test_changed_wheel_changes_its_hash(stack: Stack) -> None:
    prev = read_lock(stack.root / "wheels.lock")
    stack.wheel(prev.get("vllm").filename, b"new vllm bytes")
    res = compute_lock(stack.root / "wheels", [(w.filename, w.index) for w in prev.wheels], prev)
    assert {w.name: w.sha256 for w in res.wheels}["vllm"] != prev.get("vllm").sha256
    assert any("sha256 changed" in n for n in res.notes)


def test_a_wheel_digest_mismatch_names_file_expected_and_actual(tmp_path: Path) -> None:
    p = tmp_path / "x-1-py3-none-any.whl"
    p.write_bytes(b"good")
    good = sha256_file(p)
    check_wheel_digest(p, good, good)
    p.write_bytes(b"evil")
    with pytest.raises(WheelHashMismatch) as info:
        check_wheel_digest(p, sha256_file(p), good)
    msg = str(info.value)
    assert str(p) in msg and good in msg and sha256_file(p) in msg
    assert info.value.exit_code == 3


def test_malformed_lock_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "wheels.lock"
    p.write_text("version = 1\n[[wheel]]\nname = 'x'\n")
    with pytest.raises(LockError, match="lacks"):
        read_lock(p)
    p.write_text("not toml [")
    with pytest.raises(LockError, match="malformed"):
        read_lock(p)
    p.write_text('version = 1\n[[wheel]]\nname = "vllm"\nversion = "1"\n'
                 'filename = "vllm-1-py3-none-any.whl"\nsha256 = "abc"\nsource = "wheels/x"\n')
    with pytest.raises(LockError, match="not a sha256"):
        read_lock(p)


def test_atomic_write_leaves_old_file_on_failure(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "wheels.lock"
    atomic_write_text(p, "old\n")

    def boom(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("imagebuild.fsutil.os.replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(p, "new\n")
    assert p.read_text() == "old\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["wheels.lock"]


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path: Path) -> None:
    import os

    kept = tmp_path / "kept"
    atomic_write_text(kept, "one\n")
    kept.chmod(0o640)
    atomic_write_text(kept, "two\n")
    assert kept.stat().st_mode & 0o777 == 0o640 and kept.read_text() == "two\n"
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "new", "x\n")  # a new file follows the umask
    finally:
        os.umask(old)
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o644
