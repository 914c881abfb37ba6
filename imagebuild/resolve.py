"""Resolving an image's closure with uv, and reading wheels' metadata for the conflict check.

uv does the resolving (``uv pip compile ... -o pylock.<image>.toml``) for the spec's
target (``--python-version``, ``--python-platform``), against the spec's primary index
and its wheels directory, with the overrides in force for the image (a package another
index serves arrives as an override naming its file by URL: ``locking.direct_pins``);
only wheels, never a source build. An existing lock is handed to uv as its previous
output, so pins stay where they are unless asked to move (``--upgrade-package``). What
uv writes is parsed and checked here before anything else reads it.
"""

from __future__ import annotations

import email.parser
import tempfile
import tomllib
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from . import remote, web
from .closure import ClosureLock, LockedDist, format_closure
from .errors import LockError, ResolveFailed
from .lock import INDEX_URL, SHA256, WHEEL_FILE, parse_wheel

UV_TIMEOUT = 600
MAX_METADATA = 8 << 20  # a wheel's METADATA unpacked: real ones are a few kB


def uv_binary() -> str:
    try:
        import uv
    except ImportError:
        raise LockError("uv is not installed in imagebuild's environment",
                        hint="reinstall imagebuild (pip install -e .), which brings uv") from None
    return str(uv.find_uv_bin())


@dataclass(frozen=True)
class Resolution:
    """What uv resolved for one image, checked."""

    packages: tuple[LockedDist, ...]


def resolve(*, image: str, requirements: list[str], overrides: list[str], python: str,
            platform: str, wheels_dir: Path, index: str, previous: ClosureLock | None,
            upgrade: bool | list[str]) -> Resolution:
    """Run uv for one image and return its checked resolution. ``previous`` seeds uv's
    preferences (unless ``upgrade`` is True: everything may move); a list ``upgrade``
    moves only the packages it names."""
    with tempfile.TemporaryDirectory(prefix="imagebuild-lock-") as tmp:
        d = Path(tmp)
        (d / "requirements.in").write_text("".join(r + "\n" for r in requirements))
        (d / "overrides.txt").write_text("".join(r + "\n" for r in overrides))
        out = d / "pylock.closure.toml"
        if previous is not None and previous.unresolved is None and upgrade is not True:
            out.write_text(_as_uv_output(previous, wheels_dir))
        argv = [uv_binary(), "pip", "compile", "--quiet", "--no-config", "--no-build",
                "--refresh", "--python-version", python, "--python-platform", platform,
                "--override", str(d / "overrides.txt"), "--find-links", str(wheels_dir),
                "--index-url", index]
        if isinstance(upgrade, list):
            for name in upgrade:
                argv += ["--upgrade-package", name]
        argv += ["-o", str(out), str(d / "requirements.in")]
        done = remote.local(argv, timeout=UV_TIMEOUT, cwd=d)
        if done.code != 0:
            why = f"did not finish within {UV_TIMEOUT}s" if done.code is None else "failed"
            detail = "\n".join("  " + ln for ln in done.stderr.strip().splitlines()[-15:])
            raise ResolveFailed(
                f"{image}: uv {why} to resolve the closure:\n{detail}",
                hint="read uv's reason above: a requirement no index satisfies, an index "
                     "that does not answer, or a conflict to settle with an override in the "
                     "spec")
        return Resolution(_read_uv_output(out, image, wheels_dir))


def _as_uv_output(lock: ClosureLock, wheels_dir: Path) -> str:
    """A previous lock in the form uv reads back as its own output (local wheels as file
    URLs under this machine's wheels directory)."""
    packages = []
    for p in lock.packages:
        url = p.url or (wheels_dir / p.filename).absolute().as_uri()
        packages.append(LockedDist(p.name, p.version, p.filename, p.sha256, url))
    text = format_closure(ClosureLock(
        path=lock.path, image=lock.image, parent=lock.parent, python=lock.python,
        platform=lock.platform, requirements=lock.requirements, overrides=lock.overrides,
        packages=tuple(packages)), "imagebuild.yaml")
    return text.replace("created-by = \"imagebuild\"", "created-by = \"uv\"")


def _read_uv_output(path: Path, image: str, wheels_dir: Path) -> tuple[LockedDist, ...]:
    bad = f"{image}: uv wrote a lock imagebuild cannot read"
    hint = "report it with the uv version (uv --version); nothing was written"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise LockError(f"{bad}: {exc}", hint=hint) from None
    entries = data.get("packages", [])
    if not isinstance(entries, list):
        raise LockError(f"{bad}: 'packages' is not a list", hint=hint)
    local_root = wheels_dir.absolute()
    out: list[LockedDist] = []
    for e in entries:
        # an index's or the wheels directory's file under wheels; a file given by URL
        # (another index's: locking.direct_pins) as the archive
        archive = e.get("archive") if isinstance(e, dict) else None
        if isinstance(e, dict) and isinstance(archive, dict) and "wheels" not in e:
            wheels = [archive]
        elif isinstance(e, dict) and isinstance(e.get("wheels"), list):
            wheels = e["wheels"]
        else:
            name = e.get("name") if isinstance(e, dict) else e
            raise LockError(f"{bad}: {name!r} has no wheel (a source distribution?)",
                            hint="imagebuild installs wheels only: publish a wheel for it, or "
                                 "build one")
        if len(wheels) != 1 or not isinstance(wheels[0], dict):
            raise LockError(f"{bad}: {e.get('name')!r} has {len(wheels)} wheels for one target",
                            hint=hint)
        w = wheels[0]
        url = w.get("url")
        sha = (w.get("hashes") or {}).get("sha256") if isinstance(w.get("hashes"), dict) else None
        if not isinstance(url, str) or not isinstance(sha, str) or not SHA256.match(sha):
            raise LockError(f"{bad}: {e.get('name')!r} lacks a wheel URL or its sha256",
                            hint=hint)
        filename = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
        if not WHEEL_FILE.match(filename):
            raise LockError(f"{bad}: {url!r} is not a wheel", hint=hint)
        parsed = parse_wheel(filename)
        if parsed.name != canonicalize_name(str(e.get("name"))) or \
                parsed.version != str(e.get("version")):
            raise LockError(f"{bad}: {e.get('name')} {e.get('version')} is locked to "
                            f"{filename}", hint=hint)
        if url.startswith("file:"):
            where = Path(unquote(urlsplit(url).path))
            if where.parent != local_root:
                raise LockError(f"{image}: the closure takes {filename} from {where.parent}, "
                                f"which is not the spec's wheels directory", hint=hint)
            out.append(LockedDist(parsed.name, parsed.version, filename, sha, None))
        else:
            if not INDEX_URL.match(url):
                raise LockError(f"{bad}: {url!r} is not an http(s) URL", hint=hint)
            out.append(LockedDist(parsed.name, parsed.version, filename, sha, url))
    return tuple(sorted(out, key=lambda p: p.name))


# -- wheel metadata --------------------------------------------------------------------------

Getter = Callable[[str], bytes | None]  # URL -> body, None on 404


def requires_dist(metadata: bytes) -> tuple[str, str, list[str]]:
    """(Name, Version, Requires-Dist) of a core metadata file."""
    msg = email.parser.BytesParser().parsebytes(metadata, headersonly=True)
    return (str(msg.get("Name", "")), str(msg.get("Version", "")),
            [str(v) for v in msg.get_all("Requires-Dist") or []])


def wheel_metadata(path: Path) -> bytes:
    """The METADATA of a wheel file (read from the zip, never unpacked)."""
    parsed = parse_wheel(path.name)
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.count("/") == 1
                     and n.endswith(".dist-info/METADATA")
                     and canonicalize_name(n.split("-", 1)[0]) == parsed.name]
            if len(names) != 1:
                raise LockError(f"{path}: no single .dist-info/METADATA in the wheel",
                                hint="the file is not a valid wheel; rebuild or re-download it")
            with zf.open(names[0]) as f:  # bounded: a zip bomb stops at the limit
                data = f.read(MAX_METADATA + 1)
            if len(data) > MAX_METADATA:
                raise LockError(f"{path}: its METADATA is larger than {MAX_METADATA} bytes "
                                f"unpacked", hint="the file is not a wheel imagebuild reads; "
                                                  "rebuild or re-download it")
            return data
    except (RuntimeError, NotImplementedError) as exc:  # encrypted; an unknown compression
        raise LockError(f"{path}: cannot read its METADATA: {exc}",
                        hint="the file is not a valid wheel; rebuild or re-download it") from None
    except (OSError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise LockError(f"{path}: cannot read the wheel: {exc}",
                        hint="the file is not a valid wheel; rebuild or re-download it") from None


Downloader = Callable[[str, Path], str | None]  # URL, destination -> its sha256; None: 404


def dist_requires(dists: Iterable[LockedDist], wheels_dir: Path, get: Getter | None = None,
                  download: Downloader | None = None) -> dict[str, list[str]]:
    """The Requires-Dist of every locked distribution, by filename: a local wheel's from
    its file, an index wheel's from its PEP 658 metadata file (``<url>.metadata``) or, if
    the index has none, from the wheel itself, streamed to a temporary file and checked
    against its locked sha256 before it is read."""
    fetch = get or web.get_bytes
    out: dict[str, list[str]] = {}
    for p in dists:
        if p.url is None:
            meta = wheel_metadata(wheels_dir / p.filename)
        else:
            found = fetch(p.url + ".metadata")
            meta = found if found is not None else _downloaded_metadata(
                p, download or web.download)
        name, version, reqs = requires_dist(meta)
        try:
            same = canonicalize_name(name) == p.name and str(Version(version)) == p.version
        except InvalidVersion:
            same = False
        if not same:
            raise LockError(f"the metadata of {p.filename} names {name} {version}",
                            hint="the index serves metadata that does not match its wheel")
        out[p.filename] = reqs
    return out


def _downloaded_metadata(p: LockedDist, download: Downloader) -> bytes:
    assert p.url is not None
    with tempfile.TemporaryDirectory(prefix="imagebuild-wheel-") as tmp:
        dest = Path(tmp) / p.filename
        digest = download(p.url, dest)
        if digest is None:
            raise LockError(f"{p.url}: not found",
                            hint=f"the index no longer serves the locked file; run "
                                 f"'imagebuild lock --upgrade {p.name}'")
        if digest != p.sha256:
            raise LockError(f"{p.url}: sha256 {digest} is not the locked {p.sha256}",
                            hint="the index serves other bytes under the locked name")
        return wheel_metadata(dest)


