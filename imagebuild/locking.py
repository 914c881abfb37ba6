"""``imagebuild lock``, the closure part: resolve every image's Python closure with uv,
check it against its wheels' metadata, and produce its PEP 751 lock.

For each image, parents first: the requirements are what its lineage declares (the
local wheels and torch at their locked versions, each image's ``requires``), the
overrides those in force for it (``Spec.overrides_for``). Before uv runs, the declared
wheels' ``Requires-Dist`` are compared with the declared pins, so a conflict the spec does
not settle with an override is refused with its cause, not with a resolver's puzzle;
after uv runs, every locked distribution's ``Requires-Dist`` is compared with the closure.
Nothing is written here: the caller writes every file or none.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import web
from .closure import ClosureLock, LockedDist, conflict_error, conflicts
from .errors import LockError, SpecError
from .lock import LockedWheel, index_files, parse_wheel
from .resolve import Getter, dist_requires, requires_dist, resolve, wheel_metadata
from .spec import Spec
from .wheelstore import wheel_path

PYPI = "https://pypi.org/simple"


@dataclass(frozen=True)
class ImageInputs:
    """What one image's closure is resolved from."""

    requirements: tuple[str, ...]
    overrides: tuple[str, ...]
    # package -> (its override's requirement, the distributions the override covers)
    overridden: Mapping[str, tuple[str, tuple[str, ...]]]
    indexes: tuple[str, ...]  # the first is the primary
    local: tuple[LockedWheel, ...]  # the declared local wheels of the lineage
    pinned: tuple[LockedWheel, ...]  # every declared wheel of the lineage (local and index)
    # package -> the index other than the primary that serves it (the declared index
    # wheels', and what their wheels.index entry lists under packages:); every other
    # package comes from the primary
    assigned: Mapping[str, str] = field(default_factory=dict)


def image_inputs(spec: Spec, wheels: Mapping[str, LockedWheel], name: str) -> ImageInputs:
    """The resolution inputs of ``name``: pure, from the spec and the wheels' lock."""
    requirements: list[str] = []
    pinned: dict[str, LockedWheel] = {}
    pip_index: str | None = None
    for n in spec.lineage(name):
        img = spec.images[n]
        for wname in (*img.wheels, *((img.torch,) if img.torch else ())):
            w = wheels[wname]
            pinned[w.name] = w
            req = f"{w.name}=={w.version}"
            if req not in requirements:
                requirements.append(req)
        for req in img.requires:
            if req not in requirements:
                requirements.append(req)
        pip_index = img.params.pip_index or pip_index
    indexes = [pip_index or PYPI]
    for w in pinned.values():
        if w.index is not None and w.index not in indexes:
            indexes.append(w.index)
    overrides = spec.overrides_for(name)
    assigned: dict[str, str] = {}
    for decl in spec.wheels:
        if decl.index is None or decl.index == indexes[0]:
            continue
        for package in (parse_wheel(decl.filename).name, *decl.serves):
            if assigned.setdefault(package, decl.index) != decl.index:
                raise SpecError(f"{spec.path.name}: {package} is assigned to two indexes, "
                                f"{assigned[package]} and {decl.index}",
                                hint="an index serves a package, or another does: not both")
    return ImageInputs(
        requirements=tuple(requirements),
        overrides=tuple(o.requirement for _, o in sorted(overrides.items())),
        overridden={n: (o.requirement, o.covers) for n, o in overrides.items()},
        indexes=tuple(indexes),
        local=tuple(w for w in pinned.values() if w.is_local),
        pinned=tuple(pinned.values()),
        assigned=assigned,
    )


def unresolved_reason(spec: Spec, inputs: ImageInputs) -> str | None:
    """Why this machine cannot lock the closure (a local wheel absent, a declared wheel's
    hash unknown), or None."""
    for w in inputs.pinned:
        if w.sha256 is None:
            return f"the sha256 of {w.filename} is unresolved in {spec.lock_path.name}"
        if w.is_local and not wheel_path(spec, w).is_file():
            return (f"{w.filename} is not in the wheel store (build it: imagebuild "
                    f"build-wheels {w.name})" if w.is_built
                    else f"{w.filename} is not fetched from {w.url} yet" if w.url
                    else f"{w.filename} is not in the wheels directory")
    return None


IndexListings = dict[tuple[str, str], set[str]]  # (index, project) -> the sha256s listed


def lock_image(spec: Spec, wheels: Mapping[str, LockedWheel], name: str,
               parent: ClosureLock | None, previous: ClosureLock | None,
               upgrade: bool | list[str], get: Getter | None = None,
               wheel_dir: Path | None = None, listed: IndexListings | None = None
               ) -> ClosureLock:
    """One image's closure lock (unresolved, with the reason, where it cannot be made).
    ``listed``: the index pages already read for the source check, shared by the images
    of one lock step (their closures are mostly the same packages).
    ``wheel_dir``: where the local and built wheels are seen together (``wheel_view``);
    the spec's wheels directory by default."""
    links = wheel_dir or spec.wheels_dir
    inputs = image_inputs(spec, wheels, name)
    img = spec.images[name]
    spec_name = spec.path.name

    def made(packages: tuple[LockedDist, ...], unresolved: str | None = None,
             covered: tuple[str, ...] = ()) -> ClosureLock:
        return ClosureLock(path=spec.closure_lock_path(name), image=name, parent=img.parent,
                           python=spec.target.python, platform=spec.target.platform,
                           requirements=inputs.requirements, overrides=inputs.overrides,
                           packages=packages, unresolved=unresolved, covered=covered)

    if parent is not None and parent.unresolved is not None:
        return made((), f"its parent {parent.image} is unresolved")
    why = unresolved_reason(spec, inputs)
    if why is not None:
        return made((), why)
    # the declared pins against what the declared local wheels require
    stated = {w.filename: requires_dist(wheel_metadata(wheel_path(spec, w)))[2]
              for w in inputs.local}
    found = conflicts(stated, {w.name: w.version for w in inputs.pinned}, inputs.overridden,
                      spec.target.python, spec.target.platform)
    if any(not c.covered for c in found):
        raise conflict_error(name, [c for c in found if not c.covered], spec_name)
    resolution = resolve(image=name, requirements=list(inputs.requirements),
                         overrides=list(inputs.overrides), python=spec.target.python,
                         platform=spec.target.platform, wheels_dir=links,
                         indexes=list(inputs.indexes), previous=previous, upgrade=upgrade)
    by_name = {p.name: p for p in resolution.packages}
    for w in inputs.pinned:
        got = by_name.get(w.name)
        if got is None or got.filename != w.filename or got.sha256 != w.sha256:
            have = f"{got.filename} ({got.sha256[:12]})" if got else "nothing"
            raise LockError(
                f"{name}: the spec declares {w.filename} ({(w.sha256 or '')[:12]}), but the "
                f"resolution took {have}",
                hint=(f"the index serves other bytes under that name now: if that is "
                      f"intended, run 'imagebuild lock --upgrade {w.name}'"
                      if got is not None and got.filename == w.filename else
                      "an override or an index moved a declared wheel: declare the file the "
                      "image should install under wheels, or fix the override"))
    declared = {w.filename for w in inputs.pinned}
    stray = sorted(p.filename for p in resolution.packages
                   if p.is_local and p.filename not in declared)
    if stray:
        raise LockError(
            f"{name}: the resolution took {', '.join(stray)} from the wheels directory, "
            f"which the spec does not declare for this image",
            hint="declare the wheel under wheels.local and in the image's wheels (so it is "
                 "hash-locked), or remove the file from the wheels directory")
    check_sources(name, inputs, resolution.packages, {} if listed is None else listed)
    # every locked distribution's requirements against the closure
    stated = dist_requires(resolution.packages, links, get)
    found = conflicts(stated, {p.name: p.version for p in resolution.packages},
                      inputs.overridden, spec.target.python, spec.target.platform)
    if any(not c.covered for c in found):
        raise conflict_error(name, [c for c in found if not c.covered], spec_name)
    return made(resolution.packages, covered=tuple(sorted({c.record() for c in found})))


def index_page(url: str) -> str:
    """A simple index's page of one project ("" when the index has no such project)."""
    body = web.get_bytes(url)
    return "" if body is None else body.decode("utf-8", errors="replace")


def check_sources(image: str, inputs: ImageInputs, packages: Iterable[LockedDist],
                  pages: IndexListings) -> None:
    """Each index serves only the packages assigned to it: with more than one index, the
    file of every index distribution must be one (by sha256) that its index lists (the
    primary for any package not assigned elsewhere). uv resolves across all of them
    (it has to: torch+cu130 is only on its own index, and its pip interface drops an
    index assignment when an override replaces the requirement), so this is where a
    package served by the wrong index (numpy from the torch index, a name squatted on
    an extra index) is refused, by name, before anything is written. ``pages``: the
    listings read so far (read once per index and project, whatever the image)."""
    if len(inputs.indexes) < 2:
        return
    wrong: list[str] = []
    for p in packages:
        if p.url is None:
            continue  # a local or built wheel, served by imagebuild
        index = inputs.assigned.get(p.name, inputs.indexes[0])
        key = (index, p.name)
        if key not in pages:
            try:
                listed = index_files(index, p.name, index_page)
            except Exception as exc:  # requests' errors: the network, the server
                raise LockError(f"{image}: cannot read {index}/{p.name}/ to check where "
                                f"{p.name} comes from: {exc.__class__.__name__}",
                                hint="run 'imagebuild lock' where every index of the spec "
                                     "answers") from None
            pages[key] = {sha for sha in listed.values() if sha}
        if p.sha256 not in pages[key]:
            wrong.append(f"{p.name} {p.version} ({p.filename}) is not a file {index} lists: "
                         f"another index served it")
    if wrong:
        raise LockError(
            f"{image}: each index serves only the packages assigned to it:\n  "
            + "\n  ".join(wrong),
            hint="pin the package to a version its own index has (requires: in the spec), "
                 "or, if that other index should serve it, list it under that index's "
                 "packages: in wheels.index; nothing was written")


def stale_reason(spec: Spec, wheels: Mapping[str, LockedWheel], lock: ClosureLock
                 ) -> str | None:
    """Why a committed closure lock no longer matches the spec and the wheels' lock."""
    inputs = image_inputs(spec, wheels, lock.image)
    if (lock.python, lock.platform) != (spec.target.python, spec.target.platform):
        return (f"it is for CPython {lock.python} on {lock.platform}, the spec's target is "
                f"CPython {spec.target.python} on {spec.target.platform}")
    if lock.parent != spec.images[lock.image].parent:
        return f"its parent is {lock.parent}, the spec's is {spec.images[lock.image].parent}"
    if lock.requirements != inputs.requirements:
        return "the image's requirements changed in the spec or in the wheels' lock"
    if lock.overrides != inputs.overrides:
        return "the overrides in force for the image changed in the spec"
    if lock.unresolved is None:
        declared = {w.filename for w in inputs.pinned}
        stray = [p.filename for p in lock.packages if p.is_local and p.filename not in declared]
        if stray:
            return f"it has local wheels the spec does not declare: {', '.join(stray)}"
        have = lock.by_name()
        for w in inputs.pinned:
            if w.sha256 is None:
                continue  # refused as unresolved when anything needs it
            got = have.get(w.name)
            if got is None or got.filename != w.filename or got.sha256 != w.sha256:
                return f"it does not lock {w.filename} as the wheels' lock does"
    return None


def read_previous(path: Path, name: str) -> ClosureLock | None:
    from .closure import read_closure

    if not path.exists():
        return None
    try:
        return read_closure(path, name)
    except LockError:
        return None
