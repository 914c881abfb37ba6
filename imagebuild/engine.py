"""The engine interface: what the workflows ask of a Docker engine, on the head or on a
worker, and the typed results it answers with.

Two implementations share it: ``engine_docker.DockerEngine`` (the head's engine, through
the docker SDK; the only module that imports ``docker``) and ``engine_ssh.SshEngine`` (a
worker's engine, through the docker CLI over OpenSSH). The unit tests drive the workflows
against an in-memory engine that implements the same interface.

Replies are parsed and validated at the edge: ``image.parse_image`` and ``parse_info``
here refuse a reply of an unexpected shape with ``BadReply`` (each engine turns it into
its own typed error), so nothing downstream trusts an unchecked ``docker inspect``. The
image model is image.py; the checked byte streams an archive is loaded from are
streams.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Literal, Protocol, TypeVar
from urllib.parse import urlsplit

from .errors import EngineError, ImageNotFound
from .image import BadReply, ImageInfo
from .streams import OnBytes, Piece, archive_chunks, piece_size

T = TypeVar("T")
StoreKind = Literal["classic", "containerd"]
CONTAINERD_DRIVER = "io.containerd.snapshotter.v1"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class EngineInfo:
    """What ``docker info`` says that the workflows use."""

    store: StoreKind
    driver: str
    version: str


@dataclass(frozen=True)
class ContainerInfo:
    """A typed view of ``docker container inspect`` (imagebuild's GC-root holders)."""

    id: str
    name: str  # without the leading "/"
    image_id: str  # the image it holds
    image_ref: str  # the reference it was created from (NAME:TAG)
    labels: dict[str, str]
    running: bool
    created: str  # RFC 3339: sorts in time order as text


@dataclass(frozen=True)
class Snapshot:
    """An engine's info, every image it holds and imagebuild's root holders, read at
    once."""

    info: EngineInfo
    images: tuple[ImageInfo, ...]
    holders: tuple[ContainerInfo, ...] = ()


@dataclass(frozen=True)
class BuildEvent:
    """One item of a build's progress stream."""

    kind: Literal["line", "error", "done"]
    text: str = ""
    image_id: str = ""


@dataclass(frozen=True)
class Job:
    """A throwaway container that is given files, runs one command and hands one
    directory back: how a wheel is built from source."""

    image: str  # the builder image (a reference the engine resolves; never pulled)
    command: tuple[str, ...]  # exec form; the image's entrypoint is not used
    env: tuple[tuple[str, str], ...]
    workdir: str
    output: str  # the directory copied out when the command succeeds
    labels: tuple[tuple[str, str], ...] = ()
    volumes: tuple[tuple[str, str], ...] = ()  # (named volume, mount point): caches


OnLine = Callable[[str], None]
Receive = Callable[[Iterator[bytes]], None]


@dataclass(frozen=True)
class RunResult:
    exit_code: int | None  # None: killed at its timeout
    stdout: str
    stderr: str
    timed_out: bool


# -- parsing replies -------------------------------------------------------------------------

def parse_container(data: object) -> ContainerInfo:
    """One ``docker container inspect`` object, checked."""
    if not isinstance(data, dict):
        raise BadReply(f"a container entry is a {type(data).__name__}, not an object")
    cid, image_id = data.get("Id"), data.get("Image")
    if not isinstance(cid, str) or not re.fullmatch(r"[0-9a-f]{64}", cid):
        raise BadReply(f"a container entry has no valid Id ({cid!r})")
    if not isinstance(image_id, str) or not _DIGEST.match(image_id):
        raise BadReply(f"container {cid[:12]}: Image is not an image ID")
    cfg = data.get("Config") or {}
    state = data.get("State") or {}
    if not isinstance(cfg, dict) or not isinstance(state, dict):
        raise BadReply(f"container {cid[:12]}: Config or State is not an object")
    labels = cfg.get("Labels") or {}
    if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise BadReply(f"container {cid[:12]}: Config.Labels is not a string mapping")
    return ContainerInfo(id=cid, name=str(data.get("Name") or "").lstrip("/"),
                         image_id=image_id, image_ref=str(cfg.get("Image") or ""),
                         labels=dict(labels), running=bool(state.get("Running")),
                         created=str(data.get("Created") or ""))


def parse_info(data: object) -> EngineInfo:
    """``docker info`` (as JSON): which image store, which version."""
    if not isinstance(data, dict):
        raise BadReply("docker info is not a JSON object")
    status = data.get("DriverStatus") or []
    if not isinstance(status, list):
        raise BadReply("docker info: DriverStatus is not a list")
    pairs: dict[str, str] = {}
    for row in status:
        if isinstance(row, list) and len(row) == 2:
            pairs[str(row[0])] = str(row[1])
    containerd = pairs.get("driver-type") == CONTAINERD_DRIVER
    return EngineInfo(store="containerd" if containerd else "classic",
                      driver=str(data.get("Driver") or "?"),
                      version=str(data.get("ServerVersion") or "?"))


def is_local_engine_url(url: str) -> bool:
    """Whether an engine address is on this machine: a unix socket or a loopback TCP
    address (not ``ssh://``, and not a name that merely starts with ``127.``)."""
    if url.startswith(("unix://", "/")):
        return True
    try:
        host = urlsplit(url if "://" in url else "tcp://" + url).hostname or ""
    except ValueError:
        return False
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


# -- the interface ---------------------------------------------------------------------------


class Engine(Protocol):
    """A Docker engine, on the head or on a worker.

    Implementations subclass this explicitly to inherit ``require`` and ``load_archive``.
    """

    @property
    def where(self) -> str:
        """Where the engine is, for messages (a socket URL, or a worker's name)."""
        ...

    @property
    def on_this_host(self) -> bool:
        """Whether a build with host networking reaches this process on 127.0.0.1."""
        ...

    def info(self) -> EngineInfo: ...

    def snapshot(self) -> Snapshot:
        """The engine's info and every image (one round trip on a worker)."""
        ...

    def inspect(self, ref: str) -> ImageInfo | None:
        """The image ``ref`` names, or None when there is none."""
        ...

    def find_by_label(self, key: str, value: str) -> list[ImageInfo]: ...

    def tag(self, image_id: str, repository: str, tag: str) -> None: ...

    def remove_image(self, ref: str) -> None:
        """Remove a tag (or an image by ID); absent is not an error."""
        ...

    def save(self, *refs: str) -> Iterator[bytes]:
        """``docker save`` of one image or several (shared layers come once) as a
        stream of chunks."""
        ...

    def load(self, chunks: Iterable[bytes]) -> list[str]:
        """``docker load`` from a stream; returns the engine's "Loaded ..." lines."""
        ...

    def build(self, context: Iterable[bytes], *, buildargs: dict[str, str],
              nocache: bool = False) -> Generator[BuildEvent, None, None]:
        """A build from a streamed tar context (its Dockerfile carries the labels);
        tags nothing."""
        ...

    def run_check(self, image: str, command: list[str], timeout: float) -> RunResult:
        """Run ``command`` in a throwaway container: no network, killed at ``timeout``,
        always removed."""
        ...

    def holders(self, label: str) -> list[ContainerInfo]:
        """The containers that carry ``label`` (any value), running or not."""
        ...

    def hold(self, name: str, ref: str, labels: dict[str, str]) -> ContainerInfo:
        """Start a container named ``name`` from ``ref`` that does nothing but hold its
        image (``sleep infinity``; no network; restarted with the engine)."""
        ...

    def remove_container(self, ref: str) -> None:
        """Remove a container (stopping it); absent is not an error."""
        ...

    def disk_usage(self) -> int:
        """Bytes the engine's image layers take on disk."""
        ...

    def pull(self, ref: str, on_line: OnLine | None = None) -> None:
        """``docker pull`` of ``ref`` (REGISTRY/REPO@sha256:...): the engine fetches the
        layers it lacks. Progress lines go to ``on_line``. Tags nothing else."""
        raise EngineError(f"the engine at {self.where} does not pull from registries")

    def run_job(self, job: Job, upload: Iterable[bytes], on_line: OnLine,
                receive: Receive) -> int:
        """Create a container for ``job``, extract the tar stream ``upload`` at its root,
        run the command (host network) with its output lines passed to ``on_line``, and
        when it exits 0 pass a tar stream of ``job.output`` to ``receive``. Returns the
        exit code; the container is removed whatever happens."""
        raise EngineError(
            f"the engine at {self.where} does not run build jobs",
            hint="wheels are built on the head node's engine (unset DOCKER_HOST or point it "
                 "at the head's socket)")

    # -- shared by every implementation ----------------------------------------------------

    def require(self, ref: str) -> ImageInfo:
        info = self.inspect(ref)
        if info is None:
            raise ImageNotFound(f"image {ref} is not present in the engine at {self.where}")
        return info

    def load_archive(self, pieces: list[Piece], on_bytes: OnBytes | None = None) -> int:
        """Load the archive made of ``pieces`` (ranges of files, read through their open
        descriptors, each checked against its sha256 when it has one, and literal
        bytes); returns the bytes sent."""
        total = sum(piece_size(p) for p in pieces)
        self.load(archive_chunks(pieces, on_bytes))
        return total
