"""``imagebuild distribute``: verified images to the workers, only the layers each lacks.

For every worker, in parallel: ask its engine (over ssh) which layer chains it holds,
then send an archive composed on the fly from the image's backup tar that omits the
``layer.tar`` of every layer whose whole chain the worker already has. The classic
(overlay2) store's ``docker load`` registers the layers it needs and skips those whose
chain exists. The containerd image store does not accept a ``docker save`` archive with
layer files missing ("failed to resolve layers"), but it does import an OCI image layout
whose manifest names every layer while the blobs of the present ones are left out; for
such a worker the same backup tar is recomposed as that layout. Either way the archive
is a list of pieces: byte ranges of the backup tar, pushed into ``ssh worker docker
load`` with ``os.sendfile``, and a few small generated headers and JSON files. No Python
copies layer bytes, nothing is staged in a temp file, memory stays flat. After the load
the worker's image is checked by content fingerprint and tagged like the head's.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tarfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .engine import ImageInfo, image_info_from_inspect
from .errors import ImagebuildError, RemoteError
from .remote import Target, explain, run, start

BLOCK = 512
TRAILER = b"\0" * (2 * BLOCK)
CONTAINERD = "io.containerd.snapshotter.v1"


def chain_ids(diff_ids: tuple[str, ...] | list[str]) -> list[str]:
    """The OCI chain ID of every layer prefix (a layer is only usable with its chain)."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else
                   "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


# -- the archive -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    name: str
    offset: int  # start of its header block(s)
    end: int  # end of its data, padded to the block size
    data_offset: int = 0
    size: int = 0
    link: str = ""  # a symlink's target, resolved to a member name


Piece = tuple[int, int] | bytes  # a byte range of the backup tar, or literal bytes


@dataclass(frozen=True)
class ArchiveIndex:
    """Where each member of a ``docker save`` tar lies, and which file is which layer."""

    path: Path
    size: int
    members: tuple[Member, ...]
    layers: tuple[str, ...]  # manifest "Layers": member name of layer i
    repo_tags: tuple[str, ...]
    config: bytes = b""  # the image config JSON (a few KB)

    @classmethod
    def read(cls, path: Path) -> ArchiveIndex:
        members: list[Member] = []
        manifest: list[dict[str, object]] | None = None
        small: dict[str, bytes] = {}
        with tarfile.open(path, "r:") as tf:
            for ti in tf:
                data_end = ti.offset_data + -(-ti.size // BLOCK) * BLOCK
                link = (os.path.normpath(os.path.join(os.path.dirname(ti.name), ti.linkname))
                        if ti.issym() else ti.linkname if ti.islnk() else "")
                members.append(Member(ti.name, ti.offset, data_end, ti.offset_data, ti.size,
                                      link))
                if ti.isfile() and ti.name.endswith(".json") and ti.size < (1 << 22):
                    f = tf.extractfile(ti)
                    assert f is not None
                    small[ti.name] = f.read()
        if "manifest.json" in small:
            manifest = json.loads(small["manifest.json"])
        if not manifest or len(manifest) != 1:
            raise ImagebuildError(f"{path} is not a single-image docker save archive")
        entry = manifest[0]
        layers = tuple(str(x) for x in entry.get("Layers") or [])  # type: ignore[attr-defined]
        tags = tuple(str(x) for x in entry.get("RepoTags") or [])  # type: ignore[attr-defined]
        config = small.get(str(entry.get("Config") or ""), b"")
        return cls(path=path, size=path.stat().st_size, members=tuple(members), layers=layers,
                   repo_tags=tags, config=config)

    @functools.cached_property
    def _by_name(self) -> dict[str, Member]:
        return {m.name: m for m in self.members}

    def member(self, name: str) -> Member:
        """The member holding ``name``'s bytes (symlinks and hard links followed)."""
        by_name = self._by_name
        m = by_name.get(name)
        for _ in range(8):
            if m is None or not m.link:
                break
            m = by_name.get(m.link)
        if m is None or m.link:
            raise ImagebuildError(f"{self.path}: no file for {name}")
        return m

    def ranges(self, skip_layers: int) -> list[tuple[int, int]]:
        """Byte ranges of the archive without the first ``skip_layers`` layer files."""
        skip = set(self.layers[:skip_layers])
        out: list[tuple[int, int]] = []
        for m in self.members:
            if m.name in skip:
                continue
            if out and out[-1][0] + out[-1][1] == m.offset:
                out[-1] = (out[-1][0], m.end - out[-1][0])
            else:
                out.append((m.offset, m.end - m.offset))
        return out


def docker_pieces(archive: ArchiveIndex, skip_layers: int) -> list[Piece]:
    """The ``docker save`` archive without the first ``skip_layers`` layer files."""
    return [*archive.ranges(skip_layers), TRAILER]


def _header(name: str, size: int) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mode = 0o644
    return ti.tobuf(format=tarfile.USTAR_FORMAT)


def _padding(size: int) -> bytes:
    return b"\0" * ((-size) % BLOCK)


def containerd_name(ref: str) -> str:
    """A reference as the containerd store names it: docker.io/library/NAME:TAG."""
    first, _, rest = ref.partition("/")
    if not rest:
        return f"docker.io/library/{ref}"
    if "." in first or ":" in first or first == "localhost":
        return ref
    return f"docker.io/{ref}"


def oci_pieces(archive: ArchiveIndex, diff_ids: tuple[str, ...], skip_layers: int,
               ref: str) -> list[Piece]:
    """The image as an OCI image layout that names every layer (uncompressed, by its
    diff ID) but carries only the blobs of layers ``skip_layers`` and up."""
    if len(diff_ids) != len(archive.layers) or not archive.config:
        raise ImagebuildError(f"{archive.path}: its manifest and the image's layers differ")
    pieces: list[Piece] = []

    def literal(name: str, data: bytes) -> None:
        pieces.append(_header(name, len(data)) + data + _padding(len(data)))

    descriptors: list[dict[str, object]] = []
    sent: set[str] = set()
    for i, (name, diff_id) in enumerate(zip(archive.layers, diff_ids, strict=True)):
        m = archive.member(name)
        descriptors.append({"mediaType": "application/vnd.oci.image.layer.v1.tar",
                            "digest": diff_id, "size": m.size})
        if i >= skip_layers and diff_id not in sent:
            sent.add(diff_id)
            pieces.append(_header("blobs/sha256/" + diff_id.removeprefix("sha256:"), m.size))
            if m.size:
                pieces.append((m.data_offset, m.size))
            if _padding(m.size):
                pieces.append(_padding(m.size))
    config_digest = "sha256:" + hashlib.sha256(archive.config).hexdigest()
    literal("blobs/sha256/" + config_digest.removeprefix("sha256:"), archive.config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": len(archive.config)},
        "layers": descriptors,
    }, separators=(",", ":")).encode()
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    literal("blobs/sha256/" + manifest_digest.removeprefix("sha256:"), manifest)
    index = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": len(manifest),
            "annotations": {"io.containerd.image.name": containerd_name(ref),
                            "org.opencontainers.image.ref.name": ref.rpartition(":")[2]},
        }],
    }, separators=(",", ":")).encode()
    literal("index.json", index)
    literal("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    pieces.append(TRAILER)
    return pieces


def archive_bytes(pieces: list[Piece]) -> int:
    return sum(p[1] if isinstance(p, tuple) else len(p) for p in pieces)


# -- what a worker has --------------------------------------------------------------------------


@dataclass
class WorkerState:
    store: str  # "classic" | "containerd"
    chains: set[str] = field(default_factory=set)
    by_fingerprint: dict[str, ImageInfo] = field(default_factory=dict)

    def add(self, info: ImageInfo) -> None:
        self.chains.update(chain_ids(info.diff_ids))
        self.by_fingerprint[info.fingerprint] = info


# One round trip: the engine's info on the first line, then the inspect array of every
# image (a constant script; nothing from the spec reaches this shell).
PROBE = ('docker info --format "{{json .}}" && '
         "docker images -aq --no-trunc | sort -u | xargs -r docker image inspect")


def probe(target: Target) -> WorkerState:
    return parse_probe(run(target, ["sh", "-c", PROBE]))


def parse_probe(out: str) -> WorkerState:
    """The worker's store (from ``docker info``'s DriverStatus) and its images."""
    first, _, rest = out.partition("\n")
    info = json.loads(first)
    status = {str(k): str(v) for k, v in (info.get("DriverStatus") or [])}
    store = "containerd" if status.get("driver-type") == CONTAINERD else "classic"
    state = WorkerState(store=store)
    for data in json.loads(rest) if rest.strip() else []:
        state.add(image_info_from_inspect(data))
    return state


# -- per worker -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One image to send: head image, its tags, and its backup archive."""

    name: str
    info: ImageInfo
    hash_tag: str  # NAME:<hash12>
    archive: ArchiveIndex


@dataclass
class Outcome:
    worker: str
    address: str
    store: str = "?"
    image: str = ""
    action: str = ""  # "up to date" | "partial" | "whole archive" | "failed"
    layers_total: int = 0
    layers_skipped: int = 0
    bytes_sent: int = 0
    bytes_planned: int = 0
    seconds: float = 0.0
    ok: bool = False
    error: str = ""
    note: str = ""

    @property
    def mb_per_s(self) -> float:
        return self.bytes_sent / self.seconds / 1e6 if self.seconds > 0 else 0.0


def plan_item(state: WorkerState, item: Item) -> tuple[str, int, list[Piece], str]:
    """(action, layers skipped, pieces, note) for sending ``item`` to a worker in ``state``."""
    if item.info.fingerprint in state.by_fingerprint:
        return "up to date", len(item.info.diff_ids), [], ""
    present = 0
    for i, chain in enumerate(chain_ids(item.info.diff_ids)):
        if chain not in state.chains:
            break
        present = i + 1
    if present == 0:
        return "whole archive", 0, docker_pieces(item.archive, 0), ""
    if state.store == "containerd":
        return ("partial", present,
                oci_pieces(item.archive, item.info.diff_ids, present, item.hash_tag),
                "containerd image store: an OCI layout without the present layers")
    return "partial", present, docker_pieces(item.archive, present), ""


Progress = Callable[[str, int], None]  # (worker, bytes sent so far)


def send_pieces(target: Target, path: Path, pieces: list[Piece], progress: Progress) -> int:
    """Stream the pieces (ranges of ``path`` with ``sendfile``, literal bytes with
    ``write``) into ``ssh worker docker load``."""
    proc = start(target, ["docker", "load"])
    assert proc.stdin is not None
    sent = 0
    broken = False
    try:
        fd = proc.stdin.fileno()
        with path.open("rb") as f:
            for piece in pieces:
                if isinstance(piece, bytes):
                    view = memoryview(piece)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                        sent += n
                    continue
                offset, length = piece
                while length > 0:
                    n = os.sendfile(fd, f.fileno(), offset, min(length, 1 << 30))
                    if n == 0:
                        raise RemoteError(f"{path} ended early while sending to {target.name}")
                    offset += n
                    length -= n
                    sent += n
                    progress(target.name, sent)
    except (BrokenPipeError, ConnectionResetError):
        broken = True
    finally:
        try:
            proc.stdin.close()
        except BrokenPipeError:
            broken = True
    assert proc.stderr is not None
    err = proc.stderr.read()  # ends when ssh exits: the load finished or failed
    proc.wait()
    if proc.returncode != 0 or broken:
        stderr = err.decode(errors="replace")
        why = (explain(target, proc.returncode or 255, stderr) if proc.returncode or stderr.strip()
               else f"{target.name}: the connection closed during the transfer")
        raise RemoteError(f"transfer failed after {sent / 1e6:.1f} MB: {why}")
    return sent


def remote_inspect(target: Target, ref: str) -> ImageInfo | None:
    try:
        data = json.loads(run(target, ["docker", "image", "inspect", ref]))
    except RemoteError:
        return None
    return image_info_from_inspect(data[0]) if data else None


def ship(target: Target, items: list[Item], progress: Progress,
         dry_run: bool = False) -> list[Outcome]:
    """Everything for one worker; never raises: failures are outcomes."""
    outcomes: list[Outcome] = []
    try:
        state = probe(target)
    except ImagebuildError as exc:
        return [Outcome(worker=target.name, address=target.host, image=i.name, action="failed",
                        error=exc.message) for i in items]
    for item in items:
        out = Outcome(worker=target.name, address=target.host, store=state.store,
                      image=item.name, layers_total=len(item.info.diff_ids))
        outcomes.append(out)
        try:
            action, skipped, pieces, note = plan_item(state, item)
            out.action, out.layers_skipped, out.note = action, skipped, note
            out.bytes_planned = archive_bytes(pieces)
            if dry_run:
                out.ok = True
                continue
            started = time.monotonic()
            if pieces:
                out.bytes_sent = send_pieces(target, item.archive.path, pieces, progress)
            loaded = _settle(target, item, state)
            out.seconds = time.monotonic() - started
            state.add(loaded)
            out.ok = True
        except ImagebuildError as exc:
            out.action, out.ok, out.error = "failed", False, exc.message
            break  # later images build on this one: stop this worker, the others go on
    for item in items[len(outcomes):]:
        outcomes.append(Outcome(worker=target.name, address=target.host, store=state.store,
                                image=item.name, action="skipped",
                                error="not sent: an earlier image failed on this worker"))
    return outcomes


def _settle(target: Target, item: Item, state: WorkerState) -> ImageInfo:
    """Check the worker's copy by content fingerprint and tag it like the head's."""
    tags = (item.hash_tag, f"{item.name}:latest")
    known = state.by_fingerprint.get(item.info.fingerprint)
    if known is not None and all(t in known.tags for t in tags):
        return known  # up to date and tagged: nothing to ask the worker
    loaded = remote_inspect(target, item.hash_tag)
    if loaded is None:  # up to date under other tags: find it by content
        loaded = state.by_fingerprint.get(item.info.fingerprint)
    if loaded is None:
        raise RemoteError(f"{target.name}: {item.hash_tag} is not present after the load")
    if loaded.fingerprint != item.info.fingerprint:
        run(target, ["docker", "rmi", item.hash_tag])
        raise RemoteError(f"{target.name}: the loaded image's content fingerprint differs "
                          f"from the head's; its tag was removed")
    for tag in tags:
        if tag not in loaded.tags:
            run(target, ["docker", "tag", loaded.id, tag])
    return loaded


def distribute(targets: list[Target], items: list[Item], progress: Progress,
               dry_run: bool = False) -> list[Outcome]:
    lock = threading.Lock()

    def guarded(worker: str, sent: int) -> None:
        with lock:
            progress(worker, sent)

    with ThreadPoolExecutor(max_workers=max(len(targets), 1)) as pool:
        futures = [pool.submit(ship, t, items, guarded, dry_run) for t in targets]
        return [o for f in futures for o in f.result()]
