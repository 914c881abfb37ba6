"""Realizing wheel derivations: reuse a wheel the store holds, or build it from source.

For each wheel built from source: if the wheel store has a wheel for its input hash,
that wheel is used and nothing is fetched or run. Otherwise the source is brought into a
local mirror (``<state>/git``; fetched only when the commit is not there yet), checked
out at the commit in a scratch directory, the patches applied in order, and the tree
streamed as a tar into a throwaway container of the builder image, which runs the build
command with ``SOURCE_DATE_EPOCH`` set to the commit time and a persistent ccache volume.
When the command succeeds, its output directory is streamed back, and the one wheel in
it is checked (name, version, tags for the spec's target), hashed, and moved into the
store; only then is the derivation recorded. Every failure raises ``WheelBuildFailed``
(exit 5) with the last lines and the log, and records nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from . import __version__, web
from .engine import Engine, Job
from .errors import (
    ImagebuildError,
    ImageNotFound,
    Interrupted,
    LockError,
    WheelBuildFailed,
    WheelHashMismatch,
)
from .git import checkout_source
from .lock import BUILT_PREFIX, WHEEL_FILE, Lock, LockedWheel, parse_wheel
from .progress import Progress
from .remote import Completed
from .resolve import requires_dist, wheel_metadata
from .spec import BUILD_CCACHE, BUILD_OUT, BUILD_SRC, Spec
from .wheelplan import WheelDerivation, wheel_problem
from .wheelstore import Stored, WheelRecord, WheelStore

CCACHE_VOLUME = "imagebuild-ccache"
JOB_LABEL = "org.imagebuild.wheel-build"  # on the throwaway build containers: the wheel
LOG_TAIL = 25
CHUNK = 1 << 20
FETCH_TIMEOUT = 300  # seconds without a byte before a download of a prebuilt wheel gives up


@dataclass(frozen=True)
class WheelOutcome:
    derivation: WheelDerivation
    record: WheelRecord
    built: bool  # False: the store already had it (no fetch, no build)


def mirror_path(spec: Spec, url: str) -> Path:
    """The local bare mirror of a git URL."""
    return spec.state_dir / "git" / (hashlib.sha256(url.encode()).hexdigest()[:16] + ".git")


def log_path(spec: Spec, d: WheelDerivation) -> Path:
    return spec.state_dir / "logs" / f"wheel-{d.name}-{d.hash12}.log"


def realize_wheels(spec: Spec, engine: Engine, planned: Stored, progress: Progress
                   ) -> list[WheelOutcome]:
    """Each derivation's wheel: the one the store held when it was planned (its record),
    or built (in order; the first failure stops and raises)."""
    store = WheelStore(spec.wheel_store)
    out: list[WheelOutcome] = []
    for i, (d, record) in enumerate(planned, 1):
        prefix = f"[wheel {i}/{len(planned)}] {d.name}"
        if record is not None:
            progress.say(f"{prefix} {d.hash12} reused: {record.filename}")
            _builder_moved(engine, d, record, progress, prefix)
            out.append(WheelOutcome(d, record, built=False))
            continue
        record = build_wheel(spec, engine, store, d, progress, prefix)
        out.append(WheelOutcome(d, record, built=True))
    return out


def _builder_moved(engine: Engine, d: WheelDerivation, record: WheelRecord,
                   progress: Progress, prefix: str) -> None:
    """Say so when a builder named by tag alone now names another image than the one
    that built the stored wheel (the tag is its identity in the hash, not its content)."""
    b = d.build
    if b.builder_digest is not None:
        return
    now = engine.inspect(b.builder)
    if now is not None and now.id != record.builder_id:
        progress.say(f"{prefix} warning: {b.builder} is now image {now.id[7:19]}, the wheel "
                     f"was built by {record.builder_id[7:19]}; it is reused because the "
                     f"builder's tag is its identity. Pin builder_digest, or change the tag "
                     f"when the builder changes")


class _Log:
    """One wheel build's log file and the tail of it that an error shows."""

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = path, name
        self.tail: list[str] = []
        self.file = path.open("w", encoding="utf-8", buffering=1)

    def line(self, text: str) -> None:
        self.file.write(text + "\n")
        if text.strip():
            self.tail.append(text.rstrip())
            del self.tail[:-LOG_TAIL]

    def output(self, done: Completed) -> None:
        for text in (done.stderr or done.stdout).splitlines():
            self.line(text)

    def failed(self, what: str, hint: str) -> WheelBuildFailed:
        shown = "".join(f"\n    {t}" for t in self.tail[-12:])
        return WheelBuildFailed(
            f"{self.name}: {what}" + (f"\n  last lines of output:{shown}" if shown else "")
            + f"\n  full log: {self.path}",
            hint=hint + "; nothing was recorded in the wheel store",
            log_tail="\n".join(self.tail))


def build_wheel(spec: Spec, engine: Engine, store: WheelStore, d: WheelDerivation,
                progress: Progress, prefix: str = "", logfile: Path | None = None,
                use_ccache: bool = True) -> WheelRecord:
    """Fetch, patch and build one wheel; store it and record its derivation.
    ``use_ccache=False`` compiles everything again (the cache is not an input: a
    reproducibility check must not take its objects from it)."""
    prefix = prefix or d.name
    b = d.build
    path = logfile or log_path(spec, d)
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    progress.say(f"{prefix} {d.hash12} building from {b.commit[:12]} (log: {path})")
    log = _Log(path, d.name)
    with log.file, contextlib.ExitStack() as stack:
        log.file.write(f"# imagebuild {__version__} build of wheel {d.name} input hash "
                       f"{d.input_hash}\n# started "
                       f"{datetime.now(UTC).isoformat(timespec='seconds')}, source {b.git} "
                       f"at {b.commit}, builder {b.builder_reference}\n")
        try:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix="wheel-", dir=_tmp_dir(spec))))
            tree = scratch / "src"
            epoch = _source(spec, d, tree, progress, prefix, log)
            source_tar = scratch / "source.tar"
            size = write_source_tar(tree, source_tar, epoch)
            progress.say(f"{prefix} sending the source ({size / 1e6:,.1f} MB) to "
                         f"{b.builder_reference}")
            record = _run(spec, engine, store, d, source_tar, epoch, log, progress, prefix,
                          started, use_ccache)
        except KeyboardInterrupt:
            log.file.write("\nINTERRUPTED\n")
            raise Interrupted(f"build of wheel {d.name} interrupted: nothing was recorded "
                              f"(log: {path})") from None
        except WheelBuildFailed as exc:
            log.file.write(f"\nFAILED: {exc.message}\n")
            raise
        except ImagebuildError as exc:
            log.file.write(f"\nERROR: {exc}\n")
            raise
    progress.say(f"{prefix} {d.hash12} built in {record.seconds:.1f}s: {record.filename}")
    return record


def _tmp_dir(spec: Spec) -> Path:
    path = spec.state_dir / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _source(spec: Spec, d: WheelDerivation, tree: Path, progress: Progress, prefix: str,
            log: _Log) -> int:
    """The wheel's source at ``tree`` (its commit, patched), through the local mirror
    (fetched only when it lacks the commit); returns the commit's time."""
    b = d.build
    mirror = mirror_path(spec, b.git)
    src = checkout_source(b.git, mirror, b.commit, b.patches, tree,
                          on_fetch=lambda url: progress.say(f"{prefix} fetching {url}"),
                          mirror_for=((lambda url: mirror_path(spec, url))
                                      if b.submodules else None))
    if not src.fetched:
        log.line(f"# {b.commit} is in the mirror {mirror}: no fetch")
    for sub in src.submodules:
        log.line(f"# submodule {sub}")
    for name in src.applied:
        log.line(f"# patch {name}: applied")
    if src.failed == "patch":
        log.line(f"# patch {src.patch.name if src.patch else '?'}: does NOT apply")
    if src.output is not None and src.failed:
        log.output(src.output)
    if src.failed == "fetch":
        why = "timed out" if src.output is not None and src.output.code is None else "failed"
        raise log.failed(f"fetching {b.git} {why}",
                         hint="check the URL and the network; git never prompts here, so a "
                              "private repository needs an ssh key or a credential helper")
    if src.failed == "commit":
        raise log.failed(f"commit {b.commit} is not in {b.git}",
                         hint="check the wheel's commit in wheels.build: pin a commit the "
                              "repository has (git ls-remote lists its branches and tags)")
    if src.failed == "time":
        raise log.failed(f"cannot read the time of commit {b.commit}",
                         hint=f"the local mirror may be damaged: remove {mirror} and run "
                              f"again")
    if src.failed == "checkout":
        raise log.failed(f"cannot check out {b.commit}", hint=f"see {log.path}")
    if src.failed == "submodule":
        raise log.failed(f"submodule {src.why}",
                         hint="the source's .gitmodules names where each submodule is "
                              "fetched from, and its commit pins theirs: check that URL and "
                              "the network (submodules: false in the spec skips them)")
    if src.failed == "patch":
        raise log.failed(f"patch {src.patch} does not apply to {b.commit[:12]}",
                         hint="refresh the patch against this commit (git diff in a "
                              "checkout of it) or pin the commit it was made for")
    assert src.epoch is not None
    return src.epoch


def write_source_tar(tree: Path, dest: Path, epoch: int) -> int:
    """A deterministic tar of ``tree`` (with its .git) under BUILD_SRC, and an empty
    BUILD_OUT: sorted, owned by root, every mtime the commit time. Written to disk, so
    it streams to the engine with flat memory. Returns its size."""
    src, out = BUILD_SRC.lstrip("/"), BUILD_OUT.lstrip("/")

    def info(name: str, kind: bytes, mode: int, size: int = 0) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.size, ti.mtime = kind, mode, size, epoch
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = "root"
        return ti

    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tf:
        parts = Path(src).parts
        for i in range(1, len(parts) + 1):
            tf.addfile(info("/".join(parts[:i]), tarfile.DIRTYPE, 0o755))
        tf.addfile(info(out, tarfile.DIRTYPE, 0o777))  # any builder user may write here
        for root, dirs, files in os.walk(tree):
            dirs.sort()
            rel = Path(root).relative_to(tree)
            base = src if rel == Path(".") else f"{src}/{rel.as_posix()}"
            if rel != Path("."):
                tf.addfile(info(base, tarfile.DIRTYPE, 0o755))
            for name in sorted(files):
                path = Path(root) / name
                st = path.lstat()
                if path.is_symlink():
                    ti = info(f"{base}/{name}", tarfile.SYMTYPE, 0o777)
                    ti.linkname = os.readlink(path)
                    tf.addfile(ti)
                    continue
                mode = 0o755 if st.st_mode & 0o111 else 0o644
                with path.open("rb") as f:
                    tf.addfile(info(f"{base}/{name}", tarfile.REGTYPE, mode, st.st_size), f)
            for name in list(dirs):
                if (Path(root) / name).is_symlink():  # os.walk does not descend into them
                    dirs.remove(name)
                    ti = info(f"{base}/{name}", tarfile.SYMTYPE, 0o777)
                    ti.linkname = os.readlink(Path(root) / name)
                    tf.addfile(ti)
    return dest.stat().st_size


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def _run(spec: Spec, engine: Engine, store: WheelStore, d: WheelDerivation, source_tar: Path,
         epoch: int, log: _Log, progress: Progress, prefix: str, started: float,
         use_ccache: bool) -> WheelRecord:
    """Run the build job; check, hash and store the one wheel it made."""
    b = d.build
    env = (*b.env, ("SOURCE_DATE_EPOCH", str(epoch)), ("CCACHE_DIR", BUILD_CCACHE),
           ("IMAGEBUILD_SRC", BUILD_SRC), ("IMAGEBUILD_OUT", BUILD_OUT),
           *(() if use_ccache else (("CCACHE_DISABLE", "1"),)))
    job = Job(image=b.builder_reference, command=b.command, env=tuple(sorted(env)),
              workdir=BUILD_SRC, output=BUILD_OUT, labels=((JOB_LABEL, d.name),),
              volumes=((CCACHE_VOLUME, BUILD_CCACHE),))
    builder = engine.inspect(b.builder_reference)
    if builder is None:
        raise ImageNotFound(
            f"{d.name}: the builder image {b.builder_reference} is not present in the engine "
            f"at {engine.where}",
            hint=f"docker pull {b.builder_reference} (or build it), then run again: builds "
                 "never pull implicitly; nothing was recorded")
    log.line(f"# builder {b.builder_reference} is image {builder.id}")
    last = [time.monotonic()]

    def on_line(line: str) -> None:
        log.line(line)
        now = time.monotonic()
        if line.strip() and now - last[0] >= progress.interval:
            last[0] = now
            progress.live(f"{prefix} {now - started:,.0f}s: {line.strip()[:100]}")

    with store.incoming() as incoming:
        output_tar = incoming / "output.tar"

        def receive(stream: Iterator[bytes]) -> None:
            with output_tar.open("wb") as f:
                for chunk in stream:
                    f.write(chunk)

        code = engine.run_job(job, _chunks(source_tar), on_line, receive)
        progress.end_live()
        if code != 0:
            raise log.failed(f"the build command exited with {code} in {b.builder_reference}",
                             hint="fix the source, a patch or the build env; the log has "
                                  "the whole output")
        wheel, sha = _extract_wheel(output_tar, incoming, log)
        try:
            name, version, _requires = requires_dist(wheel_metadata(wheel))
            metadata: tuple[str, str] | None = (name, version)
        except LockError:
            metadata = None
        problem = wheel_problem(wheel.name, d.name, spec.target.python, spec.target.platform,
                                metadata)
        if problem is not None:
            raise log.failed(problem, hint="check the build command and the builder image "
                                           "(its Python and platform must match the spec's "
                                           "target)")
        record = WheelRecord(name=d.name, version=parse_wheel(wheel.name).version,
                             filename=wheel.name, sha256=sha, input_hash=d.input_hash,
                             built=datetime.now(UTC).isoformat(timespec="seconds"),
                             seconds=round(time.monotonic() - started, 1),
                             log=str(log.path), builder_id=builder.id)
        log.line(f"# wheel {wheel.name} sha256 {sha}")
        return store.put(wheel, record)


def _extract_wheel(output_tar: Path, dest: Path, log: _Log) -> tuple[Path, str]:
    """The one wheel in the build's output (a tar of BUILD_OUT), written to ``dest`` and
    hashed as it is copied. Anything but exactly one regular ``*.whl`` file is refused."""
    try:
        with tarfile.open(output_tar, "r:") as tf:
            wheels = [m for m in tf if m.name.endswith(".whl")]
            if len(wheels) != 1:
                found = ", ".join(m.name for m in wheels) or "no .whl file"
                raise log.failed(f"the build left {found} in {BUILD_OUT}, not exactly one wheel",
                             hint="the build command must write one wheel into "
                                  "$IMAGEBUILD_OUT")
            member = wheels[0]
            filename = member.name.rsplit("/", 1)[-1]
            if not member.isfile() or not WHEEL_FILE.match(filename):
                raise log.failed(f"{member.name} in the build's output is not a wheel file",
                             hint="the build command must write one wheel into "
                                  "$IMAGEBUILD_OUT")
            src = tf.extractfile(member)
            assert src is not None
            path = dest / filename
            h = hashlib.sha256()
            with path.open("wb") as f:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    f.write(chunk)
            return path, h.hexdigest()
    except tarfile.TarError as exc:
        raise log.failed(f"the build's output could not be read: {exc}",
                     hint="run again; if it repeats, report it with the log") from None


# -- the lock entries of the wheels realized here, and the prebuilt wheels by URL ----------


def locked_built_wheels(previous: Lock | None, built: Stored
                        ) -> tuple[list[LockedWheel], list[str]]:
    """The lock entries of the wheels built from source: each from its wheel store
    record (or kept from the previous lock when it already records that derivation),
    and notes on what changed. A wheel that is not built yet is refused, by name."""
    old = {w.name: w for w in previous.wheels} if previous is not None else {}
    out: list[LockedWheel] = []
    notes: list[str] = []
    missing: list[WheelDerivation] = []
    for d, record in built:
        prev = old.get(d.name)
        if record is not None:
            out.append(LockedWheel(record.name, record.version, record.filename,
                                   record.sha256, BUILT_PREFIX + d.input_hash))
            if prev is not None and prev.derivation == d.input_hash and \
                    prev.sha256 != record.sha256:
                notes.append(f"{record.filename}: built again from the same inputs with other "
                             f"bytes (sha256 {(prev.sha256 or '?')[:12]} -> "
                             f"{record.sha256[:12]}): its build is not reproducible")
        elif prev is not None and prev.derivation == d.input_hash:
            out.append(prev)
        else:
            missing.append(d)
    if missing:
        names = " ".join(d.name for d in missing)
        raise LockError(
            "not built yet, so there is no wheel to lock: " + ", ".join(
                f"{d.name} (derivation {d.hash12})" for d in missing) + "; nothing was written",
            hint=f"run 'imagebuild build-wheels {names}' (or 'imagebuild build IMAGE', which "
                 f"builds the wheels it needs and locks them), then lock again")
    return out, notes


def fetched_wheels(spec: Spec) -> list[LockedWheel]:
    """The lock entries of the wheels fetched by URL: the spec declares their sha256."""
    out = []
    for d in spec.wheels:
        if d.url is not None and d.sha256 is not None:
            out.append(LockedWheel(d.name, d.version, d.filename, d.sha256, d.source))
    return out


def fetch_wheels(spec: Spec, wheels: Iterable[LockedWheel], progress: Progress, *,
                 strict: bool) -> list[str]:
    """Download each wheel of ``wheels`` that is fetched by URL and not in the wheel store
    yet: streamed to a file in the store, hashed, renamed into place only when its sha256
    is the declared one (``WheelHashMismatch``, exit 3, otherwise; nothing kept). A wheel
    the store has is never downloaded again. A download that fails raises with
    ``strict``; otherwise it is returned as a note (the lock step records the closure as
    unresolved and goes on)."""
    store = WheelStore(spec.wheel_store)
    notes: list[str] = []
    for w in wheels:
        if w.url is None or w.sha256 is None:
            continue
        final = store.blob(w.sha256, w.filename)
        if final.is_file():
            continue
        progress.say(f"fetching {w.filename} from {w.url}")
        with store.incoming() as tmp:
            part = tmp / w.filename
            try:
                got = web.download(w.url, part, timeout=FETCH_TIMEOUT)
            except Exception as exc:  # requests' errors: the network, the server
                why = f"{w.url}: {exc.__class__.__name__}: {str(exc)[:200]}"
                if strict:
                    raise LockError(f"cannot fetch {w.filename}: {why}",
                                    hint="check the URL and the network, then run again; "
                                         "nothing was kept") from None
                notes.append(f"{w.filename}: cannot fetch it ({why}); its closure stays "
                             f"unresolved")
                continue
            if got is None:
                raise LockError(f"{w.url} is not there (404): {w.filename} cannot be fetched",
                                hint="fix the URL under wheels.url in the spec")
            if got != w.sha256:
                raise WheelHashMismatch(
                    f"{w.url}: the download's sha256 is {got}, the spec declares {w.sha256}; "
                    f"nothing was kept",
                    hint="the release was replaced or the download was tampered with: "
                         "check the source, and change the spec's sha256 only if you trust "
                         "the new file")
            final.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(part, 0o644)
            os.replace(part, final)
        progress.say(f"  {w.filename}: {final.stat().st_size / 1e6:.1f} MB, sha256 "
                     f"{w.sha256[:12]} as declared")
    return notes
