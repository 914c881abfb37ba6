"""Images into a registry, straight from the layer store: the first half of
``distribute --via registry`` (the workers then pull, distribute.py).

For each image, parents first: its layers and config are put into ``REGISTRY/REPO``
through the registry's HTTP API (registry.py). A blob the repository already has is
skipped after a ``HEAD``; one that another repository of the same registry holds (a
parent image's layers, put earlier in this run or before) is mounted, not sent; any
other is sent uncompressed, exactly as the layer store keeps it, from the generation's
file, hashed as it streams (a damaged layer stops the upload; the registry checks the
digest as well). The manifest goes last, under the tag ``<hash12>``: until every blob
is in, the registry names nothing, and no worker is asked to pull. Nothing is gzipped:
a registry on the cluster's fabric is faster fed raw bytes than compressed ones, and
``docker push``'s single-threaded gzip is exactly what this path avoids.

``ensure_registry`` answers "is it there?" and, when the spec says ``start: true``,
starts CNCF distribution (``docker-registry`` from Debian) on this host and leaves it
running for the next run.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace

from .distribute import Item, oci_image
from .errors import RegistryError
from .fsutil import atomic_write_text
from .progress import Progress
from .registry import RegistryClient, docker_credentials
from .remote import process_alive, start_detached
from .spec import Registry
from .streams import piece_chunks

START_WAIT = 30  # seconds a started registry has to answer
REGISTRY_PROGRAMS = ("docker-registry", "registry")  # Debian's name, upstream's name


@dataclass
class Published:
    """What putting one image into the registry took."""

    name: str
    ref: str  # REGISTRY/REPO@sha256:... as the workers pull it
    blobs: int = 0
    present: int = 0  # already in the repository
    mounted: int = 0  # taken from another repository of the registry
    uploaded: int = 0
    bytes_uploaded: int = 0
    bytes_total: int = 0  # every blob of the image, as the registry holds them
    seconds: float = 0.0


@dataclass
class PublishResult:
    registry: str
    images: list[Published] = field(default_factory=list)
    started: str = ""  # "pid N" when this run started the registry
    dry_run: bool = False

    @property
    def bytes_uploaded(self) -> int:
        return sum(p.bytes_uploaded for p in self.images)

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.images)

    def to_json(self) -> dict[str, object]:
        return {"registry": self.registry, "started": self.started,
                "bytes_uploaded": self.bytes_uploaded, "seconds": round(self.seconds, 3),
                "images": [asdict(p) for p in self.images]}

    def lines(self) -> list[str]:
        """What the upload did, for the command's output."""
        out = [f"registry {self.registry}: started here, {self.started}"] if self.started else []
        verb = "would upload" if self.dry_run else "uploaded"
        out.append(f"registry {self.registry}: {verb} {self.bytes_uploaded / 1e6:,.1f} MB"
                   + ("" if self.dry_run else f" in {self.seconds:.1f}s"))
        return out


def client_for(reg: Registry) -> RegistryClient:
    return RegistryClient(reg.address, tls=reg.tls, credentials=docker_credentials(reg.address))


NOT_STARTED = "not running (a run that is not a dry run starts it)"


def ensure_registry(reg: Registry, client: RegistryClient, progress: Progress,
                    dry_run: bool = False) -> str:
    """Check the registry answers its API; start it first when the spec says
    ``start: true`` and it does not. Returns "pid N" when it was started here, and
    ``NOT_STARTED`` for a dry run that would have started it."""
    try:
        client.ping()
        return ""
    except RegistryError:
        if not reg.start:
            raise
    if dry_run:
        return NOT_STARTED
    assert reg.storage is not None
    home = reg.storage.parent / "registry-run"
    pidfile = home / "registry.pid"
    if pidfile.is_file():
        text = pidfile.read_text().strip()
        if text.isdigit() and process_alive(int(text), str(home / "config.yml")):
            raise RegistryError(f"the registry this host started (pid {text}) runs but does "
                                f"not answer at {reg.address}",
                                hint=f"see {home / 'registry.log'}; stop it (kill {text}) and "
                                     f"run the command again")
    program = next((p for name in REGISTRY_PROGRAMS if (p := shutil.which(name))), None)
    if program is None:
        raise RegistryError("registry.start is true but no registry program is installed",
                            hint="apt-get install docker-registry (CNCF distribution)")
    reg.storage.mkdir(parents=True, exist_ok=True)
    config = {  # JSON is YAML: nothing from the spec can add a key
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(reg.storage)},
                    "delete": {"enabled": True}},
        "http": {"addr": reg.address},
    }
    atomic_write_text(home / "config.yml", json.dumps(config, indent=2) + "\n")
    pid = start_detached([program, "serve", str(home / "config.yml")], home / "registry.log")
    atomic_write_text(pidfile, f"{pid}\n")
    progress.say(f"started a registry at {reg.address} (pid {pid}, storage {reg.storage}, "
                 f"log {home / 'registry.log'}); it keeps running for later runs")
    deadline = time.monotonic() + START_WAIT
    while True:
        try:
            client.ping()
            return f"pid {pid}"
        except RegistryError as exc:
            if time.monotonic() > deadline or not process_alive(pid, str(home)):
                raise RegistryError(f"the registry started at {reg.address} (pid {pid}) did "
                                    f"not answer: {exc.message}",
                                    hint=f"see {home / 'registry.log'}") from None
            time.sleep(0.2)


def publish(client: RegistryClient, reg: Registry, items: list[Item], progress: Progress,
            parent_of: Mapping[str, str | None], dry_run: bool = False,
            empty: bool = False) -> tuple[list[Item], PublishResult]:
    """Put every item into the registry (parents first); returns the items with the
    reference each worker pulls, and what it took. A blob is mounted from the
    repository known to have it, else from the image's parent's repository (where the
    registry has it if the parent was put before). With ``dry_run`` only asks which
    blobs are missing; with ``empty`` as well (a registry not started yet) asks nothing and
    counts every blob."""
    result = PublishResult(registry=reg.address, dry_run=dry_run)
    where: dict[str, str] = {}  # digest -> a repository of this registry that has it
    out: list[Item] = []
    for item in items:
        parent = parent_of.get(item.name)
        pub, item = _publish_one(client, reg, item, where,
                                 reg.repo(parent) if parent else "", progress,
                                 dry_run, empty and dry_run)
        result.images.append(pub)
        out.append(item)
    return out, result


def _publish_one(client: RegistryClient, reg: Registry, item: Item, where: dict[str, str],
                 parent_repo: str, progress: Progress, dry_run: bool, empty: bool
                 ) -> tuple[Published, Item]:
    repo = reg.repo(item.name)
    image = oci_image(item.archive, item.info.diff_ids)
    ref = f"{reg.address}/{repo}@{image.digest}"
    pub = Published(name=item.name, ref=ref)
    started = time.monotonic()
    meter = progress.meter(f"{item.name} into the registry",
                           sum(m.size for _d, m in image.blobs_from(0)))
    blobs = [*image.blobs_from(0), (image.config_digest, None)]
    pub.blobs = len(blobs)
    for digest, member in blobs:
        size = member.size if member is not None else len(image.config)
        pub.bytes_total += size
        if not empty and client.has_blob(repo, digest):
            pub.present += 1
            where[digest] = repo
            meter.add(size)
            continue
        if dry_run:
            pub.uploaded += 1
            pub.bytes_uploaded += size
            continue
        source = where.get(digest, parent_repo)
        chunks = piece_chunks(member.data()) if member is not None else iter([image.config])
        if client.upload_blob(repo, digest, size, chunks, mount_from=source,
                              on_bytes=meter.add):
            pub.uploaded += 1
            pub.bytes_uploaded += size
        else:
            pub.mounted += 1
            meter.add(size)
        where[digest] = repo
    tag = item.hash_tag.rpartition(":")[2]
    if not dry_run:
        client.put_manifest(repo, tag, image.manifest, image.digest, image.media_type)
    pub.seconds = time.monotonic() - started
    progress.end_live()
    verb = "would upload" if dry_run else "uploaded"
    progress.say(f"{item.name}: {verb} {pub.uploaded} of {pub.blobs} blobs "
                 f"({pub.bytes_uploaded / 1e6:,.1f} MB) to {reg.address}/{repo}:{tag}; "
                 f"{pub.present} present, {pub.mounted} mounted"
                 + ("" if dry_run else f", in {pub.seconds:.1f}s"))
    return pub, replace(item, pull=ref, oci=image)
