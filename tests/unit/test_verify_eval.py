from __future__ import annotations

import pytest

from imagebuild.engine import RunResult
from imagebuild.errors import LockError
from imagebuild.lock import Lock, read_lock
from imagebuild.spec import Check, cuda_of, expect_fields
from imagebuild.verify import checks_digest, evaluate, render_expect, table

from .conftest import Stack


def _ok(out: str, err: str = "") -> RunResult:
    return RunResult(exit_code=0, stdout=out, stderr=err, timed_out=False)


@pytest.fixture
def lock(stack: Stack):  # type: ignore[no-untyped-def]
    return read_lock(stack.root / "wheels.lock")


GATE = Check(name="torch-gate", run=("python3", "-c", "..."), kind="output",
             expected="2.11.0+cu130 13.0", hint="force-reinstall torch")


def test_exact_output(lock) -> None:  # type: ignore[no-untyped-def]
    assert evaluate(GATE, lock, _ok("2.11.0+cu130 13.0\n", "a warning\n")).passed
    bad = evaluate(GATE, lock, _ok("2.10.0+cpu None\n"))
    assert not bad.passed and bad.got == "2.10.0+cpu None" and bad.hint == "force-reinstall torch"
    assert bad.expected == "2.11.0+cu130 13.0"


def test_specifier(lock) -> None:  # type: ignore[no-untyped-def]
    c = Check(name="tf", run=("x",), kind="specifier", expected=">=5.0.0")
    assert evaluate(c, lock, _ok("5.0.0")).passed
    assert evaluate(c, lock, _ok("5.1.0rc1")).passed
    assert not evaluate(c, lock, _ok("4.57.1")).passed
    r = evaluate(c, lock, _ok("banana"))
    assert not r.passed and "not a version" in r.got
    c4 = Check(name="tf4", run=("x",), kind="specifier", expected="<5")
    assert evaluate(c4, lock, _ok("4.57.1")).passed and not evaluate(c4, lock, _ok("5.0.0")).passed


def test_locked_version(lock) -> None:  # type: ignore[no-untyped-def]
    c = Check(name="v", run=("x",), kind="locked", expected="vllm")
    want = lock.get("vllm").version
    r = evaluate(c, lock, _ok(want))
    assert r.passed and r.expected == f"=={want}"
    assert not evaluate(c, lock, _ok("0.22.0")).passed


def test_succeeds_failure_and_timeout(lock) -> None:  # type: ignore[no-untyped-def]
    c = Check(name="imp", run=("x",), kind="succeeds", expected="", timeout=7)
    assert evaluate(c, lock, _ok("")).passed
    r = evaluate(c, lock, RunResult(1, "", "Traceback\nImportError: libtorch_cuda.so", False))
    assert not r.passed and "exit 1" in r.got and "libtorch_cuda.so" in r.got
    t = evaluate(c, lock, RunResult(None, "", "", True))
    assert not t.passed and t.got == "timed out after 7s (killed)"
    # a non-zero exit fails even an output check whose stdout happens to match
    assert not evaluate(GATE, lock, RunResult(2, "2.11.0+cu130 13.0", "", False)).passed


def test_checks_digest_changes_with_the_checks(lock) -> None:  # type: ignore[no-untyped-def]
    other = Check(name="torch-gate", run=GATE.run, kind="output", expected="2.12.0+cu130 13.0")
    assert checks_digest([GATE], lock) != checks_digest([other], lock)
    assert checks_digest([GATE], lock) == checks_digest([GATE], lock)


def test_table_shows_expected_got_and_hint(lock) -> None:  # type: ignore[no-untyped-def]
    from imagebuild.verify import VerifyRecord

    r = evaluate(GATE, lock, _ok("2.10.0+cpu None"))
    rec = VerifyRecord(image="vllm-node-mimo", image_id="sha256:x", fingerprint="f",
                       input_hash=None, checks_digest="d", checked_at="t", passed=False,
                       results=(r,))
    text = table([rec])
    assert "FAIL" in text and "2.10.0+cpu None" in text and "hint: force-reinstall torch" in text


def test_the_closure_check_compares_every_installed_distribution_with_the_lock(
        stack: Stack) -> None:
    from imagebuild.context import load
    from imagebuild.verify import CLOSURE_CHECK, image_checks

    ctx = load(str(stack.spec_path))
    check = image_checks(ctx.spec, "vllm-node-mimo", ctx.lock)[-1]
    assert check.name == CLOSURE_CHECK and check.kind == "closure"
    locked = {p.name: p.version for p in ctx.lock.closures["vllm-node-mimo"].packages}
    installed = " ".join(f"{n}=={v}" for n, v in sorted(locked.items()))
    # what the base image brings besides (pip, ...) is not the lock's business
    good = evaluate(check, ctx.lock, _ok(f"pip==23.0.1 {installed}\n"))
    assert good.passed and good.got == f"all {len(locked)} installed as locked"
    # a RUN that resolved at build time: the CPU torch, and transformers never installed
    drift = installed.replace("torch==2.11.0+cu130", "torch==2.10.0+cpu").replace(
        "transformers==5.0.0", "")
    bad = evaluate(check, ctx.lock, _ok(drift))
    assert not bad.passed
    assert bad.got == "differ: torch 2.10.0+cpu (locked 2.11.0+cu130); missing: transformers"
    assert bad.hint is not None and "pylock.vllm-node-mimo.toml" in bad.hint
    # the lock is part of what a record was checked against
    assert checks_digest([check], ctx.lock) != checks_digest(
        image_checks(ctx.spec, "vllm-node-tf5", ctx.lock)[-1:], ctx.lock)


FROM_LOCK = Check(name="torch-gate", run=("python3", "-c", "..."), kind="output",
                  expected="{torch.version} {torch.cuda}", hint="force-reinstall torch")


def test_an_expectation_takes_the_torch_pin_from_the_lock(lock) -> None:  # type: ignore[no-untyped-def]
    assert lock.get("torch").version == "2.11.0+cu130"
    r = evaluate(FROM_LOCK, lock, _ok("2.11.0+cu130 13.0\n"))
    assert r.passed and r.expected == "2.11.0+cu130 13.0"  # what verify's table shows
    assert not evaluate(FROM_LOCK, lock, _ok("2.10.0+cpu None")).passed
    # a torch bump is one edit: the lock moves, the expectation (and the checks' digest,
    # so the image is verified again) follows
    bumped = Lock(lock.path, tuple(
        w if w.name != "torch" else type(w)(w.name, "2.12.0+cu132", w.filename, w.sha256,
                                            w.source)
        for w in lock.wheels))
    assert evaluate(FROM_LOCK, bumped, _ok("2.12.0+cu132 13.2")).passed
    assert not evaluate(FROM_LOCK, bumped, _ok("2.11.0+cu130 13.0")).passed
    assert checks_digest([FROM_LOCK], bumped) != checks_digest([FROM_LOCK], lock)
    # the same text written by hand digests the same as the rendered one
    assert checks_digest([FROM_LOCK], lock) == checks_digest([GATE], lock)


def test_expectation_fields_parse_and_refuse(lock) -> None:  # type: ignore[no-untyped-def]
    assert expect_fields("{torch.version} {Torch.cuda}") == [
        ("torch", "version"), " ", ("torch", "cuda")]
    assert expect_fields("{{literal}} {flashinfer_python.version}") == [
        "{", "literal", "}", " ", ("flashinfer-python", "version")]
    assert expect_fields("no fields") == ["no fields"]
    for bad in ("{torch.version", "}", "{torch.sha}", "{.version}", "{}"):
        with pytest.raises(ValueError):
            expect_fields(bad)
    assert render_expect("{{{uv.version}}}", lock) == "{0.9.7}"
    with pytest.raises(LockError, match="names no CUDA release"):
        render_expect("{uv.cuda}", lock)
    with pytest.raises(LockError, match="no wheel named"):
        render_expect("{nothere.version}", lock)


@pytest.mark.parametrize("version, cuda", [
    ("2.11.0+cu130", "13.0"), ("2.9.1+cu128", "12.8"), ("2.4.0+cu118", "11.8"),
    ("0.22.1rc1.dev124+gace95c9cf.d20260603.cu132", "13.2"), ("2.11.0", None),
    ("2.11.0+cpu", None), ("1.0+cuda", None), ("1.0+xcu130", None),
])
def test_the_cuda_release_a_version_names(version: str, cuda: str | None) -> None:
    assert cuda_of(version) == cuda
