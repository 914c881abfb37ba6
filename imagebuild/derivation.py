"""Derivations: the input hash of every image and the build graph. Pure: no engine, no I/O
beyond reading the spec's templates.

An image's input hash is sha256 over a canonical JSON of: the schema version, the image
name, the rendered Dockerfile, every build-context file (path and sha256), and the
parent's input hash (or, for the root, the pinned base reference). The image's locked
closure enters through the context's ``install-<group>.txt`` files (what it installs on
top of its parent, split into the spec's layer groups, each file pinned by sha256), its
uv through its own pinned requirement file; the local wheels themselves are served to
the build, not copied into the context. So a change to one locked package changes
exactly the images that install it, and their children.
Build arguments are not inputs: ``BASE_IMAGE`` is a function of the parent's hash (or
the base), and ``IMAGEBUILD_WHEELS`` is only where this run's wheel server listens.
Same inputs, same hash; change any input and exactly the hashes downstream change.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .closure import ClosureLock, LockedDist, Locks, install_set, requirements_text
from .errors import SpecError, UnresolvedHashError
from .layers import assign
from .lock import LockedWheel, sha256_file
from .naming import hash12
from .render import UV_REQUIREMENTS, WHEELS_ARG, render_image
from .spec import SCHEMA_VERSION, ImageSpec, Spec
from .wheelstore import wheel_path


@dataclass(frozen=True)
class ContextFile:
    """One (small, generated) file of a build context; no data while a hash it needs is
    unresolved in the lock."""

    arcname: str
    data: bytes | None

    @property
    def sha256(self) -> str | None:
        return hashlib.sha256(self.data).hexdigest() if self.data is not None else None


@dataclass(frozen=True)
class CopiedFile:
    """One entry of a file or directory the spec declares into an image (``files:``):
    at ``arcname`` in the build context, streamed from ``source`` (checked against
    ``sha256`` as it streams). A directory entry has no source."""

    arcname: str  # files/<n> (a declared file), or files/<n>/<path> inside a directory
    source: Path | None  # None: a directory
    sha256: str | None
    size: int
    mode: int


@dataclass(frozen=True)
class ServedWheel:
    """A local wheel the build installs: served to it, checked against ``sha256`` first."""

    filename: str
    sha256: str | None  # None: unresolved in the lock
    source: Path


@dataclass(frozen=True)
class Derivation:
    name: str
    parent: str | None
    base: str | None  # root only: pinned base reference
    dockerfile: str
    context: tuple[ContextFile, ...]
    served: tuple[ServedWheel, ...]
    wheels: tuple[LockedWheel, ...]
    installs: tuple[LockedDist, ...]  # what its install RUNs install (from its closure lock)
    input_hash: str | None  # None when any input (or an ancestor's) is unresolved
    unresolved: tuple[str, ...]  # filenames whose sha256 is unknown, here or upstream
    # each layer group and what it installs (name==version), in install order
    layers: tuple[tuple[str, tuple[str, ...]], ...] = ()
    copied: tuple[CopiedFile, ...] = ()  # the declared files, in the context's order

    @property
    def hash12(self) -> str:
        if self.input_hash is None:
            raise UnresolvedHashError(
                f"{self.name}: cannot compute the input hash: the sha256 of "
                f"{', '.join(self.unresolved)} is unresolved",
                hint="run 'imagebuild lock' where the wheels are (the head node with wheels/ "
                     "populated) and commit wheels.lock",
            )
        return hash12(self.input_hash)

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.hash12}"

    def base_image_arg(self, parent: Derivation | None) -> str:
        """``BASE_IMAGE`` build arg: the parent's exact derivation, or the pinned base."""
        if parent is not None:
            return parent.tag
        assert self.base is not None
        return self.base


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def pinned_requirement(wheel: LockedWheel) -> bytes | None:
    """A hash-pinned requirement file for one index wheel (None if unresolved): what the
    torch install steps and the uv install read."""
    if wheel.sha256 is None:
        return None
    return f"{wheel.name}=={wheel.version} --hash=sha256:{wheel.sha256}\n".encode()


def _installs(spec: Spec, name: str, closures: Mapping[str, ClosureLock]
              ) -> tuple[list[LockedDist], list[ContextFile],
                         tuple[tuple[str, tuple[str, ...]], ...]]:
    """What ``name`` installs on top of its parent: the distributions (what the parent's
    closure lacks, nothing more: torch and every wheel the parent has are never
    installed again), one hash-pinned requirements file per layer group (a group with
    nothing to install gets a comment), and each group with what it takes
    (``name==version``, in install order). No files while its closure is unresolved."""
    closure, parent = closures[name], spec.images[name].parent
    if closure.unresolved is not None:
        return [], [ContextFile(g.requirements, None) for g in spec.layers], ()
    installs = install_set(closure, closures[parent] if parent is not None else None)
    assigned = assign(((p.name, p.is_local) for p in installs), spec.layers)
    by_name = {p.name: p for p in installs}
    had = f"{parent} has all of it" if parent else "the lock has nothing for it"
    files = [ContextFile(g.requirements, requirements_text(
                 [by_name[n] for n in assigned[g.name]], WHEELS_ARG,
                 empty=f"{name} installs nothing in group {g.name}: {had}").encode())
             for g in spec.layers]
    groups = tuple((g, tuple(f"{n}=={by_name[n].version}" for n in names))
                   for g, names in assigned.items())
    return installs, files, groups


def copied_files(img: ImageSpec) -> tuple[list[CopiedFile], list[str]]:
    """The entries of the files ``img`` declares, each file hashed now (its bytes are
    what the input hash says; the build checks them again as it streams them), and the
    declared paths that are missing (unresolved: the image cannot be built here)."""
    out: list[CopiedFile] = []
    missing: list[str] = []
    for i, f in enumerate(img.files):
        try:
            st = f.source.stat()
        except FileNotFoundError:
            missing.append(f"{f.source} (declared file, not found)")
            continue
        except OSError as exc:
            raise SpecError(f"images.{img.name}.files: {f.source}: {exc.strerror or exc}"
                            ) from None
        out.extend(_entries(img.name, f"files/{i}", f.source, st, f.mode))
    return out, missing


def _entries(image: str, arcname: str, path: Path, st: os.stat_result, mode: int | None
             ) -> list[CopiedFile]:
    """A regular file, or a directory and everything in it (sorted by name). A symbolic
    link inside a declared directory, or anything but a file or a directory, is refused:
    the image would not hold what the checkout shows."""
    if stat.S_ISDIR(st.st_mode):
        out = [CopiedFile(arcname, None, None, 0, 0o755)]
        for child in sorted(path.iterdir()):
            out.extend(_entries(image, f"{arcname}/{child.name}", child, child.lstat(), mode))
        return out
    if not stat.S_ISREG(st.st_mode):
        what = ("a symbolic link inside a declared directory" if stat.S_ISLNK(st.st_mode)
                else "neither a file nor a directory")
        raise SpecError(f"images.{image}.files: {path} is {what}",
                        hint="declare the file it points to, or copy it in place")
    keep = 0o755 if st.st_mode & 0o111 else 0o644
    return [CopiedFile(arcname, path, sha256_file(path), st.st_size,
                       keep if mode is None else mode)]


def plan(spec: Spec, lock: Locks, names: list[str] | None = None) -> list[Derivation]:
    """Derivations of the closure of ``names`` (all images if empty), parents first.
    ``lock`` carries every image's closure lock (see ``ops.load``)."""
    closures = lock.closures
    out: dict[str, Derivation] = {}
    for name in spec.closure(names):
        img = spec.images[name]
        copied, missing = copied_files(img)
        dockerfile = render_image(spec, name)
        installs, install_files, groups = _installs(spec, name, closures)
        context = [ContextFile("Dockerfile", dockerfile.encode()), *install_files]
        unresolved: list[str] = []
        closure = closures[name]
        wheels: list[LockedWheel] = [lock.get(wname) for wname in img.wheels]
        served_names = {p.filename for p in installs if p.is_local}
        by_file = lock.by_filename()
        served = tuple(ServedWheel(f, by_file[f].sha256, wheel_path(spec, by_file[f]))
                       for f in sorted(served_names))
        unresolved.extend(w.filename for w in wheels if w.sha256 is None)
        if closure.unresolved is not None:
            unresolved.append(closure.path.name)
        for pinned, arcname in ((img.params.uv, UV_REQUIREMENTS), (img.torch, None)):
            if pinned is None:
                continue
            t = lock.get(pinned)
            wheels.append(t)
            if t.sha256 is None:
                unresolved.append(t.filename)
            if arcname is not None:
                context.append(ContextFile(arcname, pinned_requirement(t)))
        unresolved.extend(missing)
        parent = out[img.parent] if img.parent is not None else None
        if parent is not None and parent.input_hash is None:
            unresolved.extend(f for f in parent.unresolved if f not in unresolved)
        input_hash: str | None = None
        if not unresolved:
            material = {
                "schema": SCHEMA_VERSION,
                "image": name,
                "dockerfile": dockerfile,
                "context": sorted([f.arcname, f.sha256] for f in context),
                "parent": parent.input_hash if parent is not None else None,
                "base": img.base_reference,
            }
            if copied:  # (absent otherwise: the hashes of images without files stay)
                material["files"] = [[c.arcname, c.sha256, c.mode] for c in copied]
            input_hash = hashlib.sha256(_canonical(material)).hexdigest()
        out[name] = Derivation(
            name=name, parent=img.parent, base=img.base_reference, dockerfile=dockerfile,
            context=tuple(sorted(context, key=lambda f: f.arcname)), served=served,
            wheels=tuple(wheels), installs=tuple(installs),
            input_hash=input_hash, unresolved=tuple(unresolved), layers=groups,
            copied=tuple(copied),
        )
    return list(out.values())
