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

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from . import web
from .closure import ClosureLock, LockedDist, Locks, conflict_error, conflicts, read_closure
from .errors import LockError, SpecError
from .lock import IndexFile, Lock, LockedWheel, index_files, read_lock
from .resolve import Getter, dist_requires, requires_dist, resolve, wheel_metadata
from .spec import Spec, WheelDecl
from .wheelplan import WheelDerivation, pick_wheel
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
        for package in (decl.name, *decl.serves):
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


IndexListings = dict[tuple[str, str], dict[str, IndexFile]]  # (index, project) -> its files


@dataclass(frozen=True)
class DirectPin:
    """A package an index other than the primary serves: uv is given this one file of
    it, by URL and sha256, instead of the index (see ``direct_pins``)."""

    name: str
    index: str
    filename: str
    url: str
    sha256: str | None  # None where the index publishes none: uv hashes the file

    @property
    def requirement(self) -> str:
        return f"{self.name} @ {self.url}" + (f"#sha256={self.sha256}" if self.sha256 else "")


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
    direct = direct_pins(name, inputs, spec.target.python, spec.target.platform,
                         {} if listed is None else listed)
    overrides = [o for n, (o, _) in sorted(inputs.overridden.items()) if n not in direct]
    resolution = resolve(image=name, requirements=list(inputs.requirements),
                         overrides=[*overrides, *(d.requirement for d in direct.values())],
                         python=spec.target.python, platform=spec.target.platform,
                         wheels_dir=links, index=inputs.indexes[0], previous=previous,
                         upgrade=upgrade)
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
    check_sources(name, inputs, resolution.packages, direct)
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


def requirement_name(requirement: str) -> str:
    """The canonical name a requirement the spec checked at load is about."""
    return canonicalize_name(Requirement(requirement).name)


def exact_version(requirement: str) -> str | None:
    """The one version ``requirement`` allows (``name==V``, no wildcard), or None."""
    specs = list(Requirement(requirement).specifier)
    if len(specs) == 1 and specs[0].operator in ("==", "===") and "*" not in specs[0].version:
        return specs[0].version
    return None


def pinned_version(package: str, inputs: ImageInputs) -> str | None:
    """The one version of ``package`` the image's inputs allow: its override's, where it
    has one (the override replaces every requirement on it), else an exact requirement."""
    if package in inputs.overridden:
        return exact_version(inputs.overridden[package][0])
    return next((v for v in (exact_version(r) for r in inputs.requirements
                             if requirement_name(r) == package) if v is not None), None)


def direct_pins(image: str, inputs: ImageInputs, python: str, platform: str,
                pages: IndexListings) -> dict[str, DirectPin]:
    """Each index serves only the packages assigned to it. uv is given the primary index
    alone, and every package assigned to another index as one file of that index, by URL
    (its declared wheel; for a package listed under the index's packages:, the file of
    the version its override or requirement pins that the target installs). uv's own
    index assignment (an explicit index named in tool.uv.sources) would say the same, but
    its pip interface drops it where an override replaces the requirement, as the torch
    override does. A listed package pinned to no one version is not pinned here and is
    refused if the closure takes it (``check_sources``). ``pages``: the index pages read
    so far (once per index and project for every image of a lock step)."""
    declared = {w.name: w for w in inputs.pinned}
    out: dict[str, DirectPin] = {}
    for package, index in sorted(inputs.assigned.items()):
        w = declared.get(package)
        if w is not None and w.index != index:
            continue  # a local or built wheel of that name: imagebuild serves it
        version = None if w is not None else pinned_version(package, inputs)
        if w is None and version is None:
            continue
        key = (index, package)
        if key not in pages:
            try:
                pages[key] = index_files(index, package, index_page)
            except Exception as exc:  # requests' errors: the network, the server
                raise LockError(f"{image}: cannot read {index}/{package}/, the index that "
                                f"serves {package}: {exc.__class__.__name__}",
                                hint="run 'imagebuild lock' where every index of the spec "
                                     "answers") from None
        files = pages[key]
        filename = w.filename if w is not None else _file_for_target(
            image, index, package, str(version), files, python, platform)
        found = files.get(filename)
        if found is None:
            raise LockError(f"{image}: {index} does not list {filename} (any more)",
                            hint="declare a file the index serves; nothing was written")
        sha = w.sha256 if w is not None else found.sha256
        if w is not None and found.sha256 is not None and found.sha256 != w.sha256:
            raise LockError(
                f"{image}: {index} publishes sha256 {found.sha256} for {filename}, "
                f"wheels.lock has {w.sha256}",
                hint=f"the index serves other bytes under that name now: if that is "
                     f"intended, run 'imagebuild lock --upgrade {package}'")
        out[package] = DirectPin(package, index, filename, found.url, sha)
    return out


def _file_for_target(image: str, index: str, package: str, version: str,
                     files: Mapping[str, IndexFile], python: str, platform: str) -> str:
    filename = pick_wheel(files, package, version, python, platform)
    if filename is None:
        raise LockError(f"{image}: {index} lists no wheel of {package} {version} for CPython "
                        f"{python} on {platform}",
                        hint="pin a version that index has for the target, or take the "
                             "package off the index's packages: to let the primary index "
                             "serve it")
    return filename


def check_sources(image: str, inputs: ImageInputs, packages: Iterable[LockedDist],
                  direct: Mapping[str, DirectPin]) -> None:
    """What ``direct_pins`` arranged, checked in what uv wrote: each package assigned to
    an index other than the primary is the file given to uv; everything else came from
    the primary (the only index uv was given)."""
    wrong: list[str] = []
    for p in packages:
        index = inputs.assigned.get(p.name)
        if index is None or p.url is None:
            continue  # the primary's, or a local or built wheel imagebuild serves
        pin = direct.get(p.name)
        if pin is None:
            wrong.append(f"{p.name} {p.version} came from the primary index, but {index} "
                         f"serves it, at the one version the spec pins: none is pinned")
        elif p.filename != pin.filename or (pin.sha256 is not None and p.sha256 != pin.sha256):
            wrong.append(f"{p.name}: uv locked {p.filename} ({p.sha256[:12]}), not "
                         f"{pin.filename} from {index}")
    if wrong:
        raise LockError(
            f"{image}: each index serves only the packages assigned to it:\n  "
            + "\n  ".join(wrong),
            hint="pin the package to one version (an override name==version in the spec), "
                 "or take it off the index's packages: to let the primary index serve it; "
                 "nothing was written")


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


@dataclass(frozen=True)
class LockFiles:
    """wheels.lock and the closure lock of every image, as read once when a command
    starts: each file parsed and checked on its own, not yet against the spec
    (``checked``). A file that could not be read or parsed is the error reading it
    raised, raised where a command needs that lock; the lock step takes it for none."""

    wheels: Lock | LockError
    closures: Mapping[str, ClosureLock | LockError]

    @property
    def previous(self) -> Lock | None:
        """wheels.lock, or None (none, or unreadable): what a new lock starts from."""
        return None if isinstance(self.wheels, LockError) else self.wheels

    def previous_closure(self, image: str) -> ClosureLock | None:
        closure = self.closures.get(image)
        return None if isinstance(closure, LockError) else closure


def read_lock_files(spec: Spec) -> LockFiles:
    """Every lock file of the spec, read once (see ``LockFiles``)."""
    closures: dict[str, ClosureLock | LockError] = {}
    for name in spec.images:
        try:
            closures[name] = read_closure(spec.closure_lock_path(name), name)
        except LockError as exc:
            closures[name] = exc
    wheels: Lock | LockError
    try:
        wheels = read_lock(spec.lock_path)
    except LockError as exc:
        wheels = exc
    return LockFiles(wheels, closures)


def check_matches(lock: Lock, decls: Iterable[WheelDecl], spec_path: Path,
                  built: Mapping[str, str] | None = None) -> None:
    """Refuse a lock that does not pin exactly the wheels the spec declares: a stale lock
    would be hash-checked, served and installed as if it were the spec's. ``built`` maps
    each wheel built from source to its derivation's current input hash."""
    by_file = {w.filename: w for w in lock.wheels}
    wanted: set[str] = set()
    for name, input_hash in (built or {}).items():
        entry = next((w for w in lock.wheels if w.name == name), None)
        if entry is None or entry.derivation != input_hash:
            has = ("it has no entry for it" if entry is None else
                   f"it locks {entry.filename} from "
                   + (f"derivation {entry.derivation[:12]}" if entry.derivation
                      else entry.source))
            raise LockError(
                f"{lock.path} is out of date: {spec_path.name} builds {name} from source "
                f"(derivation {input_hash[:12]}), but {has}",
                hint=f"run 'imagebuild build' (it builds the wheel and re-locks), or "
                     f"'imagebuild build-wheels {name}' then 'imagebuild lock'; commit the "
                     f"locks")
        wanted.add(entry.filename)
    for decl in decls:
        filename, source = decl.filename, decl.source  # its source as the lock must record it
        wanted.add(filename)
        locked = by_file.get(filename)
        if locked is None:
            other = [w.filename for w in lock.wheels if w.name == decl.name]
            has = f"it locks {other[0]} instead" if other else "it has no entry for it"
            raise LockError(f"{lock.path} is out of date: {spec_path.name} declares "
                            f"{filename}, but {has}",
                            hint="run 'imagebuild lock' (where the wheels are) and commit "
                                 "wheels.lock")
        if locked.source != source:
            raise LockError(f"{lock.path} is out of date: {filename} comes from {source} in "
                            f"{spec_path.name}, from {locked.source} in the lock",
                            hint="run 'imagebuild lock' and commit wheels.lock")
    extra = sorted(set(by_file) - wanted)
    if extra:
        raise LockError(f"{lock.path} is out of date: it locks {', '.join(extra)}, which "
                        f"{spec_path.name} does not declare",
                        hint="run 'imagebuild lock' and commit wheels.lock")


def checked(spec: Spec, files: LockFiles, built: Iterable[WheelDerivation]) -> Locks:
    """The spec's locks, checked against it: a command never builds, serves or checks
    against a lock that pins other wheels than the spec declares, or a closure lock
    resolved from other inputs. ``built``: the derivations of the wheels the spec builds."""
    if isinstance(files.wheels, LockError):
        raise files.wheels
    lock = files.wheels
    check_matches(lock, spec.wheels, spec.path,
                  built={d.name: d.input_hash for d in built})
    wheels = {w.name: w for w in lock.wheels}
    closures: dict[str, ClosureLock] = {}
    for name in spec.images:
        closure = files.closures[name]
        if isinstance(closure, LockError):
            raise closure
        why = stale_reason(spec, wheels, closure)
        if why is not None:
            raise LockError(f"{closure.path} is out of date: {why}",
                            hint="run 'imagebuild lock' and commit locks/")
        closures[name] = closure
    return Locks(lock.path, lock.wheels, closures)
