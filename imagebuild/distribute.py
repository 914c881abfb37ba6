"""Verified images to the workers, only the layers each lacks.

For every worker, in parallel: ask its engine which layer chains it holds (one ssh
round trip), then send an archive composed on the fly from the image's backup that
omits the layer file of every layer whose whole chain the worker already has. The
classic (overlay2) store's ``docker load`` registers the layers it needs and skips those
whose chain exists. The containerd image store does not accept a ``docker save`` archive
with layer files missing ("failed to resolve layers"), but it does import an OCI image
layout whose manifest names every layer while the blobs of the present ones are left
out; for such a worker the same backup is recomposed as that layout.

Either way the archive is a list of pieces (``engine.Piece``): ranges of files and a few
small generated tar headers and JSON files. The files are those of a backup generation
of the layer store (a ``docker save`` directory whose layer files are hard links into
its blobs: each sent whole, with a generated header, and checked against its sha256 as
it streams, so a damaged layer cuts the archive short and the worker loads nothing), or
byte ranges of one backup tar. Ranges go into ``ssh worker docker load`` with
``os.sendfile`` where nothing needs hashing: nothing is staged in a temp file, memory
stays flat. After the load the worker's image is checked by content fingerprint, tagged
``NAME:<hash12>``, and promoted (promote.py: its ``latest`` moves only on the head's
passing record of the same content). Workers are reached only through the engine
interface (engine_ssh.py).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .archive import TRAILER, ArchiveIndex, Member, docker_pieces, padding, tar_header
from .engine import ContainerInfo, Engine, StoreKind
from .errors import ImagebuildError, RemoteError
from .image import ImageInfo
from .naming import LATEST, ROOT_LABEL, ROOT_TAG_LABEL, latest_tag, split_ref
from .progress import Progress, Quiet
from .promote import Gate, promote
from .registry import CONFIG_MEDIA, MANIFEST_MEDIA
from .streams import Piece, piece_size
from .untrusted import loads_json
from .verify import VerifyRecord


def chain_ids(diff_ids: tuple[str, ...] | list[str]) -> list[str]:
    """The OCI chain ID of every layer prefix (a layer is only usable with its chain)."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else
                   "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


# -- composing each worker's archive -------------------------------------------------------


def containerd_name(ref: str) -> str:
    """A reference as the containerd store names it: docker.io/library/NAME:TAG."""
    first, _, rest = ref.partition("/")
    if not rest:
        return f"docker.io/library/{ref}"
    if "." in first or ":" in first or first == "localhost":
        return ref
    return f"docker.io/{ref}"


@dataclass(frozen=True)
class OciImage:
    """An image as an OCI manifest names it: its config, and its layers as the archive
    holds them (uncompressed by diff ID, or a compressed blob by its own digest)."""

    config: bytes
    config_digest: str
    layers: tuple[tuple[str, str, Member], ...]  # (media type, digest, archive member)
    manifest: bytes
    digest: str  # of the manifest
    media_type: str = MANIFEST_MEDIA  # of the manifest

    def blobs_from(self, first: int) -> list[tuple[str, Member]]:
        """(digest, member) of layers ``first`` and up, each blob once."""
        out: dict[str, Member] = {}
        for _media, digest, member in self.layers[first:]:
            out.setdefault(digest, member)
        return list(out.items())


def oci_image(archive: ArchiveIndex, diff_ids: tuple[str, ...]) -> OciImage:
    """The OCI image manifest of the image ``archive`` holds."""
    if len(diff_ids) != len(archive.layers) or not archive.config:
        raise ImagebuildError(f"{archive.where}: its manifest and the image's layers "
                              f"differ")
    layers = []
    for i, name in enumerate(archive.layers):
        media, digest = archive.layer_blob(i)
        layers.append((media, digest, archive.member(name)))
    config_digest = "sha256:" + hashlib.sha256(archive.config).hexdigest()
    own = _own_manifest(archive, config_digest, [(d, m.size) for _, d, m in layers])
    if own is not None:
        manifest, media_type = own
        return OciImage(archive.config, config_digest, tuple(layers), manifest,
                        "sha256:" + hashlib.sha256(manifest).hexdigest(), media_type)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST_MEDIA,
        "config": {"mediaType": CONFIG_MEDIA, "digest": config_digest,
                   "size": len(archive.config)},
        "layers": [{"mediaType": media, "digest": digest, "size": m.size}
                   for media, digest, m in layers],
    }, separators=(",", ":")).encode()
    return OciImage(archive.config, config_digest, tuple(layers), manifest,
                    "sha256:" + hashlib.sha256(manifest).hexdigest())


_MANIFEST_TYPES = (MANIFEST_MEDIA, "application/vnd.docker.distribution.manifest.v2+json")


def _own_manifest(archive: ArchiveIndex, config_digest: str,
                  layers: list[tuple[str, int]]) -> tuple[bytes, str] | None:
    """The manifest a containerd-store head saved with the image (``index.json`` naming
    one image manifest), with its media type, when it names exactly this config and these
    layer blobs (digest and size). On the containerd store an image's ID is its
    manifest's digest: a worker that loads or pulls this same manifest gets the head's
    ID, which the field's launcher compares across nodes. None: an archive of the classic
    store (no manifest of its own), or one whose manifest says anything else."""
    raw = archive.small("index.json")
    if raw is None:
        return None
    try:
        index: Any = loads_json(raw)
        (entry,) = index["manifests"]
        media, digest = str(entry["mediaType"]), str(entry["digest"])
    except (ValueError, KeyError, TypeError):
        return None
    if media not in _MANIFEST_TYPES or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        return None
    data = archive.small("blobs/sha256/" + digest.removeprefix("sha256:"))
    if data is None or "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        return None
    try:
        manifest: Any = loads_json(data)
        named = [(str(x["digest"]), int(x["size"])) for x in manifest["layers"]]
        same = (manifest.get("mediaType", media) == media
                and manifest["config"]["digest"] == config_digest and named == layers)
    except (ValueError, KeyError, TypeError):
        return None
    return (data, media) if same else None


def oci_pieces(archive: ArchiveIndex, diff_ids: tuple[str, ...], skip_layers: int,
               ref: str) -> list[Piece]:
    """The image as an OCI image layout that names every layer but carries only the
    blobs of layers ``skip_layers`` and up."""
    image = oci_image(archive, diff_ids)
    pieces: list[Piece] = []

    def literal(name: str, data: bytes) -> None:
        pieces.append(tar_header(name, len(data)) + data + padding(len(data)))

    for digest, m in image.blobs_from(skip_layers):
        pieces.append(tar_header("blobs/sha256/" + digest.removeprefix("sha256:"), m.size))
        if m.size or m.sha256 is not None:  # a checked file is checked even when empty
            pieces.append(m.data())
        if padding(m.size):
            pieces.append(padding(m.size))
    literal("blobs/sha256/" + image.config_digest.removeprefix("sha256:"), image.config)
    literal("blobs/sha256/" + image.digest.removeprefix("sha256:"), image.manifest)
    index = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": image.media_type,
            "digest": image.digest, "size": len(image.manifest),
            "annotations": {"io.containerd.image.name": containerd_name(ref),
                            "org.opencontainers.image.ref.name": ref.rpartition(":")[2]},
        }],
    }, separators=(",", ":")).encode()
    literal("index.json", index)
    literal("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    pieces.append(TRAILER)
    return pieces


def archive_bytes(pieces: list[Piece]) -> int:
    return sum(piece_size(p) for p in pieces)


# -- what a worker has --------------------------------------------------------------------------


@dataclass
class WorkerState:
    store: StoreKind
    chains: set[str] = field(default_factory=set)
    by_fingerprint: dict[str, ImageInfo] = field(default_factory=dict)
    holders: list[ContainerInfo] = field(default_factory=list)  # its GC-root holders

    def add(self, info: ImageInfo) -> None:
        self.chains.update(chain_ids(info.diff_ids))
        self.by_fingerprint[info.fingerprint] = info


def worker_state(engine: Engine) -> WorkerState:
    """What a worker holds: its store and every image (one round trip over ssh)."""
    snap = engine.snapshot()
    state = WorkerState(store=snap.info.store, holders=list(snap.holders))
    for info in snap.images:
        state.add(info)
    return state


# -- per worker -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Worker:
    """A worker of the cluster and its engine."""

    name: str
    address: str
    engine: Engine


@dataclass(frozen=True)
class Item:
    """One image to send: the head's image, its tags, its backup archive, and the head's
    passing record of it (None when sent with --force)."""

    name: str
    info: ImageInfo
    hash_tag: str  # NAME:<hash12>
    archive: ArchiveIndex
    record: VerifyRecord | None = None
    pull: str = ""  # via a registry: REGISTRY/REPO@sha256:... (the image was put there)
    oci: OciImage | None = None  # its manifest, when it was put into a registry


Action = Literal["up to date", "partial", "whole archive", "pulled", "failed", "skipped"]
# "pulled": fetched from the registry (the layers the worker lacked);
# "skipped": not attempted, because an earlier image (its parent) failed on this worker


@dataclass(frozen=True)
class Delivery:
    """What a worker gets for one image."""

    action: Action
    layers_skipped: int
    pieces: list[Piece]
    note: str = ""
    pull: str = ""  # pull this reference instead of loading pieces
    pull_bytes: int = 0  # the blobs of the layers the worker lacks, as the registry has them


@dataclass
class Outcome:
    worker: str
    address: str
    store: StoreKind | Literal["?"] = "?"
    image: str = ""
    action: Action = "failed"
    layers_total: int = 0
    layers_skipped: int = 0
    bytes_sent: int = 0
    bytes_planned: int = 0
    seconds: float = 0.0
    ok: bool = False
    error: str = ""
    note: str = ""
    latest_moved: bool = False

    @property
    def mb_per_s(self) -> float:
        return self.bytes_sent / self.seconds / 1e6 if self.seconds > 0 else 0.0


def plan_item(state: WorkerState, item: Item) -> Delivery:
    """What to send ``item`` to a worker in ``state``. Pure."""
    if item.info.fingerprint in state.by_fingerprint:
        return Delivery("up to date", len(item.info.diff_ids), [])
    present = 0
    for i, chain in enumerate(chain_ids(item.info.diff_ids)):
        if chain not in state.chains:
            break
        present = i + 1
    if item.pull and item.oci is not None:
        missing = sum(m.size for _d, m in item.oci.blobs_from(present))
        return Delivery("pulled", present, [], "from the registry", pull=item.pull,
                        pull_bytes=missing + len(item.oci.config) + len(item.oci.manifest))
    if present == 0:
        return Delivery("whole archive", 0, docker_pieces(item.archive, 0))
    if state.store == "containerd":
        return Delivery("partial", present,
                        oci_pieces(item.archive, item.info.diff_ids, present, item.hash_tag),
                        "containerd image store: an OCI layout without the present layers")
    return Delivery("partial", present, docker_pieces(item.archive, present))


class FanoutMeter:
    """One live line with the bytes sent to every worker so far."""

    def __init__(self, progress: Progress, workers: list[str]) -> None:
        self.progress = progress
        self.sent = dict.fromkeys(workers, 0)
        self.pulled: dict[str, int] = {}  # worker -> layers it has finished pulling
        self.last = 0.0
        self.lock = threading.Lock()

    def on_bytes(self, worker: str, n: int) -> None:
        with self.lock:
            self.sent[worker] = n
            now = time.monotonic()
            if now - self.last < self.progress.interval:
                return
            self.last = now
            line = "  ".join(f"{w} {self.pulled[w]} layers" if w in self.pulled
                             else f"{w} {b / 1e6:,.0f} MB" for w, b in self.sent.items())
        self.progress.live(line)

    def on_line(self, worker: str, line: str) -> None:
        """A progress line of a worker's ``docker pull``."""
        if line.endswith(("Pull complete", "Already exists")):
            with self.lock:
                self.pulled[worker] = self.pulled.get(worker, 0) + 1
            self.on_bytes(worker, self.sent[worker])


def ship(worker: Worker, items: list[Item], gate: Gate, meter: FanoutMeter | None = None,
         dry_run: bool = False) -> list[Outcome]:
    """Everything for one worker; never raises: any failure is this worker's outcome."""
    outcomes: list[Outcome] = []
    try:
        state = worker_state(worker.engine)
    except Exception as exc:  # any failure on one worker is that worker's alone
        return [Outcome(worker=worker.name, address=worker.address, image=i.name,
                        error=_why(worker, exc)) for i in items]
    for item in items:
        out = Outcome(worker=worker.name, address=worker.address, store=state.store,
                      image=item.name, layers_total=len(item.info.diff_ids))
        outcomes.append(out)
        try:
            plan = plan_item(state, item)
            out.action, out.layers_skipped, out.note = (plan.action, plan.layers_skipped,
                                                        plan.note)
            out.bytes_planned = archive_bytes(plan.pieces) or plan.pull_bytes
            if dry_run:
                out.ok = True
                continue
            started = time.monotonic()
            pulled: ImageInfo | None = None
            if plan.pull:
                worker.engine.pull(plan.pull,
                                   (lambda ln: meter.on_line(worker.name, ln)) if meter else None)
                pulled = _adopt(worker, item, plan.pull)
                out.bytes_sent = plan.pull_bytes
            elif plan.pieces:
                out.bytes_sent = worker.engine.load_archive(
                    plan.pieces,
                    (lambda n: meter.on_bytes(worker.name, n)) if meter else None)
                if item.archive.changed():
                    worker.engine.remove_image(item.hash_tag)
                    raise RemoteError(f"{item.archive.where} changed while it was sent to "
                                      f"{worker.name}; its tag there was removed")
            loaded, out.latest_moved = _settle(worker, item, state, gate, pulled)
            if item.record is None:
                out.note = "; ".join(x for x in (out.note, "not verified: its latest was not "
                                                 "moved") if x)
            out.seconds = time.monotonic() - started
            state.add(loaded)
            out.ok = True
        except Exception as exc:  # any failure on one worker is that worker's alone
            out.action, out.ok, out.error = "failed", False, _why(worker, exc)
            break  # later images build on this one: stop this worker, the others go on
    for item in items[len(outcomes):]:
        outcomes.append(Outcome(worker=worker.name, address=worker.address, store=state.store,
                                image=item.name, action="skipped",
                                error="not sent: an earlier image failed on this worker"))
    return outcomes


def _why(worker: Worker, exc: Exception) -> str:
    if isinstance(exc, ImagebuildError):
        return exc.message
    return f"{worker.name}: unexpected failure: {type(exc).__name__}: {exc}"


def _adopt(worker: Worker, item: Item, ref: str) -> ImageInfo:
    """The image just pulled as ``ref``: checked by content fingerprint, tagged
    ``NAME:<hash12>``, its registry reference removed (the worker's images carry the
    names the ssh path gives them). A copy that differs is untagged and refused.
    Returns it as it is now tagged."""
    engine = worker.engine
    pulled = engine.inspect(ref)
    if pulled is None:
        raise RemoteError(f"{worker.name}: {ref} is not present after the pull")
    if pulled.fingerprint != item.info.fingerprint:
        engine.remove_image(ref)
        raise RemoteError(f"{worker.name}: the pulled image's content fingerprint differs "
                          f"from the head's; its registry reference was removed")
    engine.tag(pulled.id, *split_ref(item.hash_tag))
    engine.remove_image(ref)
    return replace(pulled, tags=(*(t for t in pulled.tags if t != ref), item.hash_tag))


def _settle(worker: Worker, item: Item, state: WorkerState, gate: Gate,
            pulled: ImageInfo | None = None) -> tuple[ImageInfo, bool]:
    """Check the worker's copy by content fingerprint, tag it ``NAME:<hash12>`` and
    promote it (``pulled``: the copy a pull just brought, already checked and tagged).
    Returns the copy and whether its ``latest`` moved."""
    engine = worker.engine
    known = state.by_fingerprint.get(item.info.fingerprint)
    if (known is not None and {item.hash_tag, latest_tag(item.name)} <= set(known.tags)
            and _rooted(state, item, known)):
        return known, False  # up to date, tagged and rooted: nothing to ask the worker
    loaded = pulled or engine.inspect(item.hash_tag)
    if loaded is None:  # up to date under other tags: found by content
        loaded = known
    if loaded is None:
        raise RemoteError(f"{worker.name}: {item.hash_tag} is not present after the load")
    if loaded.fingerprint != item.info.fingerprint:
        engine.remove_image(item.hash_tag)
        raise RemoteError(f"{worker.name}: the loaded image's content fingerprint differs "
                          f"from the head's; its tag was removed")
    if item.hash_tag not in loaded.tags:
        engine.tag(loaded.id, *split_ref(item.hash_tag))
    # reported through the outcome table, not line by line
    promotion = promote(gate, engine, item.name, loaded, Quiet(), evidence=item.record,
                        run_checks=False,
                        holders=[h for h in state.holders
                                 if h.labels.get(ROOT_LABEL) == item.name])
    return loaded, promotion.moved


def _rooted(state: WorkerState, item: Item, image: ImageInfo) -> bool:
    """Whether the worker's holders keep ``image`` as ``item``'s latest and current
    generation."""
    held = {h.labels.get(ROOT_TAG_LABEL) for h in state.holders
            if h.labels.get(ROOT_LABEL) == item.name and h.running and h.image_id == image.id}
    return {LATEST, split_ref(item.hash_tag)[1]} <= held


def distribute(workers: list[Worker], items: list[Item], gate: Gate, progress: Progress,
               dry_run: bool = False) -> list[Outcome]:
    """Every item to every worker, the workers in parallel."""
    meter = FanoutMeter(progress, [w.name for w in workers])
    try:
        with ThreadPoolExecutor(max_workers=max(len(workers), 1)) as pool:
            futures = [pool.submit(ship, w, items, gate, meter, dry_run)
                       for w in workers]
            return [o for f in futures for o in f.result()]
    finally:
        progress.end_live()
