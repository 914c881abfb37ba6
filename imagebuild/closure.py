"""The closure locks: every Python distribution each image installs, pinned by version and
sha256 for the images' target platform, one PEP 751 file per image
(``locks/pylock.<image>.toml``).

Pure: reading, checking, writing and comparing locks, the metadata conflict check, and
the hash-pinned requirement files the install steps read. Resolving is uv's job (see
``resolve.py``); nothing here talks to an index or spawns a process.

An image's lock is its whole Python closure: what its parent has plus what it adds, as
one resolution under the overrides in force for it (its ancestors' and its own). Its
install steps install the difference to its parent's lock, exactly, with ``--no-deps``
and every file hash-checked: nothing is resolved at build time.

A local wheel (served to the build from the spec's wheels directory) is recorded with
``path = "wheels/<file>"``: relative to that directory, not to the lock file, so a lock
reads the same wherever the stack is checked out. An index wheel keeps the URL the
resolver found it at.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from packaging.markers import InvalidMarker
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from .errors import LockConflict, LockError, UnresolvedHashError
from .lock import (
    INDEX_URL,
    LOCAL_PREFIX,
    SHA256,
    WHEEL_FILE,
    Lock,
    check_keys,
    lock_bytes,
    parse_wheel,
)
from .lock import toml_string as _q

PYLOCK_VERSION = "1.0"
CREATED_BY = "imagebuild"
_KEYS = {"lock-version", "created-by", "requires-python", "environments", "packages", "tool"}
_PACKAGE_KEYS = {"name", "version", "wheels"}
_WHEEL_KEYS = {"name", "url", "path", "hashes"}
_TOOL_KEYS = {"image", "parent", "python", "platform", "requirements", "overrides", "covered",
              "unresolved", "content-hash"}
_SEAL = re.compile(r'^content-hash = "sha256:([0-9a-f]{64})"\n\Z', re.M)
_UNRESOLVED_TEXT = re.compile(r"^[^\x00-\x1f\x7f]{1,500}\Z")
_REGENERATE = "regenerate it with 'imagebuild lock' (never edit a lock by hand)"


@dataclass(frozen=True)
class LockedDist:
    """One distribution of a closure: one wheel, pinned by sha256."""

    name: str  # canonical
    version: str
    filename: str
    sha256: str
    url: str | None  # where the resolver found it on an index; None: a local wheel

    @property
    def is_local(self) -> bool:
        return self.url is None


@dataclass(frozen=True)
class ClosureLock:
    path: Path
    image: str
    parent: str | None
    python: str
    platform: str
    requirements: tuple[str, ...]  # what the resolution started from (root first)
    overrides: tuple[str, ...]  # the overrides in force, as requirements
    packages: tuple[LockedDist, ...]  # sorted by name
    unresolved: str | None = None  # why this closure could not be resolved where locked
    # each requirement an override silenced, with the override and who states it:
    # "vllm requires torch==2.10.0 (override torch==2.11.0+cu130)"
    covered: tuple[str, ...] = ()

    def by_name(self) -> dict[str, LockedDist]:
        return {p.name: p for p in self.packages}

    def require_resolved(self) -> None:
        if self.unresolved is not None:
            raise UnresolvedHashError(
                f"{self.path}: the closure of {self.image} is unresolved: {self.unresolved}",
                hint="run 'imagebuild lock' on a machine that has the local wheels and reaches "
                     "every index of the spec, commit locks/, and try again")


@dataclass(frozen=True)
class Locks(Lock):
    """wheels.lock and the closure lock of every image, by image name: what plans, builds
    and checks read (see ``ops.load``)."""

    closures: Mapping[str, ClosureLock] = field(default_factory=dict)


def closures_of(lock: Lock) -> Mapping[str, ClosureLock]:
    """The closure locks a lock carries (none for wheels.lock alone)."""
    return lock.closures if isinstance(lock, Locks) else {}


def markers_env(python: str, platform: str) -> dict[str, str]:
    """The PEP 508 marker environment of a Linux target (``platform`` as uv names it,
    e.g. ``aarch64-manylinux_2_28``)."""
    machine = platform.split("-", 1)[0]
    return {"python_version": python, "python_full_version": f"{python}.0",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
            "platform_machine": machine, "platform_release": "", "platform_version": "",
            "implementation_version": f"{python}.0", "extra": ""}


def environment_marker(python: str, platform: str) -> str:
    machine = platform.split("-", 1)[0]
    return (f"sys_platform == 'linux' and platform_machine == '{machine}' "
            f"and python_version == '{python}'")


# -- reading -------------------------------------------------------------------------------


def read_closure(path: Path, image: str) -> ClosureLock:
    """Read and check one image's lock: every key, every value; nothing unchecked reaches a
    requirement file, a Dockerfile or an input hash."""
    raw = lock_bytes(path, f"the closure lock of {image} is missing",
                     "run 'imagebuild lock' and commit locks/",
                     "the spec's 'locks:' must name a directory")
    return parse_closure(raw, path, image)


def parse_closure(raw: bytes, path: Path, image: str) -> ClosureLock:
    """A lock's bytes (from ``path``, or as committed there), every field checked."""
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise LockError(f"{path}: malformed lock: {exc}", hint=_REGENERATE) from None
    seal = _SEAL.search(text)
    if seal is None or _seal(text[:seal.start()]) != seal.group(1):
        raise LockError(f"{path}: the lock was changed by hand (its content-hash does not "
                        f"match its content)",
                        hint="a lock is what 'imagebuild lock' resolved, nothing else: "
                             "regenerate it (git checkout the file, or run 'imagebuild lock')")
    _keys(path, "the lock", data, _KEYS, {"lock-version", "packages", "tool"})
    if data["lock-version"] != PYLOCK_VERSION:
        raise LockError(f"{path}: lock-version {data['lock-version']!r} is not "
                        f"{PYLOCK_VERSION!r}", hint=_REGENERATE)
    tool = data["tool"].get("imagebuild") if isinstance(data["tool"], dict) else None
    if not isinstance(tool, dict):
        raise LockError(f"{path}: no [tool.imagebuild] table", hint=_REGENERATE)
    _keys(path, "[tool.imagebuild]", tool, _TOOL_KEYS,
          {"image", "python", "platform", "requirements", "overrides"})
    if tool["image"] != image:
        raise LockError(f"{path}: locks image {tool['image']!r}, not {image!r}",
                        hint=_REGENERATE)
    parent = tool.get("parent")
    strings = [tool["python"], tool["platform"], *_str_list(path, "requirements", tool),
               *_str_list(path, "overrides", tool)]
    if (parent is not None and not isinstance(parent, str)) or not all(
            isinstance(s, str) for s in strings):
        raise LockError(f"{path}: [tool.imagebuild] values must be strings", hint=_REGENERATE)
    covered = tool.get("covered", [])
    if not isinstance(covered, list) or not all(
            isinstance(c, str) and _UNRESOLVED_TEXT.match(c) for c in covered):
        raise LockError(f"{path}: 'covered' must be lines of text", hint=_REGENERATE)
    for req in (*tool["requirements"], *tool["overrides"]):
        try:
            Requirement(req)
        except InvalidRequirement:
            raise LockError(f"{path}: {req!r} is not a requirement", hint=_REGENERATE) from None
    unresolved = tool.get("unresolved")
    if unresolved is not None and (not isinstance(unresolved, str)
                                   or not _UNRESOLVED_TEXT.match(unresolved)):
        raise LockError(f"{path}: 'unresolved' must be one line of text", hint=_REGENERATE)
    entries = data["packages"]
    if not isinstance(entries, list):
        raise LockError(f"{path}: 'packages' must be an array of tables", hint=_REGENERATE)
    packages = [_package(path, i, e) for i, e in enumerate(entries, 1)]
    names = [p.name for p in packages]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise LockError(f"{path}: {', '.join(dup)} locked more than once", hint=_REGENERATE)
    if unresolved is not None and packages:
        raise LockError(f"{path}: an unresolved lock lists packages", hint=_REGENERATE)
    return ClosureLock(path=path, image=image, parent=parent, python=tool["python"],
                       platform=tool["platform"], requirements=tuple(tool["requirements"]),
                       overrides=tuple(tool["overrides"]),
                       packages=tuple(sorted(packages, key=lambda p: p.name)),
                       unresolved=unresolved, covered=tuple(covered))


def _keys(path: Path, where: str, table: object, allowed: set[str], required: set[str]
          ) -> None:
    check_keys(f"{path}: {where}", table, allowed, required, _REGENERATE)


def _str_list(path: Path, key: str, table: dict[str, object]) -> list[object]:
    value = table[key]
    if not isinstance(value, list):
        raise LockError(f"{path}: [tool.imagebuild] {key} must be a list", hint=_REGENERATE)
    return value


def _package(path: Path, i: int, entry: object) -> LockedDist:
    where = f"package {i}"
    _keys(path, where, entry, _PACKAGE_KEYS, _PACKAGE_KEYS)
    assert isinstance(entry, dict)
    name, version, wheels = entry["name"], entry["version"], entry["wheels"]
    if not isinstance(name, str) or not isinstance(version, str):
        raise LockError(f"{path}: {where}: name and version must be strings", hint=_REGENERATE)
    if not isinstance(wheels, list) or len(wheels) != 1:
        raise LockError(f"{path}: {where} ({name}): exactly one wheel per package (the "
                        f"target's)", hint=_REGENERATE)
    w = wheels[0]
    _keys(path, f"{where} ({name}) wheel", w, _WHEEL_KEYS, {"name", "hashes"})
    filename = w["name"]
    if not isinstance(filename, str) or not WHEEL_FILE.match(filename):
        raise LockError(f"{path}: {where} ({name}): {filename!r} is not a wheel filename",
                        hint=_REGENERATE)
    parsed = parse_wheel(filename)
    if canonicalize_name(name) != name or parsed.name != name or parsed.version != version:
        raise LockError(f"{path}: {where} ({name} {version}): does not match its wheel "
                        f"{filename}", hint=_REGENERATE)
    hashes = w["hashes"]
    if not isinstance(hashes, dict) or set(hashes) != {"sha256"} or not isinstance(
            hashes["sha256"], str) or not SHA256.match(hashes["sha256"]):
        raise LockError(f"{path}: {where} ({filename}): hashes must be {{ sha256 = <64 hex> }}",
                        hint=_REGENERATE)
    url = w.get("url")
    local = w.get("path")
    if (url is None) == (local is None):
        raise LockError(f"{path}: {where} ({filename}): give exactly one of url or path",
                        hint=_REGENERATE)
    if local is not None and local != LOCAL_PREFIX + filename:
        raise LockError(f"{path}: {where} ({filename}): path must be {LOCAL_PREFIX}{filename}",
                        hint=_REGENERATE)
    if url is not None and (not isinstance(url, str) or not INDEX_URL.match(url)
                            or not url.endswith("/" + filename)):
        raise LockError(f"{path}: {where} ({filename}): url must be an http(s) URL of "
                        f"{filename}", hint=_REGENERATE)
    return LockedDist(name=name, version=version, filename=filename,
                      sha256=hashes["sha256"], url=url)


# -- writing -------------------------------------------------------------------------------


def _array(values: Iterable[str]) -> str:
    return "[" + ", ".join(_q(v) for v in values) + "]"


def format_closure(lock: ClosureLock, spec_name: str) -> str:
    """The lock's text: deterministic (packages by name, fixed layout), PEP 751."""
    lines = [
        f"# pylock.{lock.image}.toml: every Python distribution {lock.image} installs, for "
        f"Linux {lock.platform.split('-', 1)[0]}, CPython {lock.python}.",
        f"# Written by 'imagebuild lock' from {spec_name} (resolved by uv); do not edit by "
        f"hand.",
        "# A local wheel's path is relative to the spec's wheels directory.",
        f"lock-version = {_q(PYLOCK_VERSION)}",
        f"created-by = {_q(CREATED_BY)}",
        f"requires-python = {_q(f'=={lock.python}.*')}",
        f"environments = {_array([environment_marker(lock.python, lock.platform)])}",
    ]
    if not lock.packages:
        lines.append("packages = []")
    for p in sorted(lock.packages, key=lambda p: p.name):
        where = f"url = {_q(p.url)}" if p.url else f"path = {_q(LOCAL_PREFIX + p.filename)}"
        lines += ["", "[[packages]]", f"name = {_q(p.name)}", f"version = {_q(p.version)}",
                  f"wheels = [{{ name = {_q(p.filename)}, {where}, "
                  f"hashes = {{ sha256 = {_q(p.sha256)} }} }}]"]
    lines += ["", "[tool.imagebuild]", f"image = {_q(lock.image)}"]
    if lock.parent is not None:
        lines.append(f"parent = {_q(lock.parent)}")
    lines += [f"python = {_q(lock.python)}", f"platform = {_q(lock.platform)}",
              f"requirements = {_array(lock.requirements)}",
              f"overrides = {_array(lock.overrides)}"]
    if lock.covered:
        lines.append(f"covered = {_array(lock.covered)}")
    if lock.unresolved is not None:
        lines.append(f"unresolved = {_q(lock.unresolved)}")
    body = "\n".join(lines) + "\n"
    # a seal over everything above it: a hand edit (a changed hash, a version) is refused
    return body + f'content-hash = "sha256:{_seal(body)}"\n'


def _seal(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()


# -- what a build installs -------------------------------------------------------------------


def install_set(lock: ClosureLock, parent: ClosureLock | None) -> list[LockedDist]:
    """What an image installs: the distributions of its lock that its parent's lock does
    not have at the same version and file. Nothing its parent has is installed again
    (torch included: once per lineage)."""
    lock.require_resolved()
    had = parent.by_name() if parent is not None else {}
    return [p for p in lock.packages if had.get(p.name) != p]


def requirements_text(dists: Iterable[LockedDist], wheels_arg: str, empty: str = "") -> str:
    """The hash-pinned requirement file of an install step: one direct URL per
    distribution (a local wheel under ``${wheels_arg}``, which uv expands to where
    imagebuild serves the wheels), each with its sha256. Installed with ``--no-deps``: the
    resolution happened at lock time. With no distributions, one comment line saying why
    (``empty``), which installs nothing."""
    lines = []
    for p in sorted(dists, key=lambda p: p.name):
        url = p.url if p.url is not None else f"${{{wheels_arg}}}/{p.filename}"
        lines.append(f"{p.name} @ {url} --hash=sha256:{p.sha256}")
    if not lines and empty:
        lines.append(f"# {empty}")
    return "".join(line + "\n" for line in lines)


def changes(before: Mapping[str, LockedDist], after: Mapping[str, LockedDist]) -> list[str]:
    """What moved between two sets of locked distributions (by name), one line each:
    ``name 1.0 -> 1.1``, ``name 1.0 (sha256 abc -> def)``, ``+ name 1.0``, ``- name 1.0``."""
    out = []
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        if a == b:
            continue
        if a is None:
            assert b is not None
            out.append(f"+ {name} {b.version}")
        elif b is None:
            out.append(f"- {name} {a.version}")
        elif a.version != b.version:
            out.append(f"{name} {a.version} -> {b.version}")
        elif a.filename != b.filename:
            out.append(f"{name} {a.version} (other file: {b.filename})")
        else:
            out.append(f"{name} {a.version} (sha256 {a.sha256[:12]} -> {b.sha256[:12]})")
    return out


# -- the metadata conflict check ---------------------------------------------------------


@dataclass(frozen=True)
class Conflict:
    package: str  # the package required
    requirement: str  # as the wheel states it
    stated_by: str  # the wheel that states it
    locked: str  # the version the closure has (or "not in the closure")
    override: str | None = None  # the override in force on the package, which silences it
    covered: bool = False  # that override lists the stating distribution under covers

    @property
    def distribution(self) -> str:
        return parse_wheel(self.stated_by).name

    def record(self) -> str:
        """How a closure lock records a requirement its override covered."""
        return f"{self.distribution} requires {self.requirement} (override {self.override})"


def conflicts(requires: Mapping[str, Iterable[str]], versions: Mapping[str, str],
              overrides: Mapping[str, tuple[str, Collection[str]]], python: str,
              platform: str) -> list[Conflict]:
    """Every ``Requires-Dist`` (``requires``: filename -> its requirement strings) that the
    pinned ``versions`` (canonical name -> version) do not satisfy on the target.
    ``overrides``: package -> (the override's requirement, the distributions it covers);
    a requirement on an overridden package is one the override silences: covered when its
    distribution is listed, else a conflict like any other. Requirements of packages
    outside ``versions`` only count when the package is in it (a missing dependency is
    the resolver's to add)."""
    env = markers_env(python, platform)
    silenced = {canonicalize_name(n): o for n, o in overrides.items()}
    out: list[Conflict] = []
    for filename, reqs in sorted(requires.items()):
        for text in reqs:
            try:
                req = Requirement(text)
            except InvalidRequirement:
                raise LockError(f"{filename}: its metadata states {text!r}, which is not a "
                                f"requirement", hint="rebuild the wheel with valid metadata"
                                ) from None
            try:
                if req.marker is not None and not req.marker.evaluate(env):
                    continue
            except InvalidMarker:
                continue
            name = canonicalize_name(req.name)
            if name not in versions:
                continue
            try:
                ok = req.specifier.contains(Version(versions[name]), prereleases=True)
            except InvalidVersion:
                ok = False
            if not ok:
                override, covers = silenced.get(name, (None, ()))
                out.append(Conflict(package=name, requirement=text, stated_by=filename,
                                    locked=versions[name], override=override,
                                    covered=parse_wheel(filename).name in covers))
    return out


def conflict_error(image: str, found: list[Conflict], spec_name: str) -> LockConflict:
    lines = [f"{image}: the closure conflicts with what its wheels require, and no override "
             f"in {spec_name} covers it:"]
    for c in found:
        lines.append(f"  {c.stated_by} requires {c.requirement!r}; the closure has "
                     f"{c.package} {c.locked}" + (
                         f" (the override {c.override} would silence it; its covers: does "
                         f"not list {c.distribution})" if c.override else ""))
    first = found[0]
    silenced = sorted({c.distribution for c in found if c.override})
    if silenced:
        return LockConflict(
            "\n".join(lines),
            hint=f"a wheel built against another {first.package} fails at import or at "
                 f"its first kernel: pin {', '.join(silenced)} to a release made for "
                 f"{first.package} {first.locked} (a pin or an override of its own), or, "
                 f"if the requirement is simply wrong, list it under the override's "
                 f"covers: [{', '.join(silenced)}]; then run 'imagebuild lock' again")
    return LockConflict(
        "\n".join(lines),
        hint=f"if {first.package} {first.locked} is what the image needs, declare it under "
             f"images.{image}.overrides (or an ancestor's): "
             f"{{requirement: \"{first.package}=={first.locked}\", reason: \"why the "
             f"wheel's pin is wrong\"}}, then run 'imagebuild lock' again")

