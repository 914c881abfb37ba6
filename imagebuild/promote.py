"""The one path that moves ``NAME:latest``: ``promote``.

``latest`` is the GC root of an image and only ever points at a verified image. To
promote an image is to pass the gate, then move ``latest``:

* the gate passes with a passing record for exactly this content (the content
  fingerprint) and the spec's current checks: a worker's copy is judged by the head's
  record of the same content (``evidence``), the head's image by its record in the state
  directory; with neither, the checks run now (on the head; never on a worker);
* ``latest`` moves only when the gate passed, and only if it points elsewhere;
* the image is rooted (roots.py): holders keep ``latest`` and the newest generations
  through a blind ``docker image prune -a`` or ``docker system prune -a``.

Build, restore, distribute (the workers' ``latest``) and rollback all come through here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .engine import ContainerInfo, Engine
from .image import ImageInfo
from .lock import Lock
from .naming import LATEST, latest_tag, short_id
from .progress import Progress
from .roots import root, root_base
from .spec import Spec
from .verify import VerifyRecord, image_checks, is_passing, passing_record, verify_image

DEFAULT_KEEP = 2


@dataclass(frozen=True)
class Gate:
    """The spec's checks, against which images are verified, and how many generations
    of each image stay rooted (``backups.keep``, default 2)."""

    spec: Spec
    lock: Lock

    @property
    def keep(self) -> int:
        return self.spec.backups.keep if self.spec.backups is not None else DEFAULT_KEEP


@dataclass(frozen=True)
class Promotion:
    name: str
    image: ImageInfo
    record: VerifyRecord | None  # None: no passing evidence, and no checks were run
    verified_now: bool  # the checks ran (False: a record was reused)
    moved: bool  # latest moved to this image

    @property
    def passed(self) -> bool:
        return self.record is not None and self.record.passed


def promote(gate: Gate, engine: Engine, name: str, image: ImageInfo, progress: Progress, *,
            evidence: VerifyRecord | None = None, run_checks: bool = True,
            holders: list[ContainerInfo] | None = None) -> Promotion:
    """Verify ``image`` unless a passing record exists, then move ``NAME:latest`` to it
    and root it (``holders``: the engine's root holders, when the caller has read them)."""
    spec, lock = gate.spec, gate.lock
    record = evidence if is_passing(evidence, spec, lock, name, image) else None
    if record is None:
        record = passing_record(spec, lock, name, image)
    verified_now = False
    if record is not None:
        progress.say(f"  {name}: verified {record.checked_at} (record reused)")
    elif run_checks:
        progress.say(f"  {name}: verifying ({len(image_checks(spec, name, lock))} checks)")
        record = verify_image(spec, lock, engine, name, image)
        verified_now = True
    if record is None or not record.passed:
        return Promotion(name, image, record, verified_now, moved=False)
    current = engine.inspect(latest_tag(name))
    moved = current is None or current.id != image.id
    if moved:
        engine.tag(image.id, name, LATEST)
        progress.say(f"  {name}: {latest_tag(name)} -> {short_id(image.id)}")
    root(engine, name, engine.require(image.id), gate.keep, refresh=moved, holders=holders)
    base = gate.spec.images[name].base_reference
    if base is not None and engine.on_this_host:  # the head, which builds FROM it
        root_base(engine, name, base, holders)
    return Promotion(name, image, record, verified_now, moved=moved)
