"""Prebuilt wheels by URL (wheels.url): fetched once into the wheel store, checked against
the sha256 the spec declares, locked as ``fetched/<URL>#sha256=...``; a wrong sha256, a
404 or an unreachable server keeps nothing. A small HTTP server on 127.0.0.1 plays the
release page; the resolver is the unit tier's offline one (tests/unit/conftest.py)."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagebuild import context, lockflow
from imagebuild.closure import read_closure
from imagebuild.errors import LockError, SpecError, WheelHashMismatch
from imagebuild.lock import read_lock
from imagebuild.progress import Quiet
from imagebuild.wheelbuild import fetch_wheels
from imagebuild.wheelstore import WheelStore, store_state

from .conftest import SPEC, Stack
from .httpserver import StaticServer, serving

WHEEL = "extra_mimo-1.0-py3-none-any.whl"
LOCAL = f"    - {WHEEL}\n"


Release = StaticServer


@pytest.fixture
def release() -> Iterator[StaticServer]:
    with serving(StaticServer()) as server:
        yield server


def _by_url(stack: Stack, release: Release, sha: str | None = None,
            path: str = f"/download/v1.0/{WHEEL}") -> str:
    """extra-mimo moved from the wheels directory to a release URL; returns its sha256."""
    body = (stack.root / "wheels" / WHEEL).read_bytes()
    release.files[path] = body
    (stack.root / "wheels" / WHEEL).unlink()
    real = hashlib.sha256(body).hexdigest()
    stack.write_spec(SPEC.replace(LOCAL, "").replace(
        "  index:\n", f"  url:\n    - url: {release.base}{path}\n      sha256: \"{sha or real}\"\n"
                      f"  index:\n", 1))
    return real


def test_a_release_wheel_is_fetched_once_checked_and_locked(
        stack: Stack, release: Release, offline_lock: object) -> None:
    sha = _by_url(stack, release)
    lockflow.lock(stack.load(), check=False, upgrade=False)
    spec = stack.load()
    assert release.requests == [f"/download/v1.0/{WHEEL}"]
    blob = WheelStore(spec.wheel_store).blob(sha, WHEEL)
    assert blob.is_file()
    entry = read_lock(spec.lock_path).get("extra-mimo")
    assert entry.sha256 == sha and entry.url == f"{release.base}/download/v1.0/{WHEEL}"
    assert entry.source == f"fetched/{entry.url}#sha256={sha}" and entry.is_local
    mimo = read_closure(spec.closure_lock_path("vllm-node-mimo"), "vllm-node-mimo")
    assert mimo.by_name()["extra-mimo"].url is None  # served by imagebuild, from the store
    # the locks agree with the spec; a second lock (and --check) downloads nothing
    context.load(str(stack.spec_path))
    assert lockflow.lock(stack.load(), check=True, upgrade=False).closures
    assert len(release.requests) == 1
    assert [w.use for w in store_state(spec, read_lock(spec.lock_path)).wheels] == ["locked"]
    # another sha256 in the spec is another wheel: the lock is stale until locked again
    stack.write_spec(stack.spec_path.read_text().replace(sha, "f" * 64))
    with pytest.raises(LockError, match="out of date"):
        context.load(str(stack.spec_path))


def test_a_download_with_other_bytes_is_refused_and_nothing_is_kept(
        stack: Stack, release: Release, offline_lock: object) -> None:
    _by_url(stack, release, sha="0" * 64)
    texts = {p: p.read_text() for p in (stack.root / "locks").iterdir()}
    lock_before = (stack.root / "wheels.lock").read_text()
    with pytest.raises(WheelHashMismatch) as info:
        lockflow.lock(stack.load(), check=False, upgrade=False)
    assert info.value.exit_code == 3
    assert "the spec declares " + "0" * 64 in info.value.message
    store = stack.load().wheel_store
    assert not list(store.glob("sha256/*/*")) and not list(store.glob("incoming/*"))
    assert (stack.root / "wheels.lock").read_text() == lock_before
    assert all(p.read_text() == t for p, t in texts.items())


def test_a_missing_release_is_an_error_and_an_unreachable_one_leaves_it_unresolved(
        stack: Stack, release: Release, offline_lock: object) -> None:
    _by_url(stack, release, path=f"/gone/{WHEEL}")
    release.files.clear()
    with pytest.raises(LockError, match="is not there"):
        lockflow.lock(stack.load(), check=False, upgrade=False)
    # a server that does not answer: the lock goes on, the closure stays unresolved
    text = stack.spec_path.read_text().replace(release.base, "http://127.0.0.1:9")
    stack.write_spec(text)
    done = lockflow.lock(stack.load(), check=False, upgrade=False)
    assert any(f"{WHEEL}: cannot fetch it" in n for n in done.notes)
    mimo = {c.image: c for c in done.closures}["vllm-node-mimo"]
    assert mimo.unresolved is not None and "is not fetched from" in mimo.unresolved
    with pytest.raises(LockError, match="unresolved"):
        lockflow.lock(stack.load(), check=True, upgrade=False)


@pytest.mark.parametrize("entry, says", [
    ("    - url: http://example.com/x/extra_mimo-1.0-py3-none-any.whl?token=1\n"
     "      sha256: " + "a" * 64 + "\n", "http(s) URL of a .whl file"),
    ("    - url: http://example.com/x/extra_mimo-1.0-py3-none-any.whl\n",
     "missing required key 'sha256'"),
    ("    - url: http://example.com/x/extra_mimo-1.0-py3-none-any.whl\n"
     "      sha256: " + "1" * 64 + "\n", "quote it"),
    ("    - url: http://example.com/x/extra_mimo-1.0-py3-none-any.whl\n"
     "      sha256: ABC\n", "sha256 (64 lowercase hex digits)"),
    ("    - url: http://example.com/x/not-a-wheel.whl\n"
     "      sha256: " + "a" * 64 + "\n", "does not end in a wheel filename"),
    ("    - url: file:///etc/extra_mimo-1.0-py3-none-any.whl\n"
     "      sha256: " + "a" * 64 + "\n", "http(s) URL of a .whl file"),
])
def test_a_url_entry_is_checked_at_load(stack: Stack, entry: str, says: str) -> None:
    stack.write_spec(SPEC.replace(LOCAL, "").replace("  index:\n", f"  url:\n{entry}  index:\n"))
    with pytest.raises(SpecError) as info:
        stack.load()
    assert says in str(info.value) and info.value.exit_code == 2


def test_a_fetched_wheels_lock_entry_is_checked_when_read(stack: Stack, tmp_path: Path) -> None:
    lock = stack.root / "wheels.lock"
    good = lock.read_text()
    local = f'source = "wheels/{WHEEL}"'
    assert local in good
    for bad in (f'source = "fetched/http://x/{WHEEL}"',  # no sha256
                f'source = "fetched/http://x/other-1.0-py3-none-any.whl#sha256={"a" * 64}"'):
        lock.write_text(good.replace(local, bad))
        with pytest.raises(LockError, match="source"):
            read_lock(lock)


def test_a_build_on_a_machine_without_the_wheel_stops_when_its_url_is_unreachable(
        stack: Stack, release: Release, offline_lock: object) -> None:
    _by_url(stack, release)
    lockflow.lock(stack.load(), check=False, upgrade=False)
    spec = stack.load()
    entry = read_lock(spec.lock_path).get("extra-mimo")
    shutil.rmtree(spec.wheel_store)  # another head: the lock names it, the store lacks it
    dead = type(entry)(entry.name, entry.version, entry.filename, entry.sha256,
                       entry.source.replace(release.base, "http://127.0.0.1:9"))
    with pytest.raises(LockError, match=r"cannot fetch extra_mimo-1\.0-py3-none-any\.whl"):
        fetch_wheels(spec, [dead], Quiet(), strict=True)
    assert not list(spec.wheel_store.glob("sha256/*/*"))
    assert not list(spec.wheel_store.glob("incoming/*"))
    # reachable: fetched once, and a second call does not ask again
    assert fetch_wheels(spec, [entry], Quiet(), strict=True) == []
    asked = len(release.requests)
    assert fetch_wheels(spec, [entry], Quiet(), strict=True) == [] and (
        len(release.requests) == asked)


def test_a_build_fetches_the_prebuilt_wheels_before_it_builds_any_from_source(
        stack: Stack, release: Release, offline_lock: object,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead release link fails the build at once, not after hours of building vllm."""
    from imagebuild import wheelops
    from imagebuild.locking import read_lock_files

    from ..fake_engine import FakeEngine

    _by_url(stack, release)
    lockflow.lock(stack.load(), check=False, upgrade=False)
    spec = stack.load()
    shutil.rmtree(spec.wheel_store)  # another head: the lock names it, the store lacks it
    release.files.clear()  # and the release is gone
    realized: list[object] = []
    monkeypatch.setattr("imagebuild.wheelops._realize", lambda *a, **k: realized.append(a))
    to_build = wheelops.WheelStep(derivation=None, record=None, locked=False)  # type: ignore[arg-type]
    with pytest.raises(LockError, match=r"is not there \(404\)"):
        wheelops.realize_planned(spec, FakeEngine(), wheelops.WheelPlan([to_build]),
                                 read_lock_files(spec), Quiet())
    assert realized == []
