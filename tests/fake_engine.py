"""An in-memory Docker engine for the unit tier: it implements ``imagebuild.engine.Engine``
so workflows run without a daemon. Never used by the integration tier.

It keeps images (typed ``ImageInfo``), tags and layer blobs; ``save`` writes a real
``docker save`` archive (classic layout) and ``load`` reads one back, or an OCI image
layout, honouring the stores' rules: the classic store skips a layer file that is absent
when its chain is present, the containerd store refuses a docker-save archive with a
layer file absent but imports an OCI layout whose present blobs are left out. A build
adds one layer (derived from the Dockerfile and the build args) on top of BASE_IMAGE.
Checks are answered by a ``responder`` the test gives.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tempfile
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from imagebuild.engine import (
    BuildEvent,
    ContainerInfo,
    Engine,
    EngineInfo,
    Job,
    OnLine,
    Receive,
    RunResult,
    Snapshot,
    StoreKind,
)
from imagebuild.errors import EngineError, ImageNotFound
from imagebuild.image import ImageInfo
from imagebuild.lock import parse_wheel
from imagebuild.naming import split_ref
from imagebuild.verify import _LIST_INSTALLED as LIST_INSTALLED

Responder = Callable[[ImageInfo, list[str]], RunResult]
# a build job: given the job, the root the upload was extracted into, and a line sink,
# writes what it makes under root + job.output and returns the exit code
JobRunner = Callable[[Job, Path, Callable[[str], None]], int]


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def ok(stdout: str = "") -> RunResult:
    return RunResult(exit_code=0, stdout=stdout, stderr="", timed_out=False)


def _chains(diff_ids: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else _sha(f"{out[-1]} {d}".encode()))
    return out


def dockerfile_labels(dockerfile: str) -> dict[str, str]:
    """The labels of a Dockerfile's LABEL instructions written as ``"k"="v" ...`` (what
    imagebuild appends), unescaped as Docker does."""
    import re

    out: dict[str, str] = {}
    word = r'"((?:[^"\\]|\\.)*)"'
    for line in dockerfile.splitlines():
        if line.startswith("LABEL "):
            for k, v in re.findall(word + "=" + word, line):
                out[re.sub(r"\\(.)", r"\1", k)] = re.sub(r"\\(.)", r"\1", v)
    return out


INSTALLED = b"\ninstalled:"


def _installs(tf: tarfile.TarFile) -> dict[str, str]:
    """name -> version of what the context's requirement files install."""
    out: dict[str, str] = {}
    for member in tf.getnames():  # the install groups' files, in install order
        if not (member.startswith("install-") and member.endswith(".txt")):
            continue
        f = tf.extractfile(member)
        assert f is not None
        for line in f.read().decode().splitlines():
            word = line.split()[0] if line.strip() else ""
            if " @ " in line:
                parsed = parse_wheel(line.split(" @ ", 1)[1].split()[0].rsplit("/", 1)[-1])
                out[parsed.name] = parsed.version
            elif "==" in word:
                name, _, version = word.partition("==")
                out[name] = version
    return out


@dataclass
class FakeEngine(Engine):
    name: str = "fake"
    store: StoreKind = "classic"
    local: bool = True
    responder: Responder = field(default=lambda image, cmd: ok())
    images: dict[str, ImageInfo] = field(default_factory=dict)  # by ID
    blobs: dict[str, bytes] = field(default_factory=dict)  # layer bytes by diff ID
    builds: list[str] = field(default_factory=list)  # org.imagebuild.image of each build
    fail_builds: set[str] = field(default_factory=set)
    checks_run: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    loads: int = 0
    saves: list[tuple[str, ...]] = field(default_factory=list)  # the refs of each save
    broken: str | None = None  # when set, every call fails with this message
    containers: dict[str, ContainerInfo] = field(default_factory=dict)  # by name
    clock: int = 0  # creation times of containers, in order
    job_runner: JobRunner | None = None  # what a build job does (None: jobs are refused)
    jobs: list[Job] = field(default_factory=list)

    # -- the interface -----------------------------------------------------------------------

    @property
    def where(self) -> str:
        return f"fake://{self.name}"

    @property
    def on_this_host(self) -> bool:
        return self.local

    def _check(self) -> None:
        if self.broken is not None:
            raise EngineError(f"{self.name}: {self.broken}")

    def info(self) -> EngineInfo:
        self._check()
        return EngineInfo(store=self.store, driver="fake", version="0")

    def snapshot(self) -> Snapshot:
        return Snapshot(self.info(), tuple(self.images.values()),
                        tuple(self.holders("org.imagebuild.root")))

    def inspect(self, ref: str) -> ImageInfo | None:
        self._check()
        if ref in self.images:
            return self.images[ref]
        repo, tag = split_ref(ref)
        for info in self.images.values():
            if f"{repo}:{tag}" in info.tags:
                return info
        return None

    def find_by_label(self, key: str, value: str) -> list[ImageInfo]:
        self._check()
        return [i for i in self.images.values() if i.labels.get(key) == value]

    def tag(self, image_id: str, repository: str, tag: str) -> None:
        self._check()
        info = self.inspect(image_id)
        if info is None:
            raise EngineError(f"no image {image_id} to tag")
        ref = f"{repository}:{tag}"
        self._untag(ref)
        self.images[info.id] = _with_tags(self.images[info.id], (*self.images[info.id].tags,
                                                                 ref))

    def _untag(self, ref: str) -> None:
        for iid, other in list(self.images.items()):
            if ref in other.tags:
                self.images[iid] = _with_tags(other, tuple(t for t in other.tags if t != ref))

    def remove_image(self, ref: str) -> None:
        self._check()
        info = self.inspect(ref)
        if info is None:
            return
        in_use = any(c.image_id == info.id for c in self.containers.values())
        if ref in info.tags and (len(info.tags) > 1 or in_use):
            self._untag(ref)
        elif in_use:
            raise EngineError(f"conflict: image {ref} is being used by a container")
        else:
            del self.images[info.id]

    def save(self, *refs: str) -> Iterator[bytes]:
        self._check()
        self.saves.append(refs)
        buf = io.BytesIO()
        manifest = []
        files: dict[str, bytes] = {}
        for ref in refs:
            info = self.inspect(ref)
            if info is None:
                raise ImageNotFound(f"image {ref} is not present")
            config = _config_bytes(info)
            cfg_name = _sha(config).removeprefix("sha256:") + ".json"
            names = [_sha(f"{d}{i}".encode()).removeprefix("sha256:") + "/layer.tar"
                     for i, d in enumerate(info.diff_ids)]  # a v1 id per layer, as Docker's
            tags = [ref] if ":" in ref and not ref.startswith("sha256:") else []
            manifest.append({"Config": cfg_name, "RepoTags": tags, "Layers": names})
            files[cfg_name] = config
            for name, diff in zip(names, info.diff_ids, strict=True):
                files[name] = self.blobs[diff]  # a layer two images share comes once
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for name, data in files.items():
                _add(tf, name, data)
            _add(tf, "manifest.json", json.dumps(manifest).encode())
        data = buf.getvalue()
        for i in range(0, len(data), 4096):
            yield data[i:i + 4096]

    def load(self, chunks: Iterable[bytes]) -> list[str]:
        self._check()
        data = b"".join(chunks)
        self.loads += 1
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            files = {m.name: tf.extractfile(m).read()  # type: ignore[union-attr]
                     for m in tf if m.isfile()}
        if "index.json" in files:
            return self._load_oci(files)
        return self._load_docker(files)

    def _load_docker(self, files: dict[str, bytes]) -> list[str]:
        [entry] = json.loads(files["manifest.json"])
        config = json.loads(files[entry["Config"]])
        diff_ids = tuple(config["rootfs"]["diff_ids"])
        for name, diff in zip(entry["Layers"], diff_ids, strict=True):
            if name in files:
                self._add_blob(diff, files[name])
            elif self.store == "containerd":
                raise EngineError(f"failed to resolve layers: layer {name} not found")
            elif diff not in self.blobs:
                raise EngineError(f"layer {name} is missing and not present")
        return self._register(config, diff_ids, entry.get("RepoTags") or [])

    def _load_oci(self, files: dict[str, bytes]) -> list[str]:
        index = json.loads(files["index.json"])
        [desc] = index["manifests"]
        manifest = json.loads(files["blobs/sha256/" + desc["digest"].removeprefix("sha256:")])
        config = json.loads(files["blobs/sha256/"
                                  + manifest["config"]["digest"].removeprefix("sha256:")])
        for layer in manifest["layers"]:
            blob = files.get("blobs/sha256/" + layer["digest"].removeprefix("sha256:"))
            if blob is not None:
                self._add_blob(layer["digest"], blob)
            elif layer["digest"] not in self.blobs:
                raise EngineError(f"content digest {layer['digest']} not found")
        ref = desc["annotations"]["io.containerd.image.name"].removeprefix("docker.io/library/")
        return self._register(config, tuple(config["rootfs"]["diff_ids"]), [ref])

    def _add_blob(self, diff: str, blob: bytes) -> None:
        if _sha(blob) != diff:
            raise EngineError(f"layer {diff} does not match its content")
        self.blobs[diff] = blob

    def _register(self, config: dict[str, object], diff_ids: tuple[str, ...],
                  tags: list[str]) -> list[str]:
        cfg = config["config"]
        assert isinstance(cfg, dict)
        info = self._image(diff_ids, cfg, size=sum(len(self.blobs[d]) for d in diff_ids))
        for ref in tags:
            self.tag(info.id, *split_ref(ref))
        return [f"Loaded image ID: {info.id}"]

    def _image(self, diff_ids: tuple[str, ...], cfg: dict[str, object], size: int
               ) -> ImageInfo:
        labels = cfg.get("Labels") or {}
        assert isinstance(labels, dict)
        config = {k: cfg.get(k) for k in ("Env", "Cmd", "Entrypoint", "Labels", "WorkingDir",
                                          "User", "ExposedPorts", "Volumes")}
        material = json.dumps({"c": config, "d": list(diff_ids)}, sort_keys=True).encode()
        image_id = _sha((b"ctrd" if self.store == "containerd" else b"") + material)
        old = self.images.get(image_id)
        info = ImageInfo(id=image_id, tags=old.tags if old else (), labels=dict(labels),
                         diff_ids=diff_ids, size=size, created="", config=config)
        self.images[image_id] = info
        return info

    def build(self, context: Iterable[bytes], *, buildargs: dict[str, str],
              nocache: bool = False) -> Generator[BuildEvent, None, None]:
        self._check()
        data = b"".join(context)
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            dockerfile = tf.extractfile("Dockerfile").read()  # type: ignore[union-attr]
            installs = _installs(tf)
        labels = dockerfile_labels(dockerfile.decode())
        name = labels.get("org.imagebuild.image", "?")
        self.builds.append(name)
        yield BuildEvent("line", text="Step 1/2 : FROM ${BASE_IMAGE}\n")
        if name in self.fail_builds:
            yield BuildEvent("line", text="Step 2/2 : RUN false\n")
            yield BuildEvent("error", text="The command returned a non-zero code: 1")
            return
        parent = self.inspect(buildargs["BASE_IMAGE"])
        if parent is None:
            yield BuildEvent("error", text=f"pull access denied for {buildargs['BASE_IMAGE']}")
            return
        layer = (b"layer of " + dockerfile + json.dumps(sorted(labels.items())).encode()
                 + INSTALLED + json.dumps(installs).encode())
        diff = _sha(layer)
        self.blobs[diff] = layer
        cfg = dict(parent.config)
        cfg["Labels"] = {**(parent.labels or {}), **labels}
        info = self._image((*parent.diff_ids, diff), cfg, parent.size + len(layer))
        yield BuildEvent("line", text="Step 2/2 : RUN install\n")
        yield BuildEvent("done", image_id=info.id)

    def run_check(self, image: str, command: list[str], timeout: float) -> RunResult:
        self._check()
        info = self.inspect(image)
        if info is None:
            raise ImageNotFound(f"image {image} is not present")
        self.checks_run.append((info.id, tuple(command)))
        if command[-1] == LIST_INSTALLED:  # the closure check: what the layers installed
            return ok(" ".join(f"{n}=={v}" for n, v in sorted(self.installed(info).items())))
        return self.responder(info, command)

    def run_job(self, job: Job, upload: Iterable[bytes], on_line: OnLine,
                receive: Receive) -> int:
        """The upload extracted into a scratch root, ``job_runner`` run on it, and the
        output directory handed back as a tar named like docker's (``out/...``)."""
        self._check()
        if self.inspect(job.image) is None:
            raise ImageNotFound(f"image {job.image} is not present")
        if self.job_runner is None:
            raise EngineError(f"{self.name}: this fake engine runs no jobs")
        self.jobs.append(job)
        with tempfile.TemporaryDirectory(prefix="fake-job-") as tmp:
            root = Path(tmp)
            with tarfile.open(fileobj=io.BytesIO(b"".join(upload)), mode="r:") as tf:
                tf.extractall(root, filter="tar")
            code = self.job_runner(job, root, on_line)
            if code == 0:
                out = root / job.output.lstrip("/")
                buf = io.BytesIO()
                with tarfile.open(fileobj=buf, mode="w") as tf:
                    tf.add(out, arcname=out.name)
                receive(iter([buf.getvalue()]))
            return code

    def installed(self, info: ImageInfo) -> dict[str, str]:
        """The distributions the image's layers installed (a simulated build records the
        install steps' requirement files in its layer)."""
        out: dict[str, str] = {}
        for diff in info.diff_ids:
            _, sep, listing = self.blobs.get(diff, b"").partition(INSTALLED)
            if sep:
                out.update(json.loads(listing))
        return out

    def holders(self, label: str) -> list[ContainerInfo]:
        self._check()
        key, _, value = label.partition("=")
        return [c for c in self.containers.values()
                if key in c.labels and (not value or c.labels[key] == value)]

    def hold(self, name: str, ref: str, labels: dict[str, str]) -> ContainerInfo:
        self._check()
        info = self.inspect(ref)
        if info is None:
            raise ImageNotFound(f"image {ref} is not present")
        if name in self.containers:
            raise EngineError(f"the container name {name} is already in use")
        self.clock += 1
        c = ContainerInfo(id=hashlib.sha256(name.encode() + bytes([self.clock % 256])
                                            ).hexdigest(),
                          name=name, image_id=info.id, image_ref=ref, labels=dict(labels),
                          running=True, created=f"2026-11-23T00:00:{self.clock:06d}Z")
        self.containers[name] = c
        return c

    def remove_container(self, ref: str) -> None:
        self._check()
        for name, c in list(self.containers.items()):
            if ref in (name, c.id):
                del self.containers[name]

    def disk_usage(self) -> int:
        return sum(len(self.blobs[d]) for d in {d for i in self.images.values()
                                                 for d in i.diff_ids})

    def prune_all(self, system: bool = False) -> None:
        """What ``docker image prune -a`` (``system``: ``docker system prune -a``) does,
        as measured on Docker 20.10's classic store: stopped containers go first
        (system), then every image no container uses; an image in use loses every tag
        but its lexically last one."""
        if system:
            for name in [n for n, c in self.containers.items() if not c.running]:
                del self.containers[name]
        used = {c.image_id for c in self.containers.values()}
        for iid, info in list(self.images.items()):
            if iid not in used:
                del self.images[iid]
            elif len(info.tags) > 1:
                self.images[iid] = _with_tags(info, (sorted(info.tags)[-1],))

    # -- for tests -----------------------------------------------------------------------------

    def add_base(self, ref: str, layers: list[bytes]) -> ImageInfo:
        """An imported base image, like the bed's debootstrapped one."""
        diffs = []
        for blob in layers:
            self.blobs[_sha(blob)] = blob
            diffs.append(_sha(blob))
        info = self._image(tuple(diffs), {"Cmd": ["/bin/bash"], "Labels": {}},
                           sum(map(len, layers)))
        self.tag(info.id, *split_ref(ref))
        return self.images[info.id]

    def chains(self) -> set[str]:
        return {c for i in self.images.values() for c in _chains(i.diff_ids)}


def _with_tags(info: ImageInfo, tags: tuple[str, ...]) -> ImageInfo:
    return ImageInfo(id=info.id, tags=tuple(dict.fromkeys(tags)), labels=info.labels,
                     diff_ids=info.diff_ids, size=info.size, created=info.created,
                     config=info.config)


def _config_bytes(info: ImageInfo) -> bytes:
    return json.dumps({"config": info.config,
                       "rootfs": {"type": "layers", "diff_ids": list(info.diff_ids)}},
                      sort_keys=True).encode()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))
