"""Wheels built from source, unit by unit: the spec's ``wheels.build``, the derivations'
input hashes and the target-tag check (wheelplan), the wheel store, ``built/<hash>`` lock
entries, the lock step's built entries (ops) and the source/output tars of a build
(wheelbuild). No engine, no git, no network."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from imagebuild import context, wheelbuild, wheelops
from imagebuild.errors import LockError, SpecError, WheelBuildFailed
from imagebuild.lock import (
    Lock,
    LockedWheel,
    compute_lock,
    format_lock,
    read_lock,
)
from imagebuild.locking import check_matches
from imagebuild.spec import (
    BUILD_OUT,
    BUILD_SRC,
    DEFAULT_WHEEL_COMMAND,
    RESERVED_BUILD_ENV,
    Spec,
    WheelBuild,
    WheelDecl,
    load_spec,
)
from imagebuild.wheelbuild import locked_built_wheels
from imagebuild.wheelplan import (
    needed_by,
    target_tags,
    wheel_derivation,
    wheel_plan,
    wheel_problem,
)
from imagebuild.wheelstore import (
    WheelRecord,
    WheelStore,
    stored,
    wheel_path,
    wheel_view,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
DIGEST = "sha256:" + "d" * 64
LOCAL = "flashinfer_python-0.6.12-py3-none-any.whl"
H1 = "1" * 64
H2 = "2" * 64
SHA = "5" * 64
PY, PLATFORM = "3.11", "x86_64-manylinux_2_28"


# -- a spec with wheels built from source -----------------------------------------------------


def _build(**over: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": "my_vllm.fork",
        "git": "https://github.com/vllm-project/vllm.git",
        "commit": COMMIT,
        "patches": ["patches/b.patch", "patches/a.patch"],
        "builder": "example/builder:1",
        "builder_digest": DIGEST,
        "env": {"TORCH_CUDA_ARCH_LIST": "8.0 12.1+PTX", "MAX_JOBS": 4},
    }
    entry.update(over)
    return entry


def _doc(builds: Any = None, image_wheels: list[str] | None = None) -> dict[str, Any]:
    return {
        "schema": 2,
        "state": "state",
        "target": {"python": PY, "platform": PLATFORM},
        "wheels": {"local": [LOCAL], "build": [_build()] if builds is None else builds},
        "images": {
            "node": {"template": "node.Dockerfile.j2", "base": "example/base:1",
                     "wheels": ["my-vllm-fork", "flashinfer-python"]
                     if image_wheels is None else image_wheels},
        },
    }


def _write(root: Path, doc: dict[str, Any]) -> Path:
    (root / "patches").mkdir(exist_ok=True)
    for name in ("a.patch", "b.patch"):
        if not (root / "patches" / name).exists():
            (root / "patches" / name).write_text(f"--- {name}\n")
    path = root / "imagebuild.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _load(root: Path, doc: dict[str, Any]) -> Spec:
    return load_spec(_write(root, doc))


def _refused(root: Path, doc: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as info:
        _load(root, doc)
    assert info.value.exit_code == 2
    assert str(root / "imagebuild.yaml") in str(info.value)
    return str(info.value)


def test_a_valid_build_entry_is_read_typed(tmp_path: Path) -> None:
    spec = _load(tmp_path, _doc())
    assert list(spec.built) == ["my-vllm-fork"]  # canonicalized
    b = spec.built["my-vllm-fork"]
    assert b.name == "my-vllm-fork"
    assert b.git == "https://github.com/vllm-project/vllm.git"
    assert b.commit == COMMIT
    # relative to the spec, absolute, in the order given
    assert b.patches == (tmp_path / "patches" / "b.patch", tmp_path / "patches" / "a.patch")
    assert all(p.is_absolute() for p in b.patches)
    assert b.env == (("MAX_JOBS", "4"), ("TORCH_CUDA_ARCH_LIST", "8.0 12.1+PTX"))  # sorted
    assert b.command == DEFAULT_WHEEL_COMMAND
    assert BUILD_OUT in b.command
    assert b.builder == "example/builder:1" and b.builder_digest == DIGEST
    assert b.builder_reference == f"example/builder:1@{DIGEST}"
    # an image's wheels may name a built wheel
    assert spec.images["node"].wheels == ("my-vllm-fork", "flashinfer-python")
    assert spec.wheel_store == tmp_path / "state" / "wheel-store"


def test_a_build_entry_without_optional_keys(tmp_path: Path) -> None:
    entry = _build(command=["uv", "build", "--wheel", "--out-dir", BUILD_OUT])
    for key in ("patches", "builder_digest", "env"):
        del entry[key]
    b = _load(tmp_path, _doc([entry])).built["my-vllm-fork"]
    assert b.patches == () and b.env == () and b.builder_digest is None
    assert b.builder_reference == "example/builder:1"
    assert b.command == ("uv", "build", "--wheel", "--out-dir", BUILD_OUT)


def test_no_build_section_means_no_built_wheels(tmp_path: Path) -> None:
    doc = _doc(image_wheels=["flashinfer-python"])
    del doc["wheels"]["build"]
    assert dict(_load(tmp_path, doc).built) == {}


def test_build_must_be_a_list(tmp_path: Path) -> None:
    err = _refused(tmp_path, _doc(builds=_build()))
    assert "wheels.build" in err and "expected a list" in err


@pytest.mark.parametrize("key", ["name", "git", "commit", "builder"])
def test_build_missing_required_key(tmp_path: Path, key: str) -> None:
    entry = _build()
    del entry[key]
    err = _refused(tmp_path, _doc([entry], image_wheels=["flashinfer-python"]))
    assert "wheels.build[0]" in err and f"missing required key {key!r}" in err


def test_build_unknown_key_suggests(tmp_path: Path) -> None:
    err = _refused(tmp_path, _doc([_build(comit=COMMIT)]))
    assert "wheels.build[0]" in err and "unknown key 'comit'" in err
    assert "did you mean 'commit'" in err


@pytest.mark.parametrize("commit", [
    COMMIT[:12],  # short
    COMMIT.upper(),  # uppercase
    "main",  # a branch
    "v0.22.1",  # a tag
    COMMIT + "0",  # 41 digits
])
def test_build_commit_must_be_a_full_lowercase_id(tmp_path: Path, commit: str) -> None:
    err = _refused(tmp_path, _doc([_build(commit=commit)]))
    assert "wheels.build[0].commit" in err and "not a full commit id" in err


def test_build_commit_may_be_a_sha256_id(tmp_path: Path) -> None:
    assert _load(tmp_path, _doc([_build(commit="e" * 64)])).built["my-vllm-fork"].commit \
        == "e" * 64


@pytest.mark.parametrize("url", [
    "-uhttps://example.com/x.git",
    "--upload-pack=touch /tmp/x",
    "https://example.com/a b.git",
    "ext::sh -c touch% /tmp/pwned",
    "ext::sh",
    "relative/path",
    "ftp://example.com/x.git",
    "https://example.com/x.git\nRUN id",
    "ssh://-oProxyCommand=touch%20/tmp/x/repo.git",
    "ssh://git@-oProxyCommand=x/repo.git",
])
def test_build_bad_git_url(tmp_path: Path, url: str) -> None:
    err = _refused(tmp_path, _doc([_build(git=url)]))
    assert "wheels.build[0].git" in err


@pytest.mark.parametrize("url", [
    "https://github.com/vllm-project/vllm.git",
    "ssh://git@example.com:2222/vllm.git",
    "git://example.com/vllm.git",
    "file:///srv/git/vllm.git",
    "/srv/git/vllm.git",
])
def test_build_good_git_urls(tmp_path: Path, url: str) -> None:
    assert _load(tmp_path, _doc([_build(git=url)])).built["my-vllm-fork"].git == url


def test_build_missing_patch_file(tmp_path: Path) -> None:
    err = _refused(tmp_path, _doc([_build(patches=["patches/a.patch", "patches/gone.patch"])]))
    assert "wheels.build[0].patches[1]" in err and "does not exist" in err
    assert str(tmp_path / "patches" / "gone.patch") in err


def test_build_patch_that_is_a_directory(tmp_path: Path) -> None:
    err = _refused(tmp_path, _doc([_build(patches=["patches"])]))
    assert "wheels.build[0].patches[0]" in err


@pytest.mark.parametrize("key", sorted(RESERVED_BUILD_ENV))
def test_build_reserved_env_key(tmp_path: Path, key: str) -> None:
    err = _refused(tmp_path, _doc([_build(env={key: "1"})]))
    assert "wheels.build[0].env" in err and f"{key} is set by imagebuild" in err


def test_build_env_value_with_a_newline(tmp_path: Path) -> None:
    err = _refused(tmp_path, _doc([_build(env={"MAX_JOBS": "4\nRUN id"})]))
    assert "wheels.build[0].env.MAX_JOBS" in err and "newline" in err


def test_build_env_bad_key(tmp_path: Path) -> None:
    err = _refused(tmp_path, _doc([_build(env={"1BAD": "x"})]))
    assert "wheels.build[0].env" in err


def test_build_empty_command(tmp_path: Path) -> None:
    err = _refused(tmp_path, _doc([_build(command=[])]))
    assert "wheels.build[0].command" in err and "exec form" in err


def test_build_command_that_is_not_a_list(tmp_path: Path) -> None:
    err = _refused(tmp_path, _doc([_build(command="make wheel")]))
    assert "wheels.build[0].command" in err


def test_build_bad_builder_and_digest(tmp_path: Path) -> None:
    err = _refused(tmp_path, _doc([_build(builder="Example/Builder:1")]))
    assert "wheels.build[0].builder" in err
    err = _refused(tmp_path, _doc([_build(builder_digest="sha256:abc")]))
    assert "wheels.build[0].builder_digest" in err


def test_build_name_must_be_a_project_name(tmp_path: Path) -> None:
    err = _refused(tmp_path, _doc([_build(name="vllm; rm -rf /")]))
    assert "wheels.build[0].name" in err


def test_a_wheel_both_built_and_local_is_refused(tmp_path: Path) -> None:
    err = _refused(tmp_path, _doc([_build(name="flashinfer-python")],
                                  image_wheels=["flashinfer-python"]))
    assert "wheels.build" in err
    assert f"flashinfer-python is built from source and also declared as {LOCAL}" in err


def test_the_same_wheel_built_twice_is_refused(tmp_path: Path) -> None:
    err = _refused(tmp_path, _doc([_build(), _build(name="my-vllm-fork", commit=OTHER_COMMIT)]))
    assert "wheels.build[1].name" in err and "my-vllm-fork is built twice" in err


def test_an_image_naming_an_unknown_wheel_is_refused(tmp_path: Path) -> None:
    err = _refused(tmp_path, _doc(image_wheels=["my-vllm-frok"]))
    assert "images.node.wheels" in err and "'my-vllm-frok'" in err
    assert "wheels.build" in err and "did you mean 'my-vllm-fork'" in err


def test_a_locked_check_may_name_a_built_wheel(tmp_path: Path) -> None:
    doc = _doc()
    doc["checks"] = {"vllm-locked": {"run": ["true"], "locked": "My_Vllm.Fork"}}
    doc["images"]["node"]["checks"] = ["vllm-locked"]
    assert _load(tmp_path, doc).checks["vllm-locked"].expected == "my-vllm-fork"


# -- wheelplan: input hashes ---------------------------------------------------------------


def _wb(tmp_path: Path, **over: Any) -> WheelBuild:
    (tmp_path / "p").mkdir(exist_ok=True)
    a, b = tmp_path / "p" / "a.patch", tmp_path / "p" / "b.patch"
    if not a.exists():
        a.write_text("patch a\n")
        b.write_text("patch b\n")
    base = WheelBuild(name="vllm", git="https://example.com/vllm.git", commit=COMMIT,
                      patches=(a, b), builder="example/builder:1", builder_digest=DIGEST,
                      env=(("MAX_JOBS", "4"),))
    return dataclasses.replace(base, **over)


def test_input_hash_is_stable_and_ignores_the_git_url(tmp_path: Path) -> None:
    base = wheel_derivation(_wb(tmp_path))
    assert len(base.input_hash) == 64 and base.hash12 == base.input_hash[:12]
    assert wheel_derivation(_wb(tmp_path)).input_hash == base.input_hash
    for url in ("https://mirror.example.org/other.git", "/srv/git/vllm.git"):
        assert wheel_derivation(_wb(tmp_path, git=url)).input_hash == base.input_hash
    assert base.patches == (("a.patch", hashlib.sha256(b"patch a\n").hexdigest()),
                            ("b.patch", hashlib.sha256(b"patch b\n").hexdigest()))


def test_input_hash_changes_with_each_input(tmp_path: Path) -> None:
    base = _wb(tmp_path)
    a, b = base.patches
    variants = {
        "commit": _wb(tmp_path, commit=OTHER_COMMIT),
        "patch order": _wb(tmp_path, patches=(b, a)),
        "one patch fewer": _wb(tmp_path, patches=(a,)),
        "builder": _wb(tmp_path, builder="example/builder:2"),
        "builder digest": _wb(tmp_path, builder_digest="sha256:" + "e" * 64),
        "no builder digest": _wb(tmp_path, builder_digest=None),
        "env value": _wb(tmp_path, env=(("MAX_JOBS", "8"),)),
        "env added": _wb(tmp_path, env=(("MAX_JOBS", "4"), ("NVCC_THREADS", "2"))),
        "command": _wb(tmp_path, command=("make", "wheel")),
        "name": _wb(tmp_path, name="vllm-fork"),
    }
    hashes = {what: wheel_derivation(v).input_hash for what, v in variants.items()}
    first = wheel_derivation(base).input_hash
    assert all(h != first for h in hashes.values()), hashes
    assert len(set(hashes.values())) == len(hashes)


def test_input_hash_changes_with_a_patch_s_bytes(tmp_path: Path) -> None:
    build = _wb(tmp_path)
    before = wheel_derivation(build).input_hash
    build.patches[1].write_text("patch b, refreshed\n")
    after = wheel_derivation(build).input_hash
    assert after != before
    build.patches[1].write_text("patch b\n")
    assert wheel_derivation(build).input_hash == before


def _plan_spec(root: Path) -> Spec:
    # spec order is not alphabetical, nor the order the images name them in
    builds = [_build(name=n, patches=[]) for n in ("zeta", "alpha", "mu")]
    doc = _doc(builds)
    doc["images"] = {
        "root": {"template": "t.j2", "base": "example/base:1", "wheels": ["mu", "zeta"]},
        "child": {"template": "t.j2", "parent": "root", "wheels": ["alpha"]},
        "other": {"template": "t.j2", "base": "example/base:1", "wheels": [LOCAL.split("-")[0]]},
    }
    return _load(root, doc)


def test_needed_by_takes_the_closure_in_spec_order(tmp_path: Path) -> None:
    spec = _plan_spec(tmp_path)
    assert needed_by(spec, ["root"]) == ["zeta", "mu"]
    assert needed_by(spec, ["child"]) == ["zeta", "alpha", "mu"]  # and its parent's
    assert needed_by(spec, ["other"]) == []
    assert needed_by(spec, []) == ["zeta", "alpha", "mu"]


def test_wheel_plan_names_in_spec_order(tmp_path: Path) -> None:
    spec = _plan_spec(tmp_path)
    assert [d.name for d in wheel_plan(spec)] == ["zeta", "alpha", "mu"]
    assert [d.name for d in wheel_plan(spec, ["mu", "zeta"])] == ["zeta", "mu"]
    assert wheel_plan(spec, []) == []
    hashes = {d.input_hash for d in wheel_plan(spec)}
    assert len(hashes) == 3  # the name is an input


# -- wheelplan: what a built wheel must be ---------------------------------------------------


@pytest.mark.parametrize("filename", [
    "vllm-0.1-cp311-cp311-linux_x86_64.whl",
    "vllm-0.1-py3-none-any.whl",
    "vllm-0.1-cp311-cp311-manylinux_2_28_x86_64.whl",
    "vllm-0.1-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    "vllm-0.1-cp38-abi3-linux_x86_64.whl",
])
def test_wheel_problem_accepts_wheels_for_the_target(filename: str) -> None:
    assert wheel_problem(filename, "vllm", PY, PLATFORM, ("vllm", "0.1")) is None


@pytest.mark.parametrize("platform", ["x86_64-unknown-linux-gnu", "x86_64-manylinux2014",
                                      "x86_64-linux"])
def test_wheel_problem_accepts_a_native_wheel_for_uvs_other_linux_spellings(platform: str
                                                                         ) -> None:
    for filename in ("vllm-0.1-cp311-cp311-linux_x86_64.whl",
                     "vllm-0.1-cp311-cp311-manylinux2014_x86_64.whl"):
        assert wheel_problem(filename, "vllm", PY, platform, ("vllm", "0.1")) is None
    assert wheel_problem("vllm-0.1-cp311-cp311-linux_aarch64.whl", "vllm", PY, platform,
                         ("vllm", "0.1")) is not None


def test_target_tags_for_a_manylinux_target() -> None:
    tags = {str(t) for t in target_tags(PY, PLATFORM)}
    assert {"cp311-cp311-linux_x86_64", "py3-none-any", "cp311-cp311-manylinux_2_28_x86_64",
            "cp311-cp311-manylinux2014_x86_64", "cp311-abi3-linux_x86_64"} <= tags
    assert "cp311-cp311-manylinux_2_34_x86_64" not in tags  # newer glibc than the target
    assert not any("aarch64" in t or "cp312" in t for t in tags)


@pytest.mark.parametrize("filename,says", [
    ("vllm-0.1-cp311-cp311-linux_aarch64.whl", "none of them installs on CPython 3.11"),
    ("vllm-0.1-cp312-cp312-linux_x86_64.whl", "cp312-cp312-linux_x86_64"),
    ("vllm-0.1-cp311-cp311-manylinux_2_34_x86_64.whl", "none of them installs"),
    ("flashinfer_python-0.1-py3-none-any.whl", "a wheel of flashinfer-python, not of vllm"),
    ("vllm-0.1.tar.gz", "not a wheel filename"),
    ("vllm.whl", "not a wheel filename"),
])
def test_wheel_problem_refuses(filename: str, says: str) -> None:
    problem = wheel_problem(filename, "vllm", PY, PLATFORM, ("vllm", "0.1"))
    assert problem is not None and says in problem


def test_wheel_problem_checks_the_metadata() -> None:
    f = "vllm-0.1-py3-none-any.whl"
    assert "has no .dist-info/METADATA" in (wheel_problem(f, "vllm", PY, PLATFORM, None) or "")
    named = wheel_problem(f, "vllm", PY, PLATFORM, ("other", "0.1")) or ""
    assert "METADATA names 'other'" in named
    versioned = wheel_problem(f, "vllm", PY, PLATFORM, ("vllm", "0.2")) or ""
    assert "METADATA says version 0.2" in versioned
    bad = wheel_problem(f, "vllm", PY, PLATFORM, ("vllm", "not a version")) or ""
    assert "is not a version" in bad
    # the same name and version, spelled otherwise
    assert wheel_problem(f, "vllm", PY, PLATFORM, ("VLLM", "0.1.0")) is None


# -- the wheel store -----------------------------------------------------------------------

FILENAME = "vllm-0.1-cp311-cp311-linux_x86_64.whl"


def _record(wheel_bytes: bytes = b"wheel bytes", input_hash: str = H1) -> WheelRecord:
    return WheelRecord(name="vllm", version="0.1", filename=FILENAME,
                       sha256=hashlib.sha256(wheel_bytes).hexdigest(), input_hash=input_hash,
                       built="2026-01-01T00:00:00+00:00", seconds=1.5, log="/tmp/x.log",
                       builder_id="sha256:" + "b" * 64)


def _put(store: WheelStore, data: bytes = b"wheel bytes", input_hash: str = H1) -> WheelRecord:
    with store.incoming() as incoming:
        wheel = incoming / FILENAME
        wheel.write_bytes(data)
        wheel.chmod(0o600)  # as a private temp file would be
        return store.put(wheel, _record(data, input_hash))


def test_store_put_then_lookup(tmp_path: Path) -> None:
    store = WheelStore(tmp_path / "store")
    assert store.lookup(H1) is None
    record = _put(store)
    assert store.lookup(H1) == record
    assert store.lookup(H2) is None
    blob = store.blob(record.sha256, FILENAME)
    assert blob == tmp_path / "store" / "sha256" / record.sha256 / FILENAME
    assert blob.read_bytes() == b"wheel bytes"
    assert blob.stat().st_mode & 0o777 == 0o644
    saved = json.loads((tmp_path / "store" / "derivations" / f"{H1}.json").read_text())
    assert saved["schema"] == 1 and saved["input_hash"] == H1 and saved["sha256"] == record.sha256


def test_store_put_same_bytes_for_another_derivation(tmp_path: Path) -> None:
    store = WheelStore(tmp_path / "store")
    first = _put(store, input_hash=H1)
    second = _put(store, input_hash=H2)
    assert store.lookup(H1) == first and store.lookup(H2) == second
    assert len(list((tmp_path / "store" / "sha256").iterdir())) == 1


def test_store_put_leaves_no_temp_files(tmp_path: Path) -> None:
    store = WheelStore(tmp_path / "store")
    _put(store, input_hash=H1)
    _put(store, input_hash=H1)  # the record rewritten
    _put(store, input_hash=H2)
    derivations = tmp_path / "store" / "derivations"
    assert sorted(p.name for p in derivations.iterdir()) == [f"{H1}.json", f"{H2}.json"]
    assert list((tmp_path / "store" / "incoming").iterdir()) == []


def _good_record_json() -> dict[str, Any]:
    return {"schema": 1, **dataclasses.asdict(_record())}


def _write_record(store: WheelStore, data: dict[str, Any] | str, at: str = H1) -> None:
    """A record (and, for a mapping, the blob it names) written by hand."""
    path = store.root / "derivations" / f"{at}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, dict):
        sha, filename = data.get("sha256"), data.get("filename")
        if isinstance(sha, str) and isinstance(filename, str) and "/" not in sha + filename:
            blob = store.blob(sha, filename)
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(b"wheel bytes")
        path.write_text(json.dumps(data))
    else:
        path.write_text(data)


def test_store_hand_written_good_record_is_a_hit(tmp_path: Path) -> None:
    store = WheelStore(tmp_path / "store")
    _write_record(store, _good_record_json())
    assert store.lookup(H1) == _record()


def _bad(**over: Any) -> dict[str, Any]:
    data = _good_record_json()
    for k, v in over.items():
        if v is _DROP:
            del data[k]
        else:
            data[k] = v
    return data


_DROP = object()


@pytest.mark.parametrize("data", [
    "{not json",
    "[]",
    _bad(schema=2),
    _bad(schema=_DROP),
    _bad(input_hash=H2),
    _bad(input_hash="1" * 12),
    _bad(sha256="xyz"),
    _bad(sha256="A" * 64),
    _bad(filename="other-0.1-cp311-cp311-linux_x86_64.whl"),
    _bad(filename="vllm-0.2-cp311-cp311-linux_x86_64.whl"),
    _bad(filename="vllm.whl"),
    _bad(name="other"),
    _bad(seconds="1.5"),
    _bad(log=None),
    _bad(builder_id="b" * 64),  # not an image ID
    _bad(builder_id=None),
    _bad(built=_DROP),
], ids=["not-json", "not-object", "schema-2", "no-schema", "other-input-hash",
        "short-input-hash", "bad-sha", "upper-sha", "other-name-file", "other-version-file",
        "unparsable-file", "other-name", "seconds-text", "log-null", "builder-not-an-id",
        "builder-null", "no-built"])
def test_store_lookup_refuses_bad_records(tmp_path: Path, data: dict[str, Any] | str) -> None:
    store = WheelStore(tmp_path / "store")
    _write_record(store, copy.deepcopy(data))
    assert store.lookup(H1) is None


def test_store_lookup_refuses_a_record_whose_wheel_is_gone(tmp_path: Path) -> None:
    store = WheelStore(tmp_path / "store")
    record = _put(store)
    assert store.lookup(H1) == record
    store.blob(record.sha256, record.filename).unlink()
    assert store.lookup(H1) is None


def test_store_lookup_refuses_a_record_that_is_not_utf8(tmp_path: Path) -> None:
    store = WheelStore(tmp_path / "store")
    _put(store)
    (tmp_path / "store" / "derivations" / f"{H1}.json").write_bytes(b"\xff\xfe{")
    assert store.lookup(H1) is None


def test_store_incoming_is_removed_afterwards(tmp_path: Path) -> None:
    store = WheelStore(tmp_path / "store")
    with store.incoming() as first:
        (first / "output.tar").write_bytes(b"x")
        (first / "sub").mkdir()
        (first / "sub" / "f").write_bytes(b"y")
        assert first.is_dir() and first.parent == tmp_path / "store" / "incoming"
    assert not first.exists()
    with pytest.raises(RuntimeError, match="boom"), store.incoming() as second:
        (second / "output.tar").write_bytes(b"x")
        raise RuntimeError("boom")
    assert not second.exists()
    assert first != second
    assert list((tmp_path / "store" / "incoming").iterdir()) == []


def _built_entry(record: WheelRecord) -> LockedWheel:
    return LockedWheel(record.name, record.version, record.filename, record.sha256,
                       "built/" + record.input_hash)


def test_wheel_path_and_view(tmp_path: Path) -> None:
    spec = _load(tmp_path, _doc())
    spec.wheels_dir.mkdir()
    (spec.wheels_dir / LOCAL).write_bytes(b"local")
    (spec.wheels_dir / "notes.txt").write_text("not a wheel")
    # files of a project built from source are left out: the store's wheel is the one
    (spec.wheels_dir / FILENAME).write_bytes(b"a stale copy")
    (spec.wheels_dir / "vllm-0.1+cu132-py3-none-any.whl").write_bytes(b"an old download")
    store = WheelStore(spec.wheel_store)
    record = _put(store)
    built = _built_entry(record)
    local = LockedWheel("flashinfer-python", "0.6.12", LOCAL, "6" * 64, "wheels/" + LOCAL)
    assert wheel_path(spec, built) == store.blob(record.sha256, FILENAME)
    assert wheel_path(spec, local) == spec.wheels_dir / LOCAL
    with wheel_view(spec, [local]) as view:
        assert view == spec.wheels_dir  # nothing built: the directory itself
    with wheel_view(spec, [local, built]) as view:
        assert sorted(p.name for p in view.iterdir()) == sorted([LOCAL, FILENAME])
        assert (view / FILENAME).is_symlink()
        assert (view / FILENAME).read_bytes() == b"wheel bytes"
        assert (view / LOCAL).read_bytes() == b"local"
    assert not view.exists()


# -- wheels.lock: built entries --------------------------------------------------------------


def _lock_text(sha: str, source: str, filename: str = FILENAME) -> str:
    name, version = "vllm", filename.split("-")[1]
    return (f'version = 1\n\n[[wheel]]\nname = "{name}"\nversion = "{version}"\n'
            f'filename = "{filename}"\nsha256 = "{sha}"\nsource = "{source}"\n')


def test_built_entry_round_trips(tmp_path: Path) -> None:
    built = LockedWheel("vllm", "0.1", FILENAME, SHA, "built/" + H1)
    local = LockedWheel("flashinfer-python", "0.6.12", LOCAL, "6" * 64, "wheels/" + LOCAL)
    text = format_lock([built, local], "imagebuild.yaml")
    assert f'source = "built/{H1}"' in text
    path = tmp_path / "wheels.lock"
    path.write_text(text)
    lock = read_lock(path)
    assert lock.wheels == (local, built)  # sorted by name
    w = lock.get("vllm")
    assert w.is_built and w.is_local and w.derivation == H1 and w.index is None
    assert w.sha256 == SHA
    assert not local.is_built and local.derivation is None and local.is_local
    assert format_lock(lock.wheels, "imagebuild.yaml") == text


@pytest.mark.parametrize("source", [
    "built/" + "g" * 64,
    "built/" + "A" * 64,
    "built/" + "1" * 63,
    "built/" + "1" * 65,
    "built/",
    "built/../" + "1" * 64,
])
def test_built_source_must_carry_a_hex_input_hash(tmp_path: Path, source: str) -> None:
    path = tmp_path / "wheels.lock"
    path.write_text(_lock_text(SHA, source))
    with pytest.raises(LockError, match="is neither") as info:
        read_lock(path)
    assert info.value.exit_code == 2
    with pytest.raises(LockError, match="is neither"):
        format_lock([LockedWheel("vllm", "0.1", FILENAME, SHA, source)], "imagebuild.yaml")


def test_built_entry_must_have_a_sha256(tmp_path: Path) -> None:
    path = tmp_path / "wheels.lock"
    path.write_text(_lock_text("unresolved", "built/" + H1))
    with pytest.raises(LockError, match="a wheel built from source has no sha256"):
        read_lock(path)
    with pytest.raises(LockError, match="has no sha256"):
        format_lock([LockedWheel("vllm", "0.1", FILENAME, None, "built/" + H1)], "x.yaml")


def _lock(tmp_path: Path, *wheels: LockedWheel) -> Lock:
    return Lock(path=tmp_path / "wheels.lock", wheels=tuple(wheels))


BUILT = LockedWheel("vllm", "0.1", FILENAME, SHA, "built/" + H1)
LOCAL_W = LockedWheel("flashinfer-python", "0.6.12", LOCAL, "6" * 64, "wheels/" + LOCAL)


def test_check_matches_accepts_the_current_derivation(tmp_path: Path) -> None:
    check_matches(_lock(tmp_path, BUILT, LOCAL_W), [WheelDecl(LOCAL)], tmp_path / "imagebuild.yaml",
                  built={"vllm": H1})


def test_check_matches_refuses_a_missing_built_entry(tmp_path: Path) -> None:
    with pytest.raises(LockError) as info:
        check_matches(_lock(tmp_path, LOCAL_W), [WheelDecl(LOCAL)], tmp_path / "imagebuild.yaml",
                      built={"vllm": H1})
    msg = str(info.value)
    assert "out of date" in msg and "builds vllm from source" in msg
    assert "has no entry for it" in msg and "'imagebuild build'" in msg
    assert info.value.exit_code == 2


def test_check_matches_refuses_another_derivation(tmp_path: Path) -> None:
    with pytest.raises(LockError) as info:
        check_matches(_lock(tmp_path, BUILT, LOCAL_W), [WheelDecl(LOCAL)],
                      tmp_path / "imagebuild.yaml", built={"vllm": H2})
    msg = str(info.value)
    assert "builds vllm from source" in msg
    assert f"(derivation {H2[:12]})" in msg and f"from derivation {H1[:12]}" in msg
    assert "'imagebuild build'" in msg and "build-wheels vllm" in msg


def test_check_matches_refuses_a_built_name_locked_from_wheels(tmp_path: Path) -> None:
    plain = LockedWheel("vllm", "0.1", FILENAME, SHA, "wheels/" + FILENAME)
    with pytest.raises(LockError) as info:
        check_matches(_lock(tmp_path, plain), [], tmp_path / "imagebuild.yaml",
                      built={"vllm": H1})
    assert f"it locks {FILENAME} from wheels/{FILENAME}" in str(info.value)


@pytest.mark.parametrize("built", [None, {}])
def test_check_matches_refuses_an_undeclared_built_entry(tmp_path: Path,
                                                        built: dict[str, str] | None) -> None:
    with pytest.raises(LockError) as info:
        check_matches(_lock(tmp_path, BUILT, LOCAL_W), [WheelDecl(LOCAL)],
                      tmp_path / "imagebuild.yaml", built=built)
    msg = str(info.value)
    assert f"it locks {FILENAME}" in msg and "does not declare" in msg


def test_compute_lock_adds_built_entries_and_refuses_duplicates(tmp_path: Path) -> None:
    (tmp_path / LOCAL).write_bytes(b"local")
    result = compute_lock(tmp_path, [(LOCAL, None)], None, built=[BUILT])
    assert [w.name for w in result.wheels] == ["flashinfer-python", "vllm"]
    assert result.wheels[1] == BUILT
    twice = dataclasses.replace(BUILT, name="flashinfer-python", version="0.6.12",
                                filename=LOCAL)
    with pytest.raises(LockError, match="more than one wheel is declared for flashinfer-python"):
        compute_lock(tmp_path, [(LOCAL, None)], None, built=[twice])


# -- ops: the lock step's built entries, wheel names and steps -------------------------------


def _ops_spec(root: Path, names: tuple[str, ...] = ("vllm",)) -> Spec:
    builds = [_build(name=n) for n in names]
    return _load(root, _doc(builds, image_wheels=list(names)))


def _store_for(spec: Spec, name: str = "vllm", data: bytes = b"wheel bytes") -> WheelRecord:
    d = next(d for d in wheel_plan(spec) if d.name == name)
    store = WheelStore(spec.wheel_store)
    filename = f"{name}-0.1-cp311-cp311-linux_x86_64.whl"
    with store.incoming() as incoming:
        wheel = incoming / filename
        wheel.write_bytes(data)
        return store.put(wheel, dataclasses.replace(
            _record(data, d.input_hash), name=name, filename=filename))


def test_built_wheels_takes_the_record_from_the_store(tmp_path: Path) -> None:
    spec = _ops_spec(tmp_path)
    record = _store_for(spec)
    (d,) = wheel_plan(spec)
    stale = LockedWheel("vllm", "0.0", "vllm-0.0-py3-none-any.whl", "7" * 64, "built/" + H2)
    for previous in (None, _lock(tmp_path, stale)):
        (w,), notes = locked_built_wheels(previous, stored(spec, wheel_plan(spec)))
        assert w == LockedWheel("vllm", "0.1", record.filename, record.sha256,
                                "built/" + d.input_hash)
        assert notes == []


def test_built_wheels_notes_a_rebuild_with_other_bytes(tmp_path: Path) -> None:
    spec = _ops_spec(tmp_path)
    record = _store_for(spec)
    (d,) = wheel_plan(spec)
    before = LockedWheel("vllm", "0.1", record.filename, "7" * 64, "built/" + d.input_hash)
    (w,), notes = locked_built_wheels(_lock(tmp_path, before), stored(spec, wheel_plan(spec)))
    assert w.sha256 == record.sha256
    assert len(notes) == 1 and "not reproducible" in notes[0] and "777777777777" in notes[0]
    # and the step is not locked until the lock step records the new bytes
    spec.lock_path.write_text(format_lock([before], "imagebuild.yaml"))
    (step,) = wheelops.wheel_steps(spec, ["vllm"])
    assert step.action == "reuse" and not step.locked


def test_built_wheels_keeps_the_previous_entry_of_the_same_derivation(tmp_path: Path) -> None:
    spec = _ops_spec(tmp_path)
    (d,) = wheel_plan(spec)
    prev = LockedWheel("vllm", "0.1", FILENAME, SHA, "built/" + d.input_hash)
    assert WheelStore(spec.wheel_store).lookup(d.input_hash) is None
    assert locked_built_wheels(_lock(tmp_path, prev, LOCAL_W),
                               stored(spec, wheel_plan(spec))) == ([prev], [])


def test_built_wheels_refuses_every_unbuilt_wheel(tmp_path: Path) -> None:
    spec = _ops_spec(tmp_path, ("vllm", "flashinfer", "deep-gemm"))
    _store_for(spec, "flashinfer")
    plan = {d.name: d for d in wheel_plan(spec)}
    other = LockedWheel("vllm", "0.1", FILENAME, SHA, "built/" + H2)  # another derivation
    with pytest.raises(LockError) as info:
        locked_built_wheels(_lock(tmp_path, other), stored(spec, wheel_plan(spec)))
    msg = str(info.value)
    assert info.value.exit_code == 2
    assert f"vllm (derivation {plan['vllm'].hash12})" in msg
    assert f"deep-gemm (derivation {plan['deep-gemm'].hash12})" in msg
    assert "flashinfer (" not in msg
    assert "build-wheels vllm deep-gemm" in (info.value.hint or "")


def test_wheel_names_checks_and_canonicalizes(tmp_path: Path) -> None:
    spec = _ops_spec(tmp_path, ("vllm", "flashinfer"))
    assert wheelops.wheel_names(spec, []) == ["vllm", "flashinfer"]
    assert wheelops.wheel_names(spec, ["FlashInfer"]) == ["flashinfer"]
    with pytest.raises(SpecError) as info:
        wheelops.wheel_names(spec, ["flashinfr"])
    assert "'flashinfr' is not a wheel built from source" in str(info.value)
    assert "did you mean 'flashinfer'" in str(info.value)
    assert info.value.exit_code == 2


def test_wheel_steps_say_reuse_or_build_and_locked(tmp_path: Path) -> None:
    spec = _ops_spec(tmp_path, ("vllm", "flashinfer"))
    _store_for(spec, "vllm")
    plan = {d.name: d for d in wheel_plan(spec)}
    steps = {s.derivation.name: s for s in wheelops.wheel_steps(spec, list(spec.built))}
    assert steps["vllm"].action == "reuse" and steps["flashinfer"].action == "build"
    assert not steps["vllm"].locked  # no wheels.lock yet
    stored = steps["vllm"].record
    assert stored is not None
    locked = LockedWheel("vllm", "0.1", "vllm-0.1-cp311-cp311-linux_x86_64.whl",
                         stored.sha256, "built/" + plan["vllm"].input_hash)
    spec.lock_path.write_text(format_lock([locked], "imagebuild.yaml"))
    steps = {s.derivation.name: s for s in wheelops.wheel_steps(spec, list(spec.built))}
    assert steps["vllm"].locked and not steps["flashinfer"].locked


def test_load_refuses_a_stale_built_entry(tmp_path: Path) -> None:
    spec = _ops_spec(tmp_path)
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / LOCAL).write_bytes(b"local")
    stale = LockedWheel("vllm", "0.1", FILENAME, SHA, "built/" + H2)
    spec.lock_path.write_text(format_lock([stale, LOCAL_W], "imagebuild.yaml"))
    with pytest.raises(LockError) as info:
        context.load(str(spec.path))
    (d,) = wheel_plan(spec)
    msg = str(info.value)
    assert "out of date" in msg and f"derivation {d.hash12}" in msg
    assert f"from derivation {H2[:12]}" in msg


def test_mirror_path_is_per_url(tmp_path: Path) -> None:
    spec = _load(tmp_path, _doc())
    a = wheelbuild.mirror_path(spec, "https://example.com/a.git")
    assert a == wheelbuild.mirror_path(spec, "https://example.com/a.git")
    assert a.parent == spec.state_dir / "git" and a.name.endswith(".git")
    assert a != wheelbuild.mirror_path(spec, "https://example.com/b.git")


# -- wheelbuild: the source tar --------------------------------------------------------------

EPOCH = 1_700_000_000


def _tree(root: Path) -> Path:
    tree = root / "src"
    (tree / "pkg" / "sub").mkdir(parents=True)
    (tree / ".git").mkdir()
    (tree / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tree / "setup.py").write_text("print('setup')\n")
    (tree / "build.sh").write_text("#!/bin/sh\n")
    (tree / "build.sh").chmod(0o750)
    (tree / "pkg" / "__init__.py").write_text("")
    (tree / "pkg" / "sub" / "data.bin").write_bytes(bytes(range(256)))
    (tree / "link.py").symlink_to("setup.py")
    (tree / "outside").symlink_to("/etc/passwd")
    (tree / "dangling").symlink_to("nowhere")
    (tree / "pkglink").symlink_to("pkg")
    (tree / "empty").mkdir()
    return tree


def test_source_tar_is_deterministic(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    first, second = tmp_path / "1.tar", tmp_path / "2.tar"
    size = wheelbuild.write_source_tar(tree, first, EPOCH)
    assert size == first.stat().st_size
    for p in (tree / "setup.py", tree / "pkg", tree / "pkg" / "sub" / "data.bin"):
        os.utime(p, (123456, 123456))  # the tree's own mtimes do not leak
    wheelbuild.write_source_tar(tree, second, EPOCH)
    assert first.read_bytes() == second.read_bytes()
    third = tmp_path / "3.tar"
    wheelbuild.write_source_tar(tree, third, EPOCH + 1)
    assert third.read_bytes() != first.read_bytes()


def test_source_tar_layout(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    dest = tmp_path / "source.tar"
    wheelbuild.write_source_tar(tree, dest, EPOCH)
    src = BUILD_SRC.lstrip("/")
    with tarfile.open(dest) as tf:
        members = {m.name: m for m in tf.getmembers()}
        for m in members.values():
            assert m.mtime == EPOCH, m.name
            assert (m.uid, m.gid, m.uname, m.gname) == (0, 0, "root", "root"), m.name
            assert m.name in ("imagebuild", src) or m.name.startswith(
                (f"{src}/", "imagebuild/out")), m.name
        out = members[BUILD_OUT.lstrip("/")]
        assert out.isdir() and out.mode == 0o777
        assert members["imagebuild"].isdir()
        assert members[src].isdir() and members[src].mode == 0o755
        setup = members[f"{src}/setup.py"]
        assert setup.isfile() and setup.mode == 0o644
        f = tf.extractfile(setup)
        assert f is not None and f.read() == b"print('setup')\n"
        assert members[f"{src}/build.sh"].mode == 0o755  # executable bit kept
        assert members[f"{src}/.git/HEAD"].isfile()  # with its .git
        assert members[f"{src}/pkg"].isdir() and members[f"{src}/empty"].isdir()
        data = tf.extractfile(members[f"{src}/pkg/sub/data.bin"])
        assert data is not None and data.read() == bytes(range(256))
        for name, target in (("link.py", "setup.py"), ("outside", "/etc/passwd"),
                             ("dangling", "nowhere"), ("pkglink", "pkg")):
            m = members[f"{src}/{name}"]
            assert m.issym() and m.linkname == target, name
        assert not any(n.startswith(f"{src}/pkglink/") for n in members)  # not followed
        names = [m.name for m in tf.getmembers()]
        assert len(names) == len(set(names))
        dirs = [n for n in names if members[n].isdir() and n.startswith(f"{src}/")]
        assert dirs == [f"{src}/.git", f"{src}/empty", f"{src}/pkg", f"{src}/pkg/sub"]


# -- wheelbuild: the one wheel a build leaves -------------------------------------------------


def _output_tar(path: Path, members: list[tuple[str, bytes | None, str | None]]) -> Path:
    """A tar like the engine's copy of BUILD_OUT: (name, bytes of a file or None, target
    of a symlink or None)."""
    with tarfile.open(path, "w") as tf:
        dir_info = tarfile.TarInfo("out")
        dir_info.type = tarfile.DIRTYPE
        tf.addfile(dir_info)
        for name, data, target in members:
            ti = tarfile.TarInfo(name)
            if target is not None:
                ti.type, ti.linkname = tarfile.SYMTYPE, target
                tf.addfile(ti)
            elif data is None:
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return path


@pytest.fixture
def log(tmp_path: Path) -> Any:
    log = wheelbuild._Log(tmp_path / "x.log", "vllm")
    yield log
    log.file.close()


def test_extract_wheel_returns_the_one_wheel_and_its_sha256(tmp_path: Path, log: Any) -> None:
    data = b"PK wheel bytes" * 1000
    tar = _output_tar(tmp_path / "output.tar", [(f"out/{FILENAME}", data, None),
                                                ("out/build.log", b"log", None)])
    dest = tmp_path / "dest"
    dest.mkdir()
    path, sha = wheelbuild._extract_wheel(tar, dest, log)
    assert path == dest / FILENAME
    assert path.read_bytes() == data
    assert sha == hashlib.sha256(data).hexdigest()
    assert sorted(p.name for p in dest.iterdir()) == [FILENAME]


@pytest.mark.parametrize("members,says", [
    ([("out/build.log", b"log", None)], "no .whl file"),
    ([], "no .whl file"),
    ([(f"out/{FILENAME}", b"a", None), ("out/vllm-0.1-py3-none-any.whl", b"b", None)],
     f"out/{FILENAME}, out/vllm-0.1-py3-none-any.whl"),
    ([(f"out/{FILENAME}", None, "/etc/passwd")], "is not a wheel file"),
    ([(f"out/{FILENAME}", None, None)], "is not a wheel file"),  # a directory
])
def test_extract_wheel_refuses(tmp_path: Path, log: Any,
                               members: list[tuple[str, bytes | None, str | None]],
                               says: str) -> None:
    tar = _output_tar(tmp_path / "output.tar", members)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(WheelBuildFailed) as info:
        wheelbuild._extract_wheel(tar, dest, log)
    assert info.value.exit_code == 5
    assert says in str(info.value) and str(tmp_path / "x.log") in str(info.value)
    assert list(dest.iterdir()) == []


def test_extract_wheel_refuses_an_output_that_is_not_a_tar(tmp_path: Path, log: Any) -> None:
    bad = tmp_path / "output.tar"
    bad.write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(WheelBuildFailed, match="could not be read") as info:
        wheelbuild._extract_wheel(bad, tmp_path, log)
    assert info.value.exit_code == 5
