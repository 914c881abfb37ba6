"""Wheel derivations: the input hash of every wheel built from source, and what a built
wheel must look like. Pure: no engine, no git, no I/O beyond reading the patch files.

A wheel derivation's input hash is sha256 over a canonical JSON of: a schema version,
the project name, the source commit, each patch's name and sha256 (in order), the
builder image's reference (with its digest when pinned), the build environment, the
build command and whether the submodules are checked out (their commits are the ones the
source commit records, so the commit pins them too). The git URL is not an input: the
commit names the source wherever it is fetched from. Same inputs, same hash; a wheel
with that hash in the wheel store is reused without a build.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from .lock import sha256_file
from .naming import hash12
from .spec import Spec, WheelBuild

WHEEL_SCHEMA = 2  # 2: whether the submodules are part of the source


@dataclass(frozen=True)
class WheelDerivation:
    build: WheelBuild
    patches: tuple[tuple[str, str], ...]  # (file name, sha256), in the order applied
    input_hash: str

    @property
    def name(self) -> str:
        return self.build.name

    @property
    def hash12(self) -> str:
        return hash12(self.input_hash)


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def wheel_derivation(build: WheelBuild) -> WheelDerivation:
    patches = tuple((p.name, sha256_file(p)) for p in build.patches)
    material = {
        "schema": WHEEL_SCHEMA,
        "name": build.name,
        "commit": build.commit,
        "patches": [list(p) for p in patches],
        "builder": build.builder_reference,
        "env": [list(e) for e in build.env],
        "command": list(build.command),
        # the submodules' commits are the superproject commit's gitlinks: pinned by it
        "submodules": build.submodules,
    }
    return WheelDerivation(build, patches, hashlib.sha256(_canonical(material)).hexdigest())


def wheel_plan(spec: Spec, names: Iterable[str] | None = None) -> list[WheelDerivation]:
    """The derivations of the built wheels named (all of them if None), in spec order."""
    wanted = set(spec.built) if names is None else set(names)
    return [wheel_derivation(b) for n, b in spec.built.items() if n in wanted]


def needed_by(spec: Spec, images: list[str]) -> list[str]:
    """The built wheels the closure of ``images`` (all if empty) installs."""
    wanted = {w for n in spec.closure(images or None) for w in spec.images[n].wheels}
    return [n for n in spec.built if n in wanted]


# -- what a built wheel must be --------------------------------------------------------------


_GLIBC_OF = {  # uv's other spellings of a Linux target, as the glibc they mean
    "manylinux2014": (2, 17), "manylinux2010": (2, 12), "manylinux1": (2, 5),
    "unknown-linux-gnu": (2, 28), "linux": (2, 28),  # uv: x86_64-unknown-linux-gnu = 2_28
}


def target_tags(python: str, platform: str) -> set[Tag]:
    """The wheel tags an interpreter of ``python`` on ``platform`` (uv's spelling, e.g.
    ``aarch64-manylinux_2_28``, ``aarch64-manylinux2014`` or
    ``aarch64-unknown-linux-gnu``) installs: CPython and pure-Python tags for every
    manylinux level up to the target's, and the plain ``linux_<arch>`` a wheel built on
    the target itself carries. A platform that is not Linux gets the pure-Python tags."""
    return set(tags_best_first(python, platform))


def pick_wheel(filenames: Iterable[str], name: str, version: str, python: str,
               platform: str) -> str | None:
    """Of an index's files, the wheel of ``name`` ``version`` the target installs: the
    one whose best tag ranks first, as an installer chooses; None if there is none."""
    rank = {t: i for i, t in enumerate(tags_best_first(python, platform))}
    want = Version(version)
    best: tuple[int, str] | None = None
    for filename in filenames:
        try:
            project, found, _build, tags = parse_wheel_filename(filename)
        except (InvalidWheelFilename, InvalidVersion):
            continue
        if project != canonicalize_name(name) or found != want:
            continue
        score = min((rank[t] for t in tags if t in rank), default=None)
        if score is not None and (best is None or score < best[0]):
            best = (score, filename)
    return None if best is None else best[1]


def tags_best_first(python: str, platform: str) -> list[Tag]:
    """``target_tags`` in an installer's order of preference, best first."""
    major, minor = (int(x) for x in python.split("."))
    arch, _, system = platform.partition("-")
    glibc = _GLIBC_OF.get(system)
    level = system[len("manylinux_"):].split("_") if system.startswith("manylinux_") else []
    if glibc is None and len(level) == 2 and all(x.isdigit() for x in level):
        glibc = (int(level[0]), int(level[1]))
    platforms = ["any"]
    if glibc is not None:
        glibc_major, glibc_minor = glibc
        platforms = [f"manylinux_{glibc_major}_{m}_{arch}" for m in range(glibc_minor, 4, -1)]
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
        platforms += [f"{tag}_{arch}" for m, tag in legacy.items()
                      if glibc_major == 2 and glibc_minor >= m]
        platforms.append(f"linux_{arch}")
    return [*cpython_tags((major, minor), platforms=platforms),
            *compatible_tags((major, minor), platforms=platforms)]


def wheel_problem(filename: str, name: str, python: str, platform: str,
                  metadata: tuple[str, str] | None) -> str | None:
    """Why a built wheel cannot be stored (None: it can): its filename's project must be
    the declared one, its metadata's name and version must match the filename, and one
    of its tags must be installable on the target. ``metadata`` is (Name, Version) as
    its METADATA says, None when it has none."""
    try:
        project, version, _build, tags = parse_wheel_filename(filename)
    except ValueError as exc:
        return f"the build made {filename!r}, which is not a wheel filename ({exc})"
    if project != name:
        return f"the build made a wheel of {project}, not of {name}"
    if metadata is None:
        return f"{filename} has no .dist-info/METADATA"
    meta_name, meta_version = metadata
    if canonicalize_name(meta_name) != name:
        return f"{filename}: its METADATA names {meta_name!r}, not {name}"
    try:
        if Version(meta_version) != version:
            return f"{filename}: its METADATA says version {meta_version}, its name {version}"
    except InvalidVersion:
        return f"{filename}: its METADATA version {meta_version!r} is not a version"
    if not tags & target_tags(python, platform):
        return (f"{filename} is tagged {', '.join(sorted(str(t) for t in tags))}: none of them "
                f"installs on CPython {python} on {platform} (the spec's target)")
    return None
