"""Derivations: the input hash of every image and the build graph. Pure: no engine, no I/O
beyond reading the spec's templates.

An image's input hash is sha256 over a canonical JSON of: the schema version, the image
name, the rendered Dockerfile, every build-context file (path and sha256; wheels by
their locked hash), and the parent's input hash (or, for the root, the pinned base
reference). The only build argument, ``BASE_IMAGE``, is a function of those last two.
Same inputs, same hash; change any input and exactly the hashes downstream change.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UnresolvedHashError
from .lock import Lock, LockedWheel
from .render import TORCH_REQUIREMENTS, render_image
from .spec import SCHEMA_VERSION, Spec

HASH_LABEL = "org.imagebuild.input-hash"
IMAGE_LABEL = "org.imagebuild.image"


@dataclass(frozen=True)
class ContextFile:
    """One file of a build context: streamed from ``source`` or taken from ``data``."""

    arcname: str
    sha256: str | None  # None: unresolved in the lock
    size: int | None = None
    source: Path | None = None
    data: bytes | None = None


@dataclass(frozen=True)
class Derivation:
    name: str
    parent: str | None
    base: str | None  # root only: pinned base reference
    dockerfile: str
    context: tuple[ContextFile, ...]
    wheels: tuple[LockedWheel, ...]
    input_hash: str | None  # None when any input (or an ancestor's) is unresolved
    unresolved: tuple[str, ...]  # filenames whose sha256 is unknown, here or upstream

    @property
    def hash12(self) -> str:
        if self.input_hash is None:
            raise UnresolvedHashError(
                f"{self.name}: cannot compute the input hash: the sha256 of "
                f"{', '.join(self.unresolved)} is unresolved",
                hint="run 'imagebuild lock' where the wheels are (the head node with wheels/ "
                     "populated) and commit wheels.lock",
            )
        return self.input_hash[:12]

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


def torch_requirements(wheel: LockedWheel) -> bytes | None:
    """The hash-pinned requirement file the torch install steps read (None if unresolved)."""
    if wheel.sha256 is None:
        return None
    return f"{wheel.name}=={wheel.version} --hash=sha256:{wheel.sha256}\n".encode()


def plan(spec: Spec, lock: Lock, names: list[str] | None = None) -> list[Derivation]:
    """Derivations of the closure of ``names`` (all images if empty), parents first."""
    out: dict[str, Derivation] = {}
    for name in spec.closure(names):
        img = spec.images[name]
        dockerfile = render_image(spec, name)
        df_bytes = dockerfile.encode()
        context: list[ContextFile] = [
            ContextFile(arcname="Dockerfile", sha256=hashlib.sha256(df_bytes).hexdigest(),
                        data=df_bytes)
        ]
        unresolved: list[str] = []
        wheels: list[LockedWheel] = []
        for wname in img.wheels:
            w = lock.get(wname)
            wheels.append(w)
            if w.sha256 is None:
                unresolved.append(w.filename)
            context.append(ContextFile(arcname=f"wheels/{w.filename}", sha256=w.sha256,
                                       source=spec.wheels_dir / w.filename))
        if img.torch is not None:
            t = lock.get(img.torch)
            wheels.append(t)
            req = torch_requirements(t)
            if req is None:
                unresolved.append(t.filename)
                context.append(ContextFile(arcname=TORCH_REQUIREMENTS, sha256=None))
            else:
                context.append(ContextFile(arcname=TORCH_REQUIREMENTS,
                                           sha256=hashlib.sha256(req).hexdigest(), data=req))
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
            input_hash = hashlib.sha256(_canonical(material)).hexdigest()
        out[name] = Derivation(
            name=name, parent=img.parent, base=img.base_reference, dockerfile=dockerfile,
            context=tuple(sorted(context, key=lambda f: f.arcname)), wheels=tuple(wheels),
            input_hash=input_hash, unresolved=tuple(unresolved),
        )
    return list(out.values())
