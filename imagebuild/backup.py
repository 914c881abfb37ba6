"""Tar backups of verified images, and restoring them.

A backup is ``<dir>/NAME.tar`` plus a JSON sidecar ``NAME.tar.json``. It is streamed from
``docker save`` into a temporary name in the same directory (never /tmp), hashed while it
streams, flushed and fsynced, then renamed into place; the previous generation stays as
``NAME@<hash12>.tar``. A restore checks the tar against its sidecar before anything is
loaded, loads it, checks the image ID, restores the tags, and (by the caller) re-runs the
verify gate.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from . import __version__
from .derivation import HASH_LABEL
from .engine import Engine, ImageInfo
from .errors import BackupError, RemoteError
from .lock import atomic_write_text
from .remote import RemoteDir, explain, run, start

CHUNK = 1 << 20
SPACE_MARGIN = 64 << 20  # tar headers and the sidecar, on top of the image size
PARTIAL = ".partial"

Report = Callable[[str], None]  # progress lines


@dataclass(frozen=True)
class Sidecar:
    image: str
    image_id: str
    fingerprint: str
    input_hash: str | None
    tags: list[str]
    size: int
    sha256: str
    created: str
    mtime_ns: int
    tool_version: str = __version__

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def tar_path(directory: Path, name: str) -> Path:
    return directory / f"{name}.tar"


def sidecar_path(tar: Path) -> Path:
    return tar.with_name(tar.name + ".json")


def read_sidecar(tar: Path) -> Sidecar | None:
    try:
        data = json.loads(sidecar_path(tar).read_text(encoding="utf-8"))
        return Sidecar(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        raise BackupError(f"{sidecar_path(tar)} is not a valid backup sidecar: {exc}",
                          hint="remove it and run 'imagebuild backup' again") from None


@dataclass(frozen=True)
class BackupResult:
    where: str  # the tar's path, or ssh://host/path/NAME.tar
    sidecar: Sidecar
    written: bool
    seconds: float = 0.0


class Meter:
    """Rate-limited progress lines for long streams."""

    def __init__(self, report: Report, what: str, total: int | None) -> None:
        self.report, self.what, self.total = report, what, total
        self.start = self.last = time.monotonic()
        self.done = 0

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= 2.0:
            self.last = now
            rate = self.done / max(now - self.start, 1e-6) / 1e6
            pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
            self.report(f"  {self.what}: {self.done / 1e6:,.0f} MB{pct}, {rate:,.0f} MB/s")


# -- writing ---------------------------------------------------------------------------------


def _unchanged(tar: Path, sc: Sidecar) -> bool:
    try:
        st = tar.stat()
    except FileNotFoundError:
        return False
    return st.st_size == sc.size and st.st_mtime_ns == sc.mtime_ns


def _clean_partials(directory: Path, name: str) -> None:
    """Remove temp files of earlier backups of ``name`` that were killed half-way."""
    for p in directory.glob(f".{name}.tar.*{PARTIAL}*"):
        pid = p.name.split(".tar.", 1)[1].split(".", 1)[0]
        if pid.isdigit() and Path(f"/proc/{pid}").exists() and int(pid) != os.getpid():
            continue  # another backup is writing it right now
        p.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_space(directory: object, free: int, need: int, what: str) -> None:
    """Refuse before writing anything when ``directory`` has less than ``need`` free."""
    if free < need:
        raise BackupError(
            f"{directory} has {free / 1e9:.2f} GB free, but {what} needs about "
            f"{need / 1e9:.2f} GB: nothing was written",
            hint="free space there, or point backups.directory at a larger disk",
        )


def _save_ref(name: str, info: ImageInfo) -> str:
    """What to ``docker save``: the hash tag, so the tar restores it (or the bare ID)."""
    input_hash = info.labels.get(HASH_LABEL)
    return f"{name}:{input_hash[:12]}" if input_hash else info.id


def _new_sidecar(name: str, info: ImageInfo, size: int, sha256: str,
                 mtime_ns: int) -> Sidecar:
    input_hash = info.labels.get(HASH_LABEL)
    tags = {f"{name}:latest"} | ({_save_ref(name, info)} if input_hash else set())
    return Sidecar(
        image=name, image_id=info.id, fingerprint=info.fingerprint, input_hash=input_hash,
        tags=sorted(tags), size=size, sha256=sha256,
        created=datetime.now(UTC).isoformat(timespec="seconds"), mtime_ns=mtime_ns,
    )


def backup_image(engine: Engine, name: str, info: ImageInfo, directory: Path, keep: int,
                 report: Report) -> BackupResult:
    """Write ``directory/NAME.tar`` for ``info`` (already checked as verified by the caller)."""
    directory.mkdir(parents=True, exist_ok=True)
    tar = tar_path(directory, name)
    existing = read_sidecar(tar)
    if existing and existing.image_id == info.id and _unchanged(tar, existing):
        return BackupResult(str(tar), existing, written=False)
    _clean_partials(directory, name)
    check_space(directory, shutil.disk_usage(directory).free, info.size + SPACE_MARGIN,
                f"a backup of {name}")
    ref = _save_ref(name, info)
    tmp = directory / f".{name}.tar.{os.getpid()}{PARTIAL}"
    started = time.monotonic()
    h = hashlib.sha256()
    meter = Meter(report, f"saving {name}", info.size)
    try:
        with tmp.open("wb") as f:
            for chunk in engine.save(ref, CHUNK):
                f.write(chunk)
                h.update(chunk)
                meter.add(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BackupError(f"writing {tmp} failed: {exc.strerror or exc}; nothing was replaced",
                          hint="check free space and permissions of the backup directory"
                          ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    st = tmp.stat()
    sidecar = _new_sidecar(name, info, st.st_size, h.hexdigest(), st.st_mtime_ns)
    _keep_previous(tar, existing)
    os.replace(tmp, tar)
    atomic_write_text(sidecar_path(tar), sidecar.to_json())
    _fsync_dir(directory)
    _prune_generations(directory, name, keep)
    return BackupResult(str(tar), sidecar, written=True, seconds=time.monotonic() - started)


def _generation_name(old: Sidecar | None) -> str:
    if old is not None and old.input_hash:
        return old.input_hash[:12]
    if old is not None:
        return old.image_id.removeprefix("sha256:")[:12]
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S")


def _keep_previous(tar: Path, old: Sidecar | None) -> None:
    """Hard-link the current backup to ``NAME@<hash12>.tar`` before it is replaced."""
    if not tar.exists():
        return
    gen = tar.with_name(f"{tar.stem}@{_generation_name(old)}.tar")
    for p in (gen, sidecar_path(gen)):
        p.unlink(missing_ok=True)
    os.link(tar, gen)
    if sidecar_path(tar).exists():
        os.link(sidecar_path(tar), sidecar_path(gen))


def generations(directory: Path, name: str) -> list[Path]:
    """Older generations of ``name``, newest first."""
    gens = [p for p in directory.glob(f"{name}@*.tar") if p.is_file()]
    return sorted(gens, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def _prune_generations(directory: Path, name: str, keep: int) -> None:
    """Keep ``keep`` generations in all: NAME.tar and the ``keep - 1`` newest older ones."""
    for old in generations(directory, name)[max(keep - 1, 0):]:
        old.unlink(missing_ok=True)
        sidecar_path(old).unlink(missing_ok=True)


# -- reading ---------------------------------------------------------------------------------


def file_chunks(path: Path, meter: Meter | None = None) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            if meter:
                meter.add(len(chunk))
            yield chunk


def check_tar(tar: Path, sidecar: Sidecar, report: Report) -> None:
    """Refuse a tar that is truncated or whose sha256 differs from its sidecar."""
    try:
        size = tar.stat().st_size
    except FileNotFoundError:
        raise BackupError(f"{tar} is missing (its sidecar is there)") from None
    if size != sidecar.size:
        raise BackupError(
            f"{tar} is {size} bytes but its sidecar says {sidecar.size}: truncated or "
            f"altered; nothing was loaded",
            hint="restore from an older generation (NAME@<hash12>.tar) with --file, or "
                 "rebuild",
        )
    h = hashlib.sha256()
    for chunk in file_chunks(tar, Meter(report, f"checking {tar.name}", size)):
        h.update(chunk)
    if h.hexdigest() != sidecar.sha256:
        raise BackupError(
            f"{tar} does not match its sidecar; nothing was loaded\n"
            f"  expected sha256 {sidecar.sha256}\n  actual   sha256 {h.hexdigest()}",
            hint="the file is corrupt: restore an older generation with --file, or rebuild",
        )


@dataclass(frozen=True)
class RestoreResult:
    name: str
    info: ImageInfo
    loaded: bool  # False: the image was already present (no-op)
    seconds: float = 0.0


def _restore(engine: Engine, where: str, sidecar: Sidecar | None, expect_image: str | None,
             check_and_load: Callable[[Sidecar], None]) -> RestoreResult:
    """Shared by local and remote restores: refuse what cannot be checked, load only when
    the image is absent, then restore its hash tag (``latest`` is the caller's, after the
    verify gate)."""
    if sidecar is None:
        raise BackupError(f"{where} has no readable sidecar ({where}.json); refusing to load "
                          f"a tar whose content cannot be checked")
    if expect_image is not None and sidecar.image != expect_image:
        raise BackupError(f"{where} is a backup of {sidecar.image}, not {expect_image}")
    started = time.monotonic()
    present = engine.inspect(sidecar.image_id)
    loaded = present is None
    if present is None:
        check_and_load(sidecar)
        present = engine.inspect(sidecar.image_id)
        if present is None:
            raise BackupError(f"loading {where} did not produce image {sidecar.image_id[:19]} "
                              f"named in its sidecar",
                              hint="the tar and its sidecar do not belong together")
    for ref in sidecar.tags:
        if not ref.endswith(":latest"):
            repo, _, tag = ref.rpartition(":")
            engine.tag(present.id, repo, tag)
    info = engine.require(present.id)
    return RestoreResult(sidecar.image, info, loaded=loaded, seconds=time.monotonic() - started)


def restore_tar(engine: Engine, tar: Path, report: Report,
                expect_image: str | None = None) -> RestoreResult:
    """Load a local ``tar`` after checking it against its sidecar."""

    def check_and_load(sidecar: Sidecar) -> None:
        check_tar(tar, sidecar, report)
        report(f"  loading {tar} ({sidecar.size / 1e9:.2f} GB)")
        engine.load(file_chunks(tar, Meter(report, f"loading {tar.name}", sidecar.size)))

    return _restore(engine, str(tar), read_sidecar(tar), expect_image, check_and_load)


def find_backup(directory: Path, name: str, match: Callable[[Sidecar], bool]) -> Path | None:
    """The newest backup tar of ``name`` (current, then older generations) whose sidecar
    matches; a generation with an unreadable sidecar is passed over, not fatal."""
    if not directory.is_dir():
        return None
    for tar in [tar_path(directory, name), *generations(directory, name)]:
        try:
            sc = read_sidecar(tar)
        except BackupError:
            continue
        if sc is not None and match(sc) and tar.is_file():
            return tar
    return None


def find_substitute(directory: Path, name: str, input_hash: str) -> Path | None:
    """A backup tar (current or older generation) of exactly this derivation."""
    return find_backup(directory, name, lambda sc: sc.input_hash == input_hash)


# -- a backup directory on another host (ssh://host/path) --------------------------------------
#
# The same guarantees over OpenSSH: the stream goes to a temporary name in the target
# directory, is synced there, its size checked, and only then renamed into place, the
# previous generation hard-linked to NAME@<hash12>.tar first. Commands are argument
# lists; the remote shell only ever sees shlex-quoted words.


def _remote_sidecar(rdir: RemoteDir, tar: str) -> Sidecar | None:
    try:
        text = run(rdir.target, ["cat", f"{tar}.json"])
    except RemoteError:
        return None
    try:
        return Sidecar(**json.loads(text))
    except (ValueError, TypeError) as exc:
        raise BackupError(f"{rdir.target.host}:{tar}.json is not a valid sidecar: {exc}") from None


def _remote_size(rdir: RemoteDir, path: str) -> int | None:
    try:
        return int(run(rdir.target, ["stat", "-c", "%s", path]).strip())
    except (RemoteError, ValueError):
        return None


def remote_backup_image(engine: Engine, name: str, info: ImageInfo, rdir: RemoteDir, keep: int,
                        report: Report) -> BackupResult:
    t = rdir.target
    tar = rdir.file(f"{name}.tar")
    run(t, ["mkdir", "-p", rdir.path])
    existing = _remote_sidecar(rdir, tar)
    if existing and existing.image_id == info.id and _remote_size(rdir, tar) == existing.size:
        return BackupResult(f"{rdir}/{name}.tar", existing, written=False)
    df = run(t, ["df", "-P", "-B1", rdir.path]).splitlines()
    check_space(rdir, int(df[-1].split()[3]), info.size + SPACE_MARGIN, f"a backup of {name}")
    run(t, ["find", rdir.path, "-maxdepth", "1", "-name", f".{name}.tar.*{PARTIAL}", "-delete"])
    tmp = rdir.file(f".{name}.tar.{os.getpid()}{PARTIAL}")
    ref = _save_ref(name, info)
    started = time.monotonic()
    h = hashlib.sha256()
    meter = Meter(report, f"saving {name} to {t.host}", info.size)
    proc = start(t, ["sh", "-c", 'cat > "$1" && sync "$1"', "sh", tmp])
    assert proc.stdin is not None and proc.stderr is not None
    size = 0
    try:
        for chunk in engine.save(ref, CHUNK):
            proc.stdin.write(chunk)
            h.update(chunk)
            size += len(chunk)
            meter.add(len(chunk))
        proc.stdin.close()
    except BrokenPipeError:
        pass
    except BaseException:
        proc.kill()
        proc.wait()
        _remote_cleanup(rdir, tmp)
        raise
    err = proc.stderr.read().decode(errors="replace")
    if proc.wait() != 0 or _remote_size(rdir, tmp) != size:
        _remote_cleanup(rdir, tmp)
        raise BackupError(f"writing {t.host}:{tmp} failed; nothing was replaced: "
                          f"{explain(t, proc.returncode or 255, err)}")
    sidecar = _new_sidecar(name, info, size, h.hexdigest(), mtime_ns=0)
    if _remote_size(rdir, tar) is not None:
        gen = rdir.file(f"{name}@{_generation_name(existing)}.tar")
        run(t, ["ln", "-f", tar, gen])
        if existing is not None:
            run(t, ["ln", "-f", f"{tar}.json", f"{gen}.json"])
    run(t, ["mv", "-f", tmp, tar])
    run(t, ["sh", "-c", 'cat > "$1.tmp" && sync "$1.tmp" && mv -f "$1.tmp" "$1"', "sh",
            f"{tar}.json"], stdin=sidecar.to_json().encode())
    listing = run(t, ["sh", "-c", 'ls -1t "$1"/"$2"@*.tar 2>/dev/null || true', "sh",
                      rdir.path, name]).split()
    for old in listing[max(keep - 1, 0):]:
        run(t, ["rm", "-f", old, f"{old}.json"])
    return BackupResult(f"{rdir}/{name}.tar", sidecar, written=True,
                        seconds=time.monotonic() - started)


def _remote_cleanup(rdir: RemoteDir, path: str) -> None:
    try:
        run(rdir.target, ["rm", "-f", path])
    except RemoteError:
        pass


def remote_restore(engine: Engine, rdir: RemoteDir, tar: str, report: Report,
                   expect_image: str | None = None) -> RestoreResult:
    """Like restore_tar, for a tar on another host: checked there, streamed over ssh."""
    where = f"{rdir.target.host}:{tar}"

    def check_and_load(sidecar: Sidecar) -> None:
        size = _remote_size(rdir, tar)
        if size != sidecar.size:
            raise BackupError(f"{where} is {size} bytes but its sidecar says {sidecar.size}: "
                              f"truncated or altered; nothing was loaded")
        report(f"  checking {where}")
        actual = run(rdir.target, ["sha256sum", tar], timeout=3600).split()[0]
        if actual != sidecar.sha256:
            raise BackupError(f"{where} does not match its sidecar; nothing was loaded\n"
                              f"  expected sha256 {sidecar.sha256}\n  actual   sha256 {actual}")
        report(f"  loading {where} ({sidecar.size / 1e9:.2f} GB)")
        proc = start(rdir.target, ["cat", tar], read=True)
        assert proc.stdout is not None
        stdout = proc.stdout
        meter = Meter(report, f"loading {Path(tar).name}", sidecar.size)

        def chunks() -> Iterator[bytes]:
            while chunk := stdout.read(CHUNK):
                meter.add(len(chunk))
                yield chunk

        try:
            engine.load(chunks())
        finally:
            proc.kill()
            proc.wait()

    return _restore(engine, where, _remote_sidecar(rdir, tar), expect_image, check_and_load)
