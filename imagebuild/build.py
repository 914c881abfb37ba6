"""Realizing derivations through an engine: ``decide`` what each needs, ``execute`` it.

For each derivation of the closure, parents first: reuse it if an image with its input
hash exists (no build call at all); restore it if a backup holds that input hash (the
substituter); otherwise check every wheel against its locked sha256, stream a minimal
context (the Dockerfile and the small files it copies) to the engine while serving the
wheels to the build (wheelserve.py), and tag ``NAME:<hash12>`` only after the build
succeeded. Nothing here moves ``latest``: the build workflow promotes each image through
the gate (promote.py) as ``execute`` hands it over.
"""

from __future__ import annotations

import contextlib
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path

from . import __version__
from .backup import find_substitute, restore_backup
from .derivation import ContextFile, CopiedFile, Derivation
from .engine import Engine
from .errors import (
    BackupError,
    BuildFailed,
    EngineError,
    FileChanged,
    ImagebuildError,
    ImageNotFound,
    Interrupted,
    SpecError,
    UnresolvedHashError,
    WheelHashMismatch,
)
from .fsutil import PinnedFile
from .git import git_commit
from .image import ImageInfo
from .lock import check_wheel_digest
from .naming import (
    GIT_LABEL,
    HASH_LABEL,
    IMAGE_LABEL,
    VERSION_LABEL,
    WHEEL_LABEL_PREFIX,
    input_hash,
    short_id,
)
from .progress import Progress
from .render import WHEELS_ARG
from .spec import Spec
from .store import BackupDir
from .streams import FileRange, piece_chunks
from .wheelserve import WheelServer, preferred_port

LOG_TAIL = 25


# -- status of each derivation ---------------------------------------------------------------


class Action(Enum):
    REUSE = "reuse"  # an image with this input hash exists: no build at all
    RESTORE = "restore"  # a backup holds this input hash: load it (the substituter)
    BUILD = "build"


@dataclass(frozen=True)
class Step:
    derivation: Derivation
    action: Action
    image: ImageInfo | None = None  # the existing image, for REUSE
    substitute: str | None = None  # the backup tar's name in the store, for RESTORE
    substitute_from: str = ""  # where that tar is (a path or an ssh:// URL), for messages


def find_existing(engine: Engine, d: Derivation) -> ImageInfo | None:
    """The local image of derivation ``d``: by its tag, else by its input-hash label
    (its tag may have been removed while another tag kept the image). Read-only."""
    info = engine.inspect(d.tag)
    if info is not None and input_hash(info) == d.input_hash:
        return info
    assert d.input_hash is not None
    for other in engine.find_by_label(HASH_LABEL, d.input_hash):
        if other.labels.get(IMAGE_LABEL) == d.name:
            return other
    return None


def decide(engine: Engine, derivations: list[Derivation], rebuild: set[str],
           store: BackupDir | None = None) -> list[Step]:
    """Reuse what exists, restore what a backup holds (the substituter), build the rest."""
    steps: list[Step] = []
    for d in derivations:
        if d.input_hash is None:
            _ = d.tag  # raises UnresolvedHashError with the lock-step hint
        if d.name in rebuild:
            steps.append(Step(d, Action.BUILD))
            continue
        existing = find_existing(engine, d)
        if existing is not None:
            steps.append(Step(d, Action.REUSE, existing))
            continue
        assert d.input_hash is not None
        tar = find_substitute(store, d.name, d.input_hash) if store is not None else None
        steps.append(Step(d, Action.RESTORE, substitute=tar, substitute_from=f"{store}/{tar}")
                     if tar else Step(d, Action.BUILD))
    return steps


# -- the build context -------------------------------------------------------------------------


def preflight(spec: Spec, d: Derivation, stack: contextlib.ExitStack) -> dict[str, PinnedFile]:
    """Before the engine is touched: every context file is resolved, and every wheel is
    opened once and its bytes checked against wheels.lock through that descriptor. The
    build is served from the same descriptors (closed with ``stack``)."""
    unresolved = list(d.unresolved) or [w.filename for w in d.served if w.sha256 is None]
    unresolved += [f.arcname for f in d.context if f.sha256 is None and not unresolved]
    if unresolved:
        raise UnresolvedHashError(
            f"{d.name}: cannot build: {', '.join(unresolved)} unresolved where it was locked",
            hint="run 'imagebuild lock' where the wheels are (and every index answers), and "
                 "commit wheels.lock and locks/",
        )
    pinned: dict[str, PinnedFile] = {}
    for w in d.served:
        assert w.sha256 is not None
        try:
            f = PinnedFile.open(w.source)
        except FileNotFoundError:
            raise WheelHashMismatch(
                f"wheel {w.source} is missing",
                hint="put the locked wheel file in the spec's wheels directory") from None
        except OSError as exc:
            raise WheelHashMismatch(f"wheel {w.source} cannot be read: "
                                    f"{exc.strerror or exc}") from None
        stack.callback(f.close)
        check_wheel_digest(w.source, f.sha256(), w.sha256)
        pinned[w.filename] = f
    return pinned


def pin_files(d: Derivation, stack: contextlib.ExitStack) -> dict[str, PinnedFile]:
    """Before the engine is touched: every file the image declares, opened once and its
    bytes checked against the hash its input hash was computed from (a file changed
    since is refused: the image would not be the derivation its tag names)."""
    pinned: dict[str, PinnedFile] = {}
    for c in d.copied:
        if c.source is None:
            continue
        try:
            f = PinnedFile.open(c.source)
        except OSError as exc:
            raise FileChanged(f"{d.name}: {c.source} cannot be read: {exc.strerror or exc}",
                              hint="plan and build again") from None
        stack.callback(f.close)
        if f.sha256() != c.sha256:
            raise FileChanged(
                f"{d.name}: {c.source} changed after it was hashed; nothing was built",
                hint="build again once it is no longer being written (its new bytes are "
                     "a new input hash)")
        pinned[c.arcname] = f
    return pinned


def _tar_header(name: str, size: int, mode: int = 0o644,
                kind: bytes = tarfile.REGTYPE) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mode = mode
    ti.type = kind
    ti.mtime = 0
    ti.uname = ti.gname = "root"
    return ti.tobuf(format=tarfile.PAX_FORMAT)


def context_stream(files: tuple[ContextFile, ...], copied: tuple[CopiedFile, ...] = (),
                   pinned: dict[str, PinnedFile] | None = None) -> Iterator[bytes]:
    """The build context as a tar stream: the Dockerfile and the small generated files
    it copies (the wheels are served, not sent; see wheelserve.py), then the files the
    spec declares, streamed from their pinned descriptors and hashed as they pass (a
    file written to since ``pin_files`` stops the stream, and the build with it)."""
    for f in files:
        assert f.data is not None, f"{f.arcname} has no content"
        yield _tar_header(f.arcname, len(f.data))
        yield f.data
        pad = (-len(f.data)) % 512
        if pad:
            yield b"\0" * pad
    for c in copied:
        if c.source is None:
            yield _tar_header(c.arcname, 0, c.mode, tarfile.DIRTYPE)
            continue
        assert pinned is not None and c.sha256 is not None
        yield _tar_header(c.arcname, c.size, c.mode)
        try:
            yield from piece_chunks(FileRange(pinned[c.arcname], 0, c.size, c.sha256,
                                              str(c.source)))
        except BackupError as exc:  # damaged or truncated while it streamed
            raise FileChanged(f"{c.source} changed while it was sent to the engine: "
                              f"{exc.message.splitlines()[0]}", hint="build again") from None
        pad = (-c.size) % 512
        if pad:
            yield b"\0" * pad
    yield b"\0" * 1024


# -- labels --------------------------------------------------------------------------------------


def labels_for(d: Derivation, commit: str | None) -> dict[str, str]:
    assert d.input_hash is not None
    out = {HASH_LABEL: d.input_hash, IMAGE_LABEL: d.name, VERSION_LABEL: __version__}
    for w in d.wheels:
        out[WHEEL_LABEL_PREFIX + w.name] = f"{w.version} sha256:{w.sha256}"
    if commit:
        out[GIT_LABEL] = commit
    return out


def _dockerfile_string(value: str) -> str:
    """``value`` as a double-quoted Dockerfile word: backslash, quote and ``$`` escaped
    (LABEL substitutes variables); a line break or a control character is refused."""
    if any(ord(c) < 0x20 or c == "\x7f" for c in value):
        raise SpecError(f"a label would hold a control character: {value!r}",
                        hint="labels come from the spec and the lock; check their values")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


def label_instruction(labels: dict[str, str]) -> str:
    """One ``LABEL`` instruction for all of ``labels``. The classic builder turns each
    label given through the API into a step of its own, and every step is a commit: on
    the containerd store about 1.4 s each (8 labels: 11.8 s against 1.5 s for one
    instruction, measured on Docker 26.1)."""
    return "LABEL " + " ".join(f"{_dockerfile_string(k)}={_dockerfile_string(v)}"
                               for k, v in sorted(labels.items())) + "\n"


def labelled(files: tuple[ContextFile, ...], labels: dict[str, str]
             ) -> tuple[ContextFile, ...]:
    """The build context with the labels appended to its Dockerfile as one instruction
    (outside the input hash: the labels are derived from the derivation itself)."""
    out = []
    for f in files:
        if f.arcname == "Dockerfile":
            assert f.data is not None
            sep = b"" if f.data.endswith(b"\n") else b"\n"
            f = ContextFile(f.arcname, f.data + sep + label_instruction(labels).encode())
        out.append(f)
    return tuple(out)


# -- execution -----------------------------------------------------------------------------------


AfterEach = Callable[[Step, ImageInfo], bool]  # after each image: go on to the next?


@dataclass
class BuildReport:
    built: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    images: dict[str, ImageInfo] = field(default_factory=dict)
    stopped_after: str | None = None  # the image after which ``after_each`` stopped


def log_path(spec: Spec, d: Derivation) -> Path:
    return spec.state_dir / "logs" / f"{d.name}-{d.hash12}.log"


def execute(spec: Spec, engine: Engine, steps: list[Step], *, progress: Progress,
            rebuild: set[str] | None = None, store: BackupDir | None = None,
            after_each: AfterEach | None = None) -> BuildReport:
    """Realize every step in order (reuse, restore or build), tagging ``NAME:<hash12>``;
    ``after_each`` (the caller's gate) may stop the run. Never moves ``latest``."""
    report = BuildReport()
    by_name: dict[str, Derivation] = {s.derivation.name: s.derivation for s in steps}
    commit = git_commit(spec.root)
    total = len(steps)
    for i, step in enumerate(steps, 1):
        d = step.derivation
        prefix = f"[{i}/{total}] {d.name}"
        if step.action is Action.REUSE:
            assert step.image is not None
            if d.tag not in step.image.tags:  # found by label: put the tag back
                engine.tag(step.image.id, d.name, d.hash12)
            progress.say(f"{prefix} {d.hash12} reused (no build)")
            report.reused.append(d.name)
            report.images[d.name] = step.image
        elif step.action is Action.RESTORE:
            assert step.substitute is not None and store is not None
            progress.say(f"{prefix} {d.hash12} restoring from {step.substitute_from} "
                         f"(no build)")
            restored = restore_backup(engine, store, step.substitute, progress,
                                      expect_image=d.name)
            report.restored.append(d.name)
            report.images[d.name] = restored.info
        else:
            parent = by_name.get(d.parent) if d.parent else None
            info = _build_one(spec, engine, d, parent, commit, prefix, progress,
                              nocache=d.name in (rebuild or set()))
            report.built.append(d.name)
            report.images[d.name] = info
        if after_each is not None and not after_each(step, report.images[d.name]):
            report.stopped_after = d.name
            break
    return report


def _build_one(spec: Spec, engine: Engine, d: Derivation, parent: Derivation | None,
               commit: str | None, prefix: str, progress: Progress, nocache: bool) -> ImageInfo:
    with contextlib.ExitStack() as pins:
        pinned = preflight(spec, d, pins)
        files = pin_files(d, pins)
        return _build_checked(spec, engine, d, parent, commit, prefix, progress, nocache,
                              pinned, files)


def _build_checked(spec: Spec, engine: Engine, d: Derivation, parent: Derivation | None,
                   commit: str | None, prefix: str, progress: Progress, nocache: bool,
                   pinned: dict[str, PinnedFile], files: dict[str, PinnedFile]) -> ImageInfo:
    base = d.base_image_arg(parent)
    if parent is None and engine.inspect(base) is None:
        raise ImageNotFound(
            f"{d.name}: the base image {base} is not present in the engine",
            hint=f"docker pull {base} (builds never pull implicitly), then build again",
        )
    if d.served and not engine.on_this_host:
        raise EngineError(
            f"{d.name}: the engine at {engine.where} is not on this machine, so its build "
            f"cannot reach the wheels imagebuild serves on 127.0.0.1",
            hint="run imagebuild on the engine's host (the head node), with DOCKER_HOST "
                 "unset or a unix:// socket",
        )
    logfile = log_path(spec, d)
    logfile.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    progress.say(f"{prefix} {d.hash12} building (log: {logfile})")
    step_line = ""
    tail: list[str] = []
    image_id = ""
    error = ""
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(logfile.open("w", encoding="utf-8", buffering=1))
        buildargs = {"BASE_IMAGE": base}
        # always a server, at its stable address: an image with nothing to serve still
        # passes the same build arg, so the cache keys of the RUNs after it hold
        server = stack.enter_context(WheelServer(pinned, log=lambda m: print(m, file=log),
                                                 port=preferred_port(spec.state_dir)))
        buildargs[WHEELS_ARG] = server.url
        log.write(f"# imagebuild {__version__} build of {d.name} input hash {d.input_hash}\n"
                  f"# started {datetime.now(UTC).isoformat(timespec='seconds')}, "
                  + ", ".join(f"{k}={v}" for k, v in buildargs.items()) + "\n")
        events = engine.build(context_stream(labelled(d.context, labels_for(d, commit)),
                                             d.copied, files),
                              buildargs=buildargs, nocache=nocache)
        try:
            for ev in events:
                if ev.kind == "line":
                    log.write(ev.text)
                    for line in ev.text.splitlines():
                        if line.startswith("Step "):
                            step_line = line.strip()
                            progress.live(f"{prefix} {_short_step(step_line)}")
                        if line.strip():
                            tail.append(line.rstrip())
                    del tail[:-LOG_TAIL]
                elif ev.kind == "error":
                    error = ev.text
                    log.write(f"\nERROR: {ev.text}\n")
                elif ev.kind == "done":
                    image_id = ev.image_id
        except KeyboardInterrupt:
            events.close()
            log.write("\nINTERRUPTED\n")
            progress.say(f"{prefix} interrupted")
            raise Interrupted(
                f"build of {d.name} interrupted: no tag was written for it; images built "
                f"before it stay tagged and a rerun continues from there (log: {logfile})"
            ) from None
        except ImagebuildError as exc:
            log.write(f"\nERROR: {exc}\n")
            raise
        server.close()  # records a wheel that changed while it was served
        log.write(f"# wheel server: {server.bytes_sent} bytes sent\n")
    refused = list(server.refused)
    if error or not image_id or refused:
        why = "".join(f"  {r}\n" for r in refused)
        raise BuildFailed(
            f"{d.name}: build failed at {step_line or 'the first step'}\n"
            f"{why}  {error or 'the engine reported no image ID'}\n"
            f"  last lines of output:\n    " + "\n    ".join(tail[-12:])
            + f"\n  full log: {logfile}",
            hint="no tag was written for this image; images built before it stay reusable",
            log_tail="\n".join(tail),
        )
    engine.tag(image_id, d.name, d.hash12)
    info = engine.require(d.tag)
    progress.say(f"{prefix} {d.hash12} built in {time.monotonic() - started:.1f}s "
                 f"({short_id(info.id)})")
    return info


def _short_step(step: str) -> str:
    # "Step 4/7 : RUN uv pip install ..." -> "step 4/7: RUN uv pip install ..."
    head, _, rest = step.partition(" : ")
    return f"{head.lower()}: {rest}"
