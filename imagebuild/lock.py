"""``wheels.lock``: the hash-pinned wheels of a stack.

The lock is machine-written (``imagebuild lock``), deterministic (sorted by canonical
name, then version, then filename; fixed formatting) and written atomically. A wheel
whose bytes are not available where the lock is written is recorded as ``unresolved``
— never with a made-up hash — and anything that needs its hash refuses until the lock
step is run where the wheel is.
"""

from __future__ import annotations

import hashlib
import html.parser
import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urldefrag, urljoin

from packaging.utils import (
    InvalidWheelFilename,
    canonicalize_name,
    parse_wheel_filename,
)

from .errors import LockError, UnresolvedHashError, WheelHashMismatch
from .fsutil import read_file_bytes

LOCK_VERSION = 1
UNRESOLVED = "unresolved"
LOCAL_PREFIX = "wheels/"
BUILT_PREFIX = "built/"  # + the input hash of the wheel derivation that made it
FETCHED_PREFIX = "fetched/"  # + the URL it is downloaded from, "#sha256=" + its sha256
_CHUNK = 1 << 20
# shared with spec.py: what a wheel filename and an index URL may look like
WHEEL_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+!-]*\.whl\Z")
INDEX_URL = re.compile(r"^https?://[A-Za-z0-9._~:/@%+-]+\Z")
SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
_ENTRY_KEYS = {"name", "version", "filename", "sha256", "source"}


@dataclass(frozen=True)
class ParsedWheel:
    name: str  # canonical
    version: str
    filename: str


def parse_wheel(filename: str) -> ParsedWheel:
    """Name and version of a wheel filename, via ``packaging.utils.parse_wheel_filename``."""
    try:
        name, version, _build, _tags = parse_wheel_filename(filename)
    except InvalidWheelFilename as exc:
        raise LockError(f"wheel filename {filename!r} does not parse: {exc}",
                        hint="wheel files are named NAME-VERSION(-BUILD)?-PY-ABI-PLATFORM.whl "
                             "(PEP 427); do not rename them") from None
    return ParsedWheel(name=canonicalize_name(name), version=str(version), filename=filename)


@dataclass(frozen=True)
class LockedWheel:
    name: str
    version: str
    filename: str
    sha256: str | None  # None: unresolved
    source: str  # "wheels/<filename>": a local file; "built/<input hash>": built from
    # source by that wheel derivation (kept in the wheel store); "fetched/<URL>#sha256=..":
    # downloaded once from that URL into the wheel store; else the index URL

    @property
    def is_built(self) -> bool:
        return self.source.startswith(BUILT_PREFIX)

    @property
    def url(self) -> str | None:
        """The URL a fetched wheel is downloaded from (None: not fetched)."""
        if not self.source.startswith(FETCHED_PREFIX):
            return None
        return self.source[len(FETCHED_PREFIX):].rsplit("#sha256=", 1)[0]

    @property
    def in_store(self) -> bool:
        """Kept in the wheel store (built here, or fetched by URL), by sha256."""
        return self.is_built or self.url is not None

    @property
    def derivation(self) -> str | None:
        """The input hash of the derivation that built it (None: not built)."""
        return self.source[len(BUILT_PREFIX):] if self.is_built else None

    @property
    def is_local(self) -> bool:
        """A file on this machine that imagebuild serves to builds (not from an index)."""
        return self.source.startswith(LOCAL_PREFIX) or self.in_store

    @property
    def index(self) -> str | None:
        return None if self.is_local else self.source

    def require_sha256(self, lock_path: Path) -> str:
        if self.sha256 is None:
            raise UnresolvedHashError(
                f"{lock_path}: the sha256 of {self.filename} is unresolved",
                hint="run 'imagebuild lock' on the machine where that wheel is (the head node "
                     "with wheels/ populated, or with the index reachable), commit wheels.lock, "
                     "and try again",
            )
        return self.sha256


@dataclass(frozen=True)
class Lock:
    """wheels.lock (``closure.Locks`` adds every image's closure lock)."""

    path: Path
    wheels: tuple[LockedWheel, ...]

    def by_filename(self) -> dict[str, LockedWheel]:
        return {w.filename: w for w in self.wheels}

    def get(self, name: str) -> LockedWheel:
        """The locked wheel for a canonical name (a stack declares each name once)."""
        cn = canonicalize_name(name)
        for w in self.wheels:
            if w.name == cn:
                return w
        raise LockError(f"{self.path}: no wheel named {name!r} is locked",
                        hint="declare it in the spec's wheels section and run 'imagebuild lock'")

    @property
    def unresolved(self) -> list[LockedWheel]:
        return [w for w in self.wheels if w.sha256 is None]


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks (memory stays flat for GB-sized wheels)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_wheel_digest(path: Path, actual: str, expected: str) -> None:
    """Refuse a wheel whose bytes (hashed to ``actual``) do not match its locked sha256."""
    if actual != expected:
        raise WheelHashMismatch(
            f"wheel {path} does not match wheels.lock\n"
            f"  expected sha256 {expected}\n  actual   sha256 {actual}",
            hint="the file changed since it was locked: if the new wheel is intended, run "
                 "'imagebuild lock' and commit wheels.lock; otherwise restore the locked file",
        )


# -- reading and writing -------------------------------------------------------------------


def lock_bytes(path: Path, missing: str, missing_hint: str, unreadable_hint: str) -> bytes:
    """A lock file's bytes; a missing or unreadable file is a LockError saying so."""
    try:
        return read_file_bytes(path)
    except FileNotFoundError:
        raise LockError(f"{path}: {missing}", hint=missing_hint) from None
    except OSError as exc:
        raise LockError(f"{path}: cannot read the lock file: {exc.strerror or exc}",
                        hint=unreadable_hint) from None


def read_lock(path: Path) -> Lock:
    """Read and check ``wheels.lock``: every field of every entry, one entry per project."""
    regenerate = "regenerate it with 'imagebuild lock'"
    raw = lock_bytes(path, "lock file not found", "run 'imagebuild lock' to write it",
                     "the spec's 'lock:' must name a file")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise LockError(f"{path}: malformed lock file: {exc}", hint=regenerate) from None
    if data.get("version") != LOCK_VERSION:
        raise LockError(f"{path}: unsupported lock version {data.get('version')!r}",
                        hint=regenerate)
    unknown = sorted(set(data) - {"version", "wheel"})
    if unknown:
        raise LockError(f"{path}: unknown top-level keys {unknown}", hint=regenerate)
    entries = data.get("wheel", [])
    if not isinstance(entries, list):
        raise LockError(f"{path}: 'wheel' must be an array of tables ([[wheel]])",
                        hint=regenerate)
    wheels = [_entry(path, i, entry) for i, entry in enumerate(entries, 1)]
    seen: dict[str, str] = {}
    for w in wheels:
        if w.name in seen:
            raise LockError(f"{path}: more than one file is locked for {w.name} "
                            f"({seen[w.name]}, {w.filename})",
                            hint="a stack pins exactly one file per project; " + regenerate)
        seen[w.name] = w.filename
    return Lock(path=path, wheels=tuple(_sorted(wheels)))


def _entry(path: Path, i: int, entry: object) -> LockedWheel:
    """One ``[[wheel]]`` table, every field checked: nothing unchecked reaches a
    requirements file or a Dockerfile."""
    where = f"{path}: wheel entry {i}"
    hint = "regenerate it with 'imagebuild lock'"
    check_keys(where, entry, _ENTRY_KEYS, _ENTRY_KEYS, hint)
    assert isinstance(entry, dict)
    bad = sorted(k for k in _ENTRY_KEYS if not isinstance(entry[k], str))
    if bad:
        raise LockError(f"{where}: {', '.join(bad)} must be strings", hint=hint)
    w = _locked(entry["filename"], entry["sha256"], entry["source"], where)
    if entry["name"] != w.name or entry["version"] != w.version:
        raise LockError(f"{where} ({w.filename}): name/version do not match the filename",
                        hint=hint)
    return w


def check_keys(where: str, table: object, allowed: set[str], required: set[str], hint: str
               ) -> None:
    """Refuse a lock table that is not a table, lacks a required key or has another."""
    if not isinstance(table, dict):
        raise LockError(f"{where} is not a table", hint=hint)
    missing = sorted(required - set(table))
    extra = sorted(set(table) - allowed)
    if missing or extra:
        raise LockError(f"{where}: " + "; ".join(
            ([f"lacks {', '.join(missing)}"] if missing else [])
            + ([f"has unknown keys {', '.join(extra)}"] if extra else [])), hint=hint)


# no query, no fragment, nothing a TOML string or a log line could be confused by
WHEEL_URL = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?/[A-Za-z0-9._~%+@:/-]*\.whl\Z")


def url_filename(url: str) -> str:
    """The wheel filename a download URL ends in (percent-decoded: a ``+`` of a local
    version is often written %2B)."""
    return unquote(url.rsplit("/", 1)[-1])


def fetched_source(url: str, filename: str, sha: str) -> str | None:
    """A fetched wheel's source, ``fetched/<URL>#sha256=<sha256>``, or None when the URL
    is not an http(s) URL of that very file or the sha256 is not one."""
    if not WHEEL_URL.match(url) or url_filename(url) != filename or not SHA256.match(sha):
        return None
    return f"{FETCHED_PREFIX}{url}#sha256={sha}"


def _locked(filename: str, sha: str, source: str, where: str) -> LockedWheel:
    """A locked wheel from its three facts, each checked (on read and on write)."""
    if not WHEEL_FILE.match(filename):
        raise LockError(f"{where}: {filename!r} is not a wheel filename",
                        hint="regenerate it with 'imagebuild lock'")
    parsed = parse_wheel(filename)
    if sha != UNRESOLVED and not SHA256.match(sha):
        raise LockError(f"{where} ({filename}): {sha!r} is not a sha256 hex digest",
                        hint="regenerate it with 'imagebuild lock'")
    built = source.startswith(BUILT_PREFIX) and SHA256.match(source[len(BUILT_PREFIX):])
    fetched = source.startswith(FETCHED_PREFIX) and fetched_source(
        source[len(FETCHED_PREFIX):].rsplit("#sha256=", 1)[0], filename, sha) == source
    if (source != LOCAL_PREFIX + filename and not built and not fetched
            and not INDEX_URL.match(source)):
        raise LockError(f"{where} ({filename}): source {source!r} is neither "
                        f"{LOCAL_PREFIX}{filename}, {BUILT_PREFIX}<input hash>, "
                        f"{FETCHED_PREFIX}<the URL of that file>#sha256=<its sha256> nor an "
                        f"http(s) index URL",
                        hint="regenerate it with 'imagebuild lock'")
    if built and sha == UNRESOLVED:
        raise LockError(f"{where} ({filename}): a wheel built from source has no sha256",
                        hint="regenerate it with 'imagebuild lock'")
    return LockedWheel(name=parsed.name, version=parsed.version, filename=filename,
                       sha256=None if sha == UNRESOLVED else sha, source=source)


def _sorted(wheels: Iterable[LockedWheel]) -> list[LockedWheel]:
    return sorted(wheels, key=lambda w: (w.name, w.version, w.filename))


def toml_string(value: str) -> str:
    """A TOML basic string (JSON-compatible escaping)."""
    out = ['"']
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def format_lock(wheels: Iterable[LockedWheel], spec_name: str) -> str:
    wheels = [_locked(w.filename, w.sha256 or UNRESOLVED, w.source, "writing wheels.lock")
              for w in wheels]
    lines = [
        "# wheels.lock: the hash-pinned wheels of this stack.",
        f"# Written by 'imagebuild lock' from {spec_name}; do not edit by hand.",
        "# A sha256 of \"unresolved\" means the wheel was not available where this file was",
        "# written: run 'imagebuild lock' where it is before building.",
        f"version = {LOCK_VERSION}",
    ]
    for w in _sorted(wheels):
        lines += [
            "",
            "[[wheel]]",
            f"name = {toml_string(w.name)}",
            f"version = {toml_string(w.version)}",
            f"filename = {toml_string(w.filename)}",
            f"sha256 = {toml_string(w.sha256 or UNRESOLVED)}",
            f"source = {toml_string(w.source)}",
        ]
    return "\n".join(lines) + "\n"


# -- the lock step ---------------------------------------------------------------------------


class _Anchors(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []  # (text, href)
        self._href: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href") or ""
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._href is not None:
            self.links.append(("".join(self._text).strip(), self._href))
            self._href = None


Fetcher = Callable[[str], str]


@dataclass(frozen=True)
class IndexFile:
    """One file a PEP 503 index lists: where it is and the sha256 it publishes."""

    url: str  # absolute, without the fragment
    sha256: str | None  # None where the index publishes none


def index_files(index: str, project: str, fetch: Fetcher) -> dict[str, IndexFile]:
    """Every file a PEP 503 index lists for ``project``, by filename, from the page
    ``fetch`` reads."""
    page_url = f"{index.rstrip('/')}/{canonicalize_name(project)}/"
    parser = _Anchors()
    parser.feed(fetch(page_url))
    out: dict[str, IndexFile] = {}
    for text, href in parser.links:
        url, frag = urldefrag(urljoin(page_url, href))
        name = unquote(url.rsplit("/", 1)[-1]) or text
        digest = frag.split("=", 1)[1].lower() if frag.startswith("sha256=") else None
        if INDEX_URL.match(url):
            out[name] = IndexFile(url, digest if digest is not None and SHA256.match(digest)
                                  else None)
    return out


def index_sha256(index: str, filename: str, fetch: Fetcher) -> str | None:
    """The sha256 a PEP 503 index publishes for ``filename`` (None if it has none), from
    the page ``fetch`` reads (the caller's HTTP: this module does no I/O of its own)."""
    name = parse_wheel(filename).name
    page_url = f"{index.rstrip('/')}/{name}/"
    page = fetch(page_url)
    parser = _Anchors()
    parser.feed(page)
    for text, href in parser.links:
        url, frag = urldefrag(urljoin(page_url, href))
        if text == filename or url.rsplit("/", 1)[-1] == filename:
            if not frag.startswith("sha256="):
                return None
            digest = frag.split("=", 1)[1].lower()
            if not SHA256.match(digest):
                raise LockError(f"{page_url} publishes {digest[:80]!r} as the sha256 of "
                                f"{filename}, which is not a sha256 digest",
                                hint="check the index; nothing was written")
            return digest
    raise LockError(f"{page_url} does not list {filename}",
                    hint="check the filename and index URL declared in the spec")


@dataclass(frozen=True)
class LockResult:
    wheels: tuple[LockedWheel, ...]
    notes: tuple[str, ...]


def compute_lock(wheels_dir: Path, decls: Iterable[tuple[str, str | None]],
                 previous: Lock | None, upgrade: bool | Iterable[str] = False,
                 fetch: Fetcher | None = None, built: Iterable[LockedWheel] = ()
                 ) -> LockResult:
    """Lock every declared wheel: ``decls`` is (filename, index URL or None for local).

    Local files are hashed from disk. A file not present keeps the hash of a previous lock
    with the same filename (it was computed where the file was), else is unresolved.
    Index wheels keep their previous hash unless ``upgrade`` is True or names them;
    otherwise the index's published sha256 is used, read through ``fetch`` (without one,
    an index wheel that needs it is recorded as unresolved). ``built``: the wheels built
    from source, already locked (``built/<input hash>``) by the caller.
    """
    again = {canonicalize_name(n) for n in upgrade} if not isinstance(upgrade, bool) else set()
    old = previous.by_filename() if previous else {}
    out: list[LockedWheel] = []
    notes: list[str] = []
    for filename, index in decls:
        parsed = parse_wheel(filename)
        prev = old.get(filename)
        sha: str | None = None
        if index is None:
            source = LOCAL_PREFIX + filename
            path = wheels_dir / filename
            if path.is_file():
                sha = sha256_file(path)
                if prev and prev.sha256 and prev.sha256 != sha:
                    notes.append(f"{filename}: sha256 changed {prev.sha256[:12]} -> {sha[:12]}")
            elif prev and prev.sha256:
                sha = prev.sha256
                notes.append(f"{filename}: not in {wheels_dir}; kept the locked sha256")
            else:
                notes.append(f"{filename}: not in {wheels_dir}; recorded as unresolved")
        else:
            source = index
            if (prev and prev.sha256 and prev.source == index and upgrade is not True
                    and parsed.name not in again):
                sha = prev.sha256
            elif fetch is None:
                notes.append(f"{filename}: index {index} not consulted; recorded as "
                             f"unresolved")
            else:
                try:
                    sha = index_sha256(index, filename, fetch)
                except LockError:
                    raise
                except Exception as exc:  # network errors: keep going, say so
                    notes.append(f"{filename}: index {index} unreachable ({exc.__class__.__name__})"
                                 f"; recorded as unresolved")
                    sha = prev.sha256 if prev and prev.source == index else None
                else:
                    if sha is None:
                        notes.append(f"{filename}: {index} publishes no sha256; "
                                     f"recorded as unresolved")
        out.append(LockedWheel(name=parsed.name, version=parsed.version, filename=filename,
                               sha256=sha, source=source))
    out.extend(built)  # their hashes were taken when they were stored
    names = [w.name for w in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise LockError(f"more than one wheel is declared for {', '.join(dup)}",
                        hint="a stack pins exactly one file per project")
    return LockResult(wheels=tuple(_sorted(out)), notes=tuple(notes))
