"""``imagebuild verify``: run each image's checks in throwaway containers, record results.

The field rule: verify torch immediately before redistributing; it must print
``2.11.0+cu130 13.0``. A record is kept per image *content* (image ID plus the content
fingerprint of its layers and config) and per set of checks, so later steps can ask:
was this exact image verified, when, and against which checks?
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from . import __version__
from .closure import ClosureLock, closures_of
from .engine import Engine, RunResult
from .errors import LockError, NotVerified
from .fsutil import atomic_write_text
from .image import ImageInfo
from .lock import Lock
from .naming import input_hash, short_id
from .spec import Check, CheckKind, Spec, cuda_of, expect_fields
from .untrusted import loads_json

STDERR_TAIL = 3


@dataclass(frozen=True)
class CheckResult:
    check: str
    kind: CheckKind
    expected: str
    got: str
    passed: bool
    hint: str | None = None


@dataclass(frozen=True)
class VerifyRecord:
    image: str
    image_id: str
    fingerprint: str
    input_hash: str | None
    checks_digest: str
    checked_at: str
    passed: bool
    results: tuple[CheckResult, ...]
    tool_version: str = __version__

    def to_json(self) -> str:
        data = asdict(self)
        data["results"] = [asdict(r) for r in self.results]
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> VerifyRecord:
        data = loads_json(text)
        data["results"] = tuple(CheckResult(**r) for r in data["results"])
        return cls(**data)


CLOSURE_CHECK = "closure-locked"
# Prints every installed distribution as name==version (canonical names; the first on
# sys.path wins, as at import): what the closure check compares with the image's lock.
_LIST_INSTALLED = (
    "import importlib.metadata as m, re\n"
    "seen = {}\n"
    "for d in m.distributions():\n"
    "    name = d.metadata['Name']\n"
    "    if name:\n"
    "        seen.setdefault(re.sub(r'[-_.]+', '-', name).lower(), d.version)\n"
    "print(' '.join(f'{n}=={v}' for n, v in sorted(seen.items())))\n"
)


def closure_check(closure: ClosureLock) -> Check:
    """The automatic check of an image whose closure is locked: every locked distribution
    is installed, at its locked version."""
    listing = "".join(f"{p.name}=={p.version}\n" for p in closure.packages)
    digest = hashlib.sha256(listing.encode()).hexdigest()[:12]
    return Check(name=CLOSURE_CHECK, run=("python3", "-c", _LIST_INSTALLED), kind="closure",
                 expected=f"the {len(closure.packages)} distributions of "
                          f"{closure.path.name} ({digest})",
                 hint=f"the image does not hold its lock: a RUN installed or removed "
                      f"something outside {closure.path.name}. Build from the lock "
                      f"(install steps with --no-deps and the install-requirements.txt "
                      f"imagebuild writes), or run 'imagebuild lock' if the spec changed",
                 timeout=120.0)


def _closure_verdict(closure: ClosureLock, out: str) -> tuple[str, bool]:
    installed: dict[str, str] = {}
    for word in out.split():
        name, sep, version = word.partition("==")
        if sep:
            installed[name] = version
    missing = [p.name for p in closure.packages if p.name not in installed]
    differ = [f"{p.name} {installed[p.name]} (locked {p.version})" for p in closure.packages
              if p.name in installed and installed[p.name] != p.version]
    if not missing and not differ:
        return f"all {len(closure.packages)} installed as locked", True
    parts = ([f"differ: {', '.join(differ)}"] if differ else []) + (
        [f"missing: {', '.join(missing)}"] if missing else [])
    return "; ".join(parts), False


def expected_text(check: Check, lock: Lock) -> str:
    """What the check expects, as shown to the user: locked checks resolve the version,
    an ``expect:`` its fields from the lock (``{torch.version}``)."""
    if check.kind == "output":
        return render_expect(check.expected, lock)
    if check.kind == "closure":
        return check.expected
    if check.kind == "locked":
        return f"=={lock.get(check.expected).version}"
    if check.kind == "succeeds":
        return "exit 0"
    return check.expected


def render_expect(text: str, lock: Lock) -> str:
    """An ``expect:`` with its fields filled from the lock: ``{torch.version}`` is the
    locked version, ``{torch.cuda}`` the CUDA release it names (``+cu130``: 13.0)."""
    out = []
    for part in expect_fields(text):
        if isinstance(part, str):
            out.append(part)
            continue
        name, attr = part
        version = lock.get(name).version
        value = version if attr == "version" else cuda_of(version)
        if value is None:
            raise LockError(f"{{{name}.cuda}}: the locked {name} {version} names no CUDA "
                            f"release (no +cuNNN in its version)",
                            hint=f"use {{{name}.version}} in the check, or write the release")
        out.append(value)
    return "".join(out)


def checks_digest(checks: list[Check], lock: Lock) -> str:
    material = [{"name": c.name, "run": list(c.run), "kind": c.kind,
                 "expected": expected_text(c, lock)} for c in checks]
    blob = json.dumps(material, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def evaluate(check: Check, lock: Lock, result: RunResult) -> CheckResult:
    """Judge one check's run. Pure: no engine."""
    expected = expected_text(check, lock)
    out = result.stdout.strip()
    err_tail = " | ".join(result.stderr.strip().splitlines()[-STDERR_TAIL:])

    def res(got: str, passed: bool) -> CheckResult:
        return CheckResult(check=check.name, kind=check.kind, expected=expected, got=got,
                           passed=passed, hint=None if passed else check.hint)

    if result.timed_out:
        return res(f"timed out after {check.timeout:g}s (killed)", False)
    if result.exit_code != 0:
        detail = err_tail or out or "no output"
        return res(f"exit {result.exit_code}: {detail}", False)
    if check.kind == "succeeds":
        return res("exit 0", True)
    if check.kind == "output":
        return res(out, out == expected)
    if check.kind == "closure":
        closure = next(c for c in closures_of(lock).values()
                       if closure_check(c).expected == check.expected)
        return res(*_closure_verdict(closure, out))
    try:
        version = Version(out)
    except InvalidVersion:
        return res(f"{out!r} (not a version)", False)
    if check.kind == "specifier":
        return res(out, SpecifierSet(check.expected, prereleases=True).contains(version))
    locked = Version(lock.get(check.expected).version)
    return res(out, version == locked)


# -- records ---------------------------------------------------------------------------------


def _record_path(spec: Spec, image_id: str) -> Path:
    return spec.state_dir / "verified" / f"{image_id.removeprefix('sha256:')}.json"


def read_record(spec: Spec, info: ImageInfo) -> VerifyRecord | None:
    path = _record_path(spec, info.id)
    try:
        record = VerifyRecord.from_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if record.image_id != info.id or record.fingerprint != info.fingerprint:
        return None
    return record


def image_checks(spec: Spec, name: str, lock: Lock | None = None) -> list[Check]:
    """The spec's checks of ``name``, then (with a ``lock`` holding its resolved closure)
    the automatic closure check."""
    checks = [spec.checks[c] for c in spec.images[name].checks]
    closure = closures_of(lock).get(name) if lock is not None else None
    if closure is not None and closure.unresolved is None:
        checks.append(closure_check(closure))
    return checks


def is_passing(record: VerifyRecord | None, spec: Spec, lock: Lock, name: str,
               info: ImageInfo) -> bool:
    """Whether ``record`` passed for exactly this content against the current checks."""
    return (record is not None and record.passed and record.fingerprint == info.fingerprint
            and record.checks_digest == checks_digest(image_checks(spec, name, lock), lock))


def passing_record(spec: Spec, lock: Lock, name: str, info: ImageInfo) -> VerifyRecord | None:
    """The passing record of this exact image against the spec's current checks, if any."""
    record = read_record(spec, info)
    return record if is_passing(record, spec, lock, name, info) else None


def require_verified(spec: Spec, lock: Lock, name: str, info: ImageInfo) -> VerifyRecord:
    """For distribute and backups: refuse an image without a passing record."""
    record = passing_record(spec, lock, name, info)
    if record is None:
        raise NotVerified(
            f"{name} ({short_id(info.id)}) is not verified against its current checks",
            hint=f"run 'imagebuild verify {name}'; an image that fails its checks must not "
                 f"be distributed",
        )
    return record


# -- running -----------------------------------------------------------------------------------


def verify_image(spec: Spec, lock: Lock, engine: Engine, name: str,
                 info: ImageInfo) -> VerifyRecord:
    """Run every check of ``name`` against image ``info`` and record the result."""
    checks = image_checks(spec, name, lock)
    results = tuple(
        evaluate(check, lock, engine.run_check(info.id, list(check.run), check.timeout))
        for check in checks
    )
    record = VerifyRecord(
        image=name, image_id=info.id, fingerprint=info.fingerprint,
        input_hash=input_hash(info), checks_digest=checks_digest(checks, lock),
        checked_at=datetime.now(UTC).isoformat(timespec="seconds"),
        passed=all(r.passed for r in results), results=results,
    )
    atomic_write_text(_record_path(spec, info.id), record.to_json())
    return record


def table(records: list[VerifyRecord]) -> str:
    rows = [("image", "check", "expected", "got", "result")]
    for rec in records:
        for r in rec.results:
            rows.append((rec.image, r.check, r.expected, r.got, "pass" if r.passed else "FAIL"))
        if not rec.results:
            rows.append((rec.image, "(no checks)", "", "", "pass"))
    widths = [min(max(len(row[i]) for row in rows), 48) for i in range(5)]
    lines = []
    for row in rows:
        cells = [(c if len(c) <= 48 else c[:45] + "...").ljust(widths[i])
                 for i, c in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    hints = [(rec.image, r) for rec in records for r in rec.results if not r.passed]
    for image, r in hints:
        lines.append("")
        lines.append(f"{image} / {r.check}: expected {r.expected}, got {r.got}")
        if r.hint:
            lines.append(f"  hint: {r.hint}")
    return "\n".join(lines)
