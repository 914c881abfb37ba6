"""Adopting what the field already has: an image built outside imagebuild (``docker build
-f Dockerfile.mimo-runtime``), in the engine or in a ``docker save`` tar without a
sidecar, brought under imagebuild as a generation of one of the spec's images.

Nothing of it is trusted before its gate: a tar is loaded under a quarantine tag only
(its own ``RepoTags`` and ``index.json`` names are replaced, so loading it can never move
``NAME:latest`` or name another image), then a label-only build on top of it records
where it came from (``org.imagebuild.adopted``: the content fingerprint adopted) and an
identity of its own as its input hash (derived from that fingerprint and the name, so
it is never a derivation of the spec: ``build`` never reuses it). That image goes
through ``promote`` like any other: only if its checks pass does ``NAME:latest`` move to
it, and then it is rooted and backed up, so ``distribute`` sends it and ``rollback``
returns to it. When the checks fail, everything the adoption made is removed again.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .archive import TRAILER, ArchiveIndex, familiar, padding, tar_header
from .backup import BackupResult, write_backup
from .build import context_stream, label_instruction
from .context import Context, backup_store, mirror_error, update_mirrors
from .derivation import ContextFile
from .engine import Engine
from .errors import (
    BackupError,
    BuildFailed,
    ImagebuildError,
    ImageNotFound,
    SpecError,
    VerifyFailed,
)
from .fsutil import PinnedFile
from .image import ImageInfo
from .mirror import MirrorResult
from .naming import ADOPTED_LABEL, HASH_LABEL, IMAGE_LABEL, VERSION_LABEL, hash12, short_id
from .progress import Progress
from .promote import Promotion, promote

# members of a save archive that name or tag the image: replaced (manifest.json) or left
# out, so a tar being adopted is loaded under its quarantine tag alone
_NAMING = frozenset({"manifest.json", "index.json", "repositories", "oci-layout"})


def adopted_hash(name: str, fingerprint: str) -> str:
    """The identity of an adopted image: from its content and the name it is adopted as
    (never the input hash of a derivation of the spec, which hashes other material)."""
    material = json.dumps({"adopted": fingerprint, "image": name}, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()


def quarantine_tag(fingerprint: str) -> str:
    return "adopt-" + fingerprint.removeprefix("sha256:")[:12]


@dataclass(frozen=True)
class AdoptRequest:
    name: str
    ref: str | None = None  # an image in the engine
    tar: Path | None = None  # a docker save tar without a sidecar


def adopt_request(ctx: Context, names: list[str], *, ref: str | None = None,
                  tar: str | None = None, from_tar: bool = False) -> AdoptRequest:
    """Check adopt's arguments (no engine contacted): an image reference adopted as one
    named image, or (``from_tar``: ``restore-from-tar --adopt``) a tar, as the image
    named or the one its own tag names."""
    if from_tar and (tar is None or len(names) > 1):
        raise SpecError("--adopt takes one tar: restore-from-tar --file PATH --adopt [NAME]")
    path = Path(tar) if tar is not None else None
    if path is not None and not path.is_file():
        raise BackupError(f"{path} does not exist")
    if not names:
        if path is None:
            raise SpecError("name the image to adopt it as: --as NAME")
        names = [_name_from_tar(ctx, path)]
    return AdoptRequest(ctx.spec.resolve(names[0]), ref, path)


def _name_from_tar(ctx: Context, path: Path) -> str:
    """The spec image a tar's own tag names (``vllm-node-mimo:latest``), if any."""
    with PinnedFile.open(path) as f:
        archive = ArchiveIndex.read(f)
    names = {familiar(t).rpartition(":")[0] for t in archive.repo_tags}
    known = sorted(n for n in names if n in ctx.spec.images)
    if len(known) != 1:
        raise SpecError(f"{path} is tagged {', '.join(archive.repo_tags) or 'with nothing'}: "
                        f"name the spec image to adopt it as",
                        hint=f"imagebuild restore-from-tar --file {path} --adopt NAME")
    return known[0]


@dataclass
class AdoptOutcome:
    name: str
    source: str  # the image reference or the tar adopted
    adopted: ImageInfo  # the image as it was found (or loaded)
    image: ImageInfo | None  # the labelled image (None: removed after a failed gate)
    promotion: Promotion
    backup: BackupResult | None = None
    mirrors: list[MirrorResult] = field(default_factory=list)

    def error(self) -> ImagebuildError | None:
        if self.promotion.passed:
            return mirror_error(self.mirrors)
        return VerifyFailed(f"{self.source} failed the checks of {self.name}: it was not "
                            f"adopted; latest was not moved and nothing was recorded",
                            hint="imagebuild verify shows the checks; fix the image and "
                                 "adopt it again")


def adopt(ctx: Context, engine: Engine, req: AdoptRequest,
          progress: Progress | None = None) -> AdoptOutcome:
    """Bring the image under imagebuild as a generation of ``req.name`` (see the module's
    text): quarantined, labelled, gated; recorded, rooted and backed up only if it
    passes."""
    progress = progress or Progress()
    name = req.name
    if req.tar is not None:
        source = str(req.tar)
        found = _load_quarantined(engine, req.tar, name, progress)
        quarantined = f"{name}:{quarantine_tag(found.fingerprint)}"
    else:
        assert req.ref is not None
        source = req.ref
        present = engine.inspect(req.ref)
        if present is None:
            raise ImageNotFound(f"{req.ref} is not in the engine at {engine.where}")
        found = present
        quarantined = f"{name}:{quarantine_tag(found.fingerprint)}"
        engine.tag(found.id, name, quarantine_tag(found.fingerprint))
    h = adopted_hash(name, found.fingerprint)
    try:
        have = engine.inspect(f"{name}:{hash12(h)}")
        same = have is not None and have.labels.get(ADOPTED_LABEL) == found.fingerprint
        image = (have if have is not None and same
                 else _labelled(engine, name, quarantined, found, h, progress))
        progress.say(f"  {name}: {source} ({short_id(found.id)}) as {name}:{hash12(h)} "
                     f"({short_id(image.id)}); running its checks")
        promotion = promote(ctx.gate, engine, name, image, progress)
    finally:
        engine.remove_image(quarantined)
    outcome = AdoptOutcome(name, source, found, image, promotion)
    if not promotion.passed:
        engine.remove_image(f"{name}:{hash12(h)}")
        if req.tar is not None and set(found.tags) <= {quarantined}:  # loaded here alone
            engine.remove_image(found.id)
        outcome.image = None
        return outcome
    if ctx.spec.backups is not None:
        store = backup_store(ctx.spec)
        outcome.backup = write_backup(store, engine, name, image, ctx.spec.backups.keep,
                                      progress)
        outcome.mirrors = update_mirrors(ctx.spec, store, [name], progress)
    return outcome


def _load_quarantined(engine: Engine, path: Path, name: str, progress: Progress
                      ) -> ImageInfo:
    """Load a ``docker save`` tar (either store's) under ``NAME:adopt-<fingerprint12>``
    alone: its manifest's tags and its index.json are replaced by a manifest of that one
    tag, sent with the rest of the tar's bytes as they lie. Returns the image loaded,
    checked to be the content the tar's config names."""
    with PinnedFile.open(path) as f:
        archive = ArchiveIndex.read(f)
        tag = quarantine_tag(archive.fingerprint)
        manifest = json.dumps([{"Config": archive.manifest.config,
                                "RepoTags": [f"{name}:{tag}"],
                                "Layers": list(archive.layers)}]).encode()
        pieces = [*archive.pieces(0, leave_out=_NAMING),
                  tar_header("manifest.json", len(manifest)) + manifest
                  + padding(len(manifest)), TRAILER]
        progress.say(f"  loading {path} under {name}:{tag} (quarantined until its checks "
                     f"pass)")
        meter = progress.meter(f"loading {path.name}", f.size)
        engine.load_archive(pieces, meter.to)
        progress.end_live()
    loaded = engine.inspect(f"{name}:{tag}")
    if loaded is None or loaded.fingerprint != archive.fingerprint:
        if loaded is not None:
            engine.remove_image(f"{name}:{tag}")
        raise BackupError(f"loading {path} did not give the image its config names",
                          hint="check the tar with 'tar tvf'; save the image again")
    return loaded


def _labelled(engine: Engine, name: str, base: str, found: ImageInfo, h: str,
              progress: Progress) -> ImageInfo:
    """``found`` with imagebuild's labels (a build of one LABEL instruction on top of it:
    no layer on the classic store), tagged ``NAME:<hash12>``."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*:adopt-[0-9a-f]{12}", base):
        raise SpecError(f"{base!r} is not a quarantine tag")
    labels = {HASH_LABEL: h, IMAGE_LABEL: name, VERSION_LABEL: __version__,
              ADOPTED_LABEL: found.fingerprint}
    dockerfile = ("ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\n" + label_instruction(labels)).encode()
    context = context_stream((ContextFile("Dockerfile", dockerfile),))
    image_id, error = "", ""
    for ev in engine.build(context, buildargs={"BASE_IMAGE": base}):
        if ev.kind == "error":
            error = ev.text
        elif ev.kind == "done":
            image_id = ev.image_id
    if error or not image_id:
        raise BuildFailed(f"{name}: labelling the adopted image failed: "
                          f"{error or 'no image ID'}",
                          hint="nothing was recorded; check the engine and adopt again")
    engine.tag(image_id, name, hash12(h))
    progress.say(f"  {name}: labelled {short_id(found.id)} as {name}:{hash12(h)}")
    return engine.require(image_id)
