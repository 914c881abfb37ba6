"""The declarative spec, ``imagebuild.yaml``, parsed at the edge into frozen dataclasses.

Everything past ``load_spec`` works on typed, validated values: an image name is a
valid Docker repository name, an apt package is a package name, an env value cannot
carry a newline or a ``$``. A value that could inject a line (or a shell word) into a
rendered Dockerfile is refused here, with the file and line it came from.

The YAML is read with a subclass of ``yaml.SafeLoader`` (so exactly what
``yaml.safe_load`` accepts) whose only addition is remembering line numbers.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name

from .errors import LockError, SpecError
from .fsutil import read_file_bytes
from .layers import DEFAULT_LAYERS, GROUP_NAME, PATTERN, LayerGroup
from .lock import (
    INDEX_URL,
    LOCAL_PREFIX,
    SHA256,
    WHEEL_FILE,
    WHEEL_URL,
    fetched_source,
    parse_wheel,
    url_filename,
)

SCHEMA_VERSION = 2  # 2: target, locks, images' requires and overrides (the closure lock)
DEFAULT_SPEC = "imagebuild.yaml"
MAX_CHECK_TIMEOUT = 24 * 3600

# -- YAML with line numbers -------------------------------------------------------------


class _LineDict(dict[str, Any]):
    line: int = 0
    key_lines: dict[str, int]


class _LineList(list[Any]):
    line: int = 0
    item_lines: list[int]


# libyaml's parser when PyYAML has it (its wheels do): the same documents, the same
# errors and marks, several times faster than the pure-Python one on every command
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_SafeLoader):  # type: ignore[valid-type,misc]
    """SafeLoader that records the line of every mapping key and sequence item."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _LineDict:
    loader.flatten_mapping(node)
    out = _LineDict()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            raise yaml.constructor.ConstructorError(
                None, None, f"mapping keys must be strings, not {key!r}", key_node.start_mark
            )
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> _LineList:
    out = _LineList(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [child.start_mark.line + 1 for child in node.value]
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


# -- typed model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WheelDecl:
    """A wheel the stack uses: a file under the wheels directory, a file on an index, or a
    file downloaded by URL (a prebuilt release) and checked against its declared sha256.
    A local or downloaded wheel is served to the builds; an index wheel is installed from
    its index."""

    filename: str
    index: str | None = None  # None: served (a local file, or a file fetched by URL)
    url: str | None = None  # where a prebuilt wheel is downloaded from, once
    sha256: str | None = None  # what its bytes must hash to (declared with the URL)
    serves: tuple[str, ...] = ()  # other packages its index may serve (canonical names)
    # the canonical project name and the version, from the file name (PEP 427): read
    # once here (the spec reader has checked the name), never parsed again downstream
    name: str = field(init=False)
    version: str = field(init=False)

    def __post_init__(self) -> None:
        parsed = parse_wheel(self.filename)
        object.__setattr__(self, "name", parsed.name)
        object.__setattr__(self, "version", parsed.version)

    @property
    def source(self) -> str:
        """Where wheels.lock says it comes from."""
        if self.url is not None and self.sha256 is not None:
            source = fetched_source(self.url, self.filename, self.sha256)
            assert source is not None  # checked when the spec was read
            return source
        return self.index if self.index is not None else LOCAL_PREFIX + self.filename


# Where a wheel build finds its source and leaves its wheel, inside the builder container
BUILD_SRC = "/imagebuild/src"
BUILD_OUT = "/imagebuild/out"
BUILD_CCACHE = "/imagebuild/ccache"
DEFAULT_WHEEL_COMMAND = ("python3", "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                         "--wheel-dir", BUILD_OUT, ".")
# set by imagebuild in every wheel build; the spec cannot override them
RESERVED_BUILD_ENV = frozenset({"SOURCE_DATE_EPOCH", "CCACHE_DIR", "IMAGEBUILD_OUT",
                                "IMAGEBUILD_SRC"})


@dataclass(frozen=True)
class WheelBuild:
    """A wheel built from source: a git commit, patches applied in order, built by
    ``command`` in a throwaway container of ``builder`` with ``env``."""

    name: str  # canonical project name of the wheel it makes
    git: str  # where the source is fetched from (not an input: the commit is)
    commit: str  # full hex commit id
    patches: tuple[Path, ...]  # absolute paths of patch files, applied in this order
    builder: str  # image reference of the build environment
    builder_digest: str | None
    env: tuple[tuple[str, str], ...]
    command: tuple[str, ...] = DEFAULT_WHEEL_COMMAND
    submodules: bool = True  # check out the submodules, recursively (git clone --recursive)

    @property
    def builder_reference(self) -> str:
        return f"{self.builder}@{self.builder_digest}" if self.builder_digest else self.builder


@dataclass(frozen=True)
class Params:
    """Template parameters. Every field is validated for the Dockerfile it lands in."""

    apt_packages: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    uv: str | None = None  # canonical name of the locked index wheel pip installs uv from
    pip_index: str | None = None  # index for dependency resolution; None: installer default


@dataclass(frozen=True)
class Override:
    """A requirement that replaces every requirement on its package while locking (uv's
    ``--override``), with the reason it exists: the lock step refuses a metadata
    conflict that no declared override covers."""

    requirement: str
    reason: str
    # the distributions whose requirement on the package it may silence (canonical names):
    # the lock refuses any other distribution's requirement the override would discard
    covers: tuple[str, ...] = ()

    @property
    def package(self) -> str:
        return canonicalize_name(Requirement(self.requirement).name)


@dataclass(frozen=True)
class Target:
    """What the images' Python closure is locked for: the interpreter inside the images
    and their platform (uv's ``--python-version`` and ``--python-platform``)."""

    python: str  # "3.12"
    platform: str  # "aarch64-manylinux_2_28"


CheckKind = Literal["output", "specifier", "locked", "succeeds", "closure"]


@dataclass(frozen=True)
class Check:
    name: str
    run: tuple[str, ...]
    kind: CheckKind
    expected: str  # exact output, specifier text, locked wheel name, or "" for succeeds
    hint: str | None = None
    timeout: float = 120.0


@dataclass(frozen=True)
class DeclaredFile:
    """A file or directory of the user's (a launcher script of their own checkout, mods,
    recipes) copied into an image: hashed into its input hash, COPYed to ``dest``."""

    source: Path  # absolute; may be outside the spec's directory
    dest: str  # absolute path in the image
    mode: int | None = None  # of the files (None: 0755 if executable at the source, else 0644)


@dataclass(frozen=True)
class ImageSpec:
    name: str
    aliases: tuple[str, ...]
    template: str
    parent: str | None
    base: str | None
    base_digest: str | None
    params: Params
    wheels: tuple[str, ...]  # canonical names of locked local wheels installed
    torch: str | None  # canonical name of the locked index wheel force-reinstalled
    checks: tuple[str, ...]
    requires: tuple[str, ...] = ()  # requirements this image adds, resolved from pip_index
    overrides: tuple[Override, ...] = ()  # for this image and its children
    files: tuple[DeclaredFile, ...] = ()  # copied into the image, last
    workdir: str | None = None  # WORKDIR
    entrypoint: tuple[str, ...] | None = None  # ENTRYPOINT, exec form
    cmd: tuple[str, ...] | None = None  # CMD, exec form

    @property
    def base_reference(self) -> str | None:
        if self.base is None:
            return None
        return f"{self.base}@{self.base_digest}" if self.base_digest else self.base


@dataclass(frozen=True)
class Worker:
    name: str
    address: str


@dataclass(frozen=True)
class Cluster:
    ssh_user: str | None = None
    ssh_port: int | None = None
    ssh_identity: str | None = None
    ssh_config: str | None = None
    workers: tuple[Worker, ...] = ()
    # why the cluster is not known here (its inventory file does not exist yet: the test
    # bed writes it): what needs no worker (plan, render, lock, build) still works, and
    # what needs one says this
    unavailable: str | None = None

    def require(self) -> None:
        if self.unavailable is not None:
            raise SpecError(self.unavailable, hint="for the test bed, run scripts/testbed up "
                                                   "first; else fix cluster.inventory")


@dataclass(frozen=True)
class SshLocation:
    """A directory on another host: ``ssh://[user@]host[:port]/absolute/path``."""

    host: str
    path: str
    user: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"ssh://{user}{self.host}{port}{self.path}"


@dataclass(frozen=True)
class Backups:
    location: Path | SshLocation  # a local directory, or one on another host
    keep: int = 2
    mirrors: tuple[SshLocation, ...] = ()  # copies of the store on other hosts

    @property
    def local(self) -> Path | None:
        """The directory when it is on this host."""
        return self.location if isinstance(self.location, Path) else None


@dataclass(frozen=True)
class Registry:
    """Where ``distribute --via registry`` puts images for the workers to pull."""

    address: str  # host[:port], as the workers' engines and this host reach it
    tls: bool = True  # False: plain HTTP (the workers' engines must list it as insecure)
    repository: str = ""  # a path prefix: ADDRESS/PREFIX/NAME
    start: bool = False  # start CNCF distribution (docker-registry) here if it does not answer
    storage: Path | None = None  # where a started registry keeps its blobs
    min_workers: int = 4  # --via auto: the registry from this many workers on

    def repo(self, name: str) -> str:
        """The repository of image ``name`` in the registry (without the address)."""
        return f"{self.repository}/{name}" if self.repository else name


@dataclass(frozen=True)
class Spec:
    path: Path
    templates_dir: Path
    dockerfiles_dir: Path
    lock_path: Path
    wheels_dir: Path
    wheels: tuple[WheelDecl, ...]
    images: Mapping[str, ImageSpec]
    checks: Mapping[str, Check]
    cluster: Cluster
    backups: Backups | None
    state_dir: Path
    target: Target
    registry: Registry | None = None
    locks_dir: Path | None = None  # the closure locks (pylock.<image>.toml); None: <root>/locks
    built: Mapping[str, WheelBuild] = field(default_factory=dict)  # wheels built from source
    layers: tuple[LayerGroup, ...] = DEFAULT_LAYERS  # install groups, stable to volatile
    schema: int = SCHEMA_VERSION
    _aliases: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def root(self) -> Path:
        return self.path.parent

    def resolve(self, name: str) -> str:
        """Full image name for a name or short name (``mimo`` -> ``vllm-node-mimo``)."""
        if name in self.images:
            return name
        if name in self._aliases:
            return self._aliases[name]
        known = sorted(set(self.images) | set(self._aliases))
        raise SpecError(
            f"{self.path}: unknown image {name!r}{did_you_mean(name, known)}",
            hint=f"images in this spec: {', '.join(self.images)}",
        )

    def lineage(self, name: str) -> list[str]:
        """``name`` and its ancestors, root first."""
        chain: list[str] = []
        current: str | None = self.resolve(name)
        while current is not None:
            chain.append(current)
            current = self.images[current].parent
        return chain[::-1]

    def local_names(self) -> set[str]:
        """Canonical names of the local and built wheels (served to the builds)."""
        return {w.name for w in self.wheels if w.index is None} | set(self.built)

    def torch_of(self, name: str) -> str | None:
        """The torch of ``name``'s lineage: its own, or its nearest ancestor's."""
        return next((t for n in reversed(self.lineage(name)) if (t := self.images[n].torch)),
                    None)

    def overrides_for(self, name: str) -> dict[str, Override]:
        """The overrides in force for ``name``: its ancestors' and its own, by package (an
        image's own override of a package replaces an ancestor's)."""
        out: dict[str, Override] = {}
        for n in self.lineage(name):
            for o in self.images[n].overrides:
                out[o.package] = o
        return out

    @property
    def wheel_store(self) -> Path:
        """The content-addressed store of built wheels."""
        return self.state_dir / "wheel-store"

    @property
    def lock_dir(self) -> Path:
        return self.locks_dir if self.locks_dir is not None else self.root / "locks"

    def closure_lock_path(self, name: str) -> Path:
        """PEP 751 names a lock for one purpose ``pylock.<name>.toml``."""
        return self.lock_dir / f"pylock.{name}.toml"

    def closure(self, names: list[str] | None) -> list[str]:
        """The named images and all their ancestors, parents first (all images if None)."""
        wanted = list(self.images) if not names else [self.resolve(n) for n in names]
        order: list[str] = []
        for name in wanted:
            chain: list[str] = []
            current: str | None = name
            while current is not None and current not in order and current not in chain:
                chain.append(current)
                current = self.images[current].parent
            order.extend(reversed(chain))
        return order


# -- loading -------------------------------------------------------------------------------

_IMAGE_NAME = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*\Z")
_ALIAS = re.compile(r"^[a-z0-9][a-z0-9._-]*\Z")
_REFERENCE = re.compile(r"^[a-z0-9][a-z0-9._/-]*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?\Z")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}\Z")
_APT = re.compile(r"^[a-z0-9][a-z0-9+.-]+(?:=[A-Za-z0-9.+:~_-]+)?\Z")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_ENV_VALUE = re.compile(r"^[A-Za-z0-9_.,:/=+@%-]*\Z")
_URL = INDEX_URL
_REQUIREMENT_CHARS = re.compile(r"^[A-Za-z0-9_.\-\[\],<>=!~*+ ]+\Z")
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*\Z")
_USER = re.compile(r"^[a-z_][a-z0-9_.-]*\Z")
_PACKAGE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?\Z")  # PEP 508 names
_WORKER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_WHEEL_FILE = WHEEL_FILE
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


_EXPECT_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
EXPECT_ATTRIBUTES = ("version", "cuda")
_CUDA_TAG = re.compile(r"^cu(\d{2,3})\Z")


def expect_fields(text: str) -> list[str | tuple[str, str]]:
    """An ``expect:`` split into literal text and ``{WHEEL.ATTRIBUTE}`` fields taken from
    the lock (``{torch.version} {torch.cuda}``); ``{{`` and ``}}`` are literal braces.
    ValueError names what does not parse."""
    out: list[str | tuple[str, str]] = []
    at = 0
    for m in _EXPECT_TOKEN.finditer(text):
        out.append(text[at:m.start()])
        at = m.end()
        tok = m.group(0)
        if tok in ("{{", "}}"):
            out.append(tok[0])
            continue
        inner = m.group(1)
        if inner is None:
            raise ValueError(f"a lone {tok!r} at character {m.start() + 1} (write {tok * 2} "
                             f"for a literal brace)")
        name, dot, attr = inner.strip().rpartition(".")
        if not dot or not name or attr not in EXPECT_ATTRIBUTES:
            raise ValueError(f"{{{inner}}} is not a field such as {{torch.version}} "
                             f"(attributes: {', '.join(EXPECT_ATTRIBUTES)})")
        out.append((str(canonicalize_name(name)), attr))
    out.append(text[at:])
    return [p for p in out if p != ""]


def cuda_of(version: str) -> str | None:
    """The CUDA release a wheel's local version names (``2.11.0+cu130`` -> ``13.0``), or
    None when it names none."""
    _public, plus, local = version.partition("+")
    for part in local.split(".") if plus else ():
        m = _CUDA_TAG.match(part)
        if m:
            digits = m.group(1)
            return f"{int(digits[:-1])}.{digits[-1]}"
    return None


def did_you_mean(word: str, options: list[str] | set[str]) -> str:
    close = difflib.get_close_matches(word, sorted(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Reader:
    """Walks the parsed YAML, keeping the file and a dotted path for messages."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, line: int | None, what: str, hint: str | None = None) -> SpecError:
        loc = f"{self.path}:{line}" if line else str(self.path)
        return SpecError(f"{loc}: {where}: {what}", hint=hint)

    def mapping(self, value: Any, where: str, line: int | None) -> _LineDict:
        if not isinstance(value, dict):
            raise self.fail(where, line, f"expected a mapping, got {type(value).__name__}")
        if not isinstance(value, _LineDict):  # pragma: no cover - only from our loader
            d = _LineDict(value)
            d.key_lines = {}
            return d
        return value

    def keys(self, value: _LineDict, where: str, allowed: set[str], required: set[str]) -> None:
        for key in value:
            if key not in allowed:
                raise self.fail(
                    where,
                    value.key_lines.get(key),
                    f"unknown key {key!r}{did_you_mean(key, allowed)}",
                    hint=f"allowed keys: {', '.join(sorted(allowed))}",
                )
        for key in sorted(required - set(value)):
            raise self.fail(where, value.line, f"missing required key {key!r}")

    def string(self, value: Any, where: str, line: int | None, pattern: re.Pattern[str] | None,
               what: str) -> str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.fail(where, line, f"expected {what} (a string), got {value!r}")
        text = str(value)
        if _CONTROL.search(text):
            raise self.fail(
                where, line,
                f"{text!r} contains a newline or control character",
                hint="a spec value must not be able to inject lines into a Dockerfile",
            )
        if pattern is not None and not pattern.match(text):
            raise self.fail(where, line, f"{text!r} is not a valid {what}")
        return text

    def string_list(self, value: Any, where: str, line: int | None,
                    pattern: re.Pattern[str] | None, what: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.fail(where, line, f"expected a list of {what}, got {value!r}")
        lines = getattr(value, "item_lines", [line] * len(value))
        return tuple(
            self.string(item, f"{where}[{i}]", lines[i], pattern, what)
            for i, item in enumerate(value)
        )

    def requirement(self, value: Any, where: str, line: int | None) -> str:
        text = self.string(value, where, line, _REQUIREMENT_CHARS, "requirement")
        try:
            Requirement(text)
        except InvalidRequirement as exc:
            raise self.fail(where, line, f"{text!r} is not a valid requirement: {exc}") from None
        return text

    def expanded(self, value: Any, where: str, line: int | None,
                 pattern: re.Pattern[str] | None, what: str) -> str:
        """A string with ``${VAR}`` and ``${VAR:-default}`` expanded from the environment,
        then checked as any other (what the variable brings is checked too)."""
        text = self.string(value, where, line, None, what)
        try:
            expanded = expand_vars(text)
        except KeyError as exc:
            raise self.fail(
                where, line, f"{text!r} uses the environment variable {exc.args[0]} which is unset",
                hint="set it, or give a default with ${VAR:-default}",
            ) from None
        return self.string(expanded, where, line, pattern, what)

    def to_path(self, value: Any, where: str, line: int | None) -> Path:
        expanded = self.expanded(value, where, line, None, "path")
        p = Path(expanded).expanduser()
        return p if p.is_absolute() else (self.path.parent / p)


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_vars(text: str) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}``; an unset VAR without default is a KeyError."""

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        value = os.environ.get(name)
        if value:
            return value
        if default is not None:
            return default
        raise KeyError(name)

    return _VAR.sub(sub, text)


_TOP_KEYS = {"schema", "templates", "dockerfiles", "lock", "locks", "target", "wheels", "images",
             "checks", "cluster", "backups", "state", "registry", "layers"}
_IMAGE_KEYS = {"aliases", "template", "parent", "base", "base_digest", "params", "wheels",
               "torch", "checks", "requires", "overrides", "files", "workdir", "entrypoint",
               "cmd"}
# an absolute path in an image: no "..", no "$" (a Dockerfile would substitute it), no space
_IMAGE_PATH = re.compile(r"^/(?:(?!\.\.?(?:/|$))[A-Za-z0-9._+@-]+/?)*\Z")
_FILE_KEYS = {"src", "dest", "mode"}
_PARAM_KEYS = {"apt_packages", "env", "uv", "pip_index"}
_PYTHON = re.compile(r"^3\.[0-9]{1,2}\Z")
_PLATFORM = re.compile(r"^[a-z0-9_]+-[a-z0-9_.-]+\Z")
_CHECK_KEYS = {"run", "expect", "specifier", "locked", "succeeds", "hint", "timeout"}
_CHECK_KINDS: dict[str, CheckKind] = {"expect": "output", "specifier": "specifier",
                                      "locked": "locked", "succeeds": "succeeds"}
_CLUSTER_KEYS = {"inventory", "ssh_user", "ssh_port", "ssh_identity", "ssh_config", "workers"}


def load_spec(path: str | os.PathLike[str] | None = None) -> Spec:
    """Parse and validate a spec file. Raises SpecError with file:line on any problem."""
    spec_path = Path(path or DEFAULT_SPEC).absolute()
    try:
        text = read_file_bytes(spec_path).decode("utf-8")
    except FileNotFoundError:
        raise SpecError(
            f"{spec_path}: spec file not found",
            hint="run from the directory holding imagebuild.yaml, or pass -f PATH",
        ) from None
    except OSError as exc:
        raise SpecError(f"{spec_path}: cannot read the spec: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{spec_path}: the spec is not UTF-8 text (byte {exc.start})") from None
    return spec_from_text(text, spec_path)


def spec_from_text(text: str, path: Path) -> Spec:
    """A spec from its text, as if read from ``path`` (relative paths resolve there)."""
    return _build_spec(_parse_yaml(text, path), path)


def with_wheel_commit(text: str, path: Path, name: str, commit: str
                      ) -> tuple[str, str, Spec]:
    """The spec's text with the ``commit:`` of the wheel ``name`` under wheels.build set
    to ``commit`` (nothing else changes: comments, layout and quoting stay), the value it
    replaced, and the spec the new text is (parsed and validated here)."""
    data = _parse_yaml(text, path)  # bounded, and a SpecError with file:line if broken
    builds = (data.get("wheels") or {}).get("build") if isinstance(data, dict) else None
    if not isinstance(builds, list) or not any(
            isinstance(b, dict) and canonicalize_name(str(b.get("name"))) ==
            canonicalize_name(name) for b in builds):
        raise SpecError(f"{path}: {name!r} is not a wheel built from source here",
                        hint="the wheels under wheels.build can be resolved")
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    target = None
    for key, value in getattr(node, "value", []):
        if key.value != "wheels" or not isinstance(value, yaml.MappingNode):
            continue
        for k2, v2 in value.value:
            if k2.value != "build" or not isinstance(v2, yaml.SequenceNode):
                continue
            for item in v2.value:
                fields = {k.value: v for k, v in getattr(item, "value", [])
                          if isinstance(k, yaml.ScalarNode)}
                named = fields.get("name")
                if isinstance(named, yaml.ScalarNode) and canonicalize_name(
                        str(named.value)) == canonicalize_name(name):
                    target = fields.get("commit")
    if not isinstance(target, yaml.ScalarNode) or target.start_mark.index >= \
            target.end_mark.index:
        raise SpecError(f"{path}: wheels.build entry {name!r} has no commit: value to set",
                        hint="write 'commit: <anything>' in the entry, then resolve again")
    start, end = target.start_mark.index, target.end_mark.index
    new = f'{text[:start]}"{commit}"{text[end:]}'  # quoted: YAML reads 1234e5... as a number
    return new, str(target.value), spec_from_text(new, path)


MAX_YAML_CHARS = 1 << 20  # a spec is a page or two; a megabyte is a mistake or an attack
MAX_YAML_NODES = 100_000  # after expanding aliases
MAX_YAML_DEPTH = 50


def _parse_yaml(text: str, path: Path) -> Any:
    """YAML as ``yaml.safe_load`` reads it, within bounds: a file of a sane size whose
    aliases do not expand beyond ``MAX_YAML_NODES`` nodes (the "billion laughs") and
    whose nesting stays within ``MAX_YAML_DEPTH``."""
    if len(text) > MAX_YAML_CHARS:
        raise SpecError(f"{path}: {len(text)} characters is too large for a spec "
                        f"(at most {MAX_YAML_CHARS})")
    try:
        loader = _Loader(text)
    except yaml.YAMLError as exc:  # a character YAML does not allow
        raise SpecError(f"{path}: malformed YAML: {exc}") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, path)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise SpecError(f"{path}{line}: malformed YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: malformed YAML: {exc}") from None
    except RecursionError:
        raise SpecError(f"{path}: malformed YAML: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of thousands of digits
        raise SpecError(f"{path}: a value cannot be read: {exc}") from None
    finally:
        loader.dispose()


def _check_expansion(root: yaml.Node, path: Path) -> None:
    """Refuse a document whose aliases expand beyond bounds, or refer to themselves."""
    sizes: dict[int, int] = {}
    stack: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        line = node.start_mark.line + 1
        if key in stack:
            raise SpecError(f"{path}:{line}: an alias refers to the node that contains it")
        if depth > MAX_YAML_DEPTH:
            raise SpecError(f"{path}:{line}: nested more than {MAX_YAML_DEPTH} levels deep")
        stack.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        stack.discard(key)
        if total > MAX_YAML_NODES:
            raise SpecError(f"{path}:{line}: its aliases expand to more than "
                            f"{MAX_YAML_NODES} values; refusing to read it",
                            hint="a spec needs no deeply repeated aliases; write the values "
                                 "out")
        sizes[key] = total
        return total

    size(root, 0)


def _build_spec(data: Any, path: Path) -> Spec:
    r = _Reader(path)
    top = r.mapping(data, "top level", 1)
    r.keys(top, "top level", _TOP_KEYS, {"schema", "images", "target"})
    schema = top["schema"]
    if schema == 1:
        raise r.fail("schema", top.key_lines.get("schema"),
                     "schema 1 predates the closure locks; this imagebuild reads schema 2",
                     hint="set schema: 2, add target: {python: \"3.12\", platform: "
                          "aarch64-manylinux_2_28}, move params.transformers to the image's "
                          "requires: (or overrides: with a reason, as mimo's transformers>=5), "
                          "declare the torch override under vllm-node's overrides:, then run "
                          "'imagebuild lock' and commit locks/")
    if schema != SCHEMA_VERSION:
        raise r.fail("schema", top.key_lines.get("schema"),
                     f"unsupported schema {schema!r}; this imagebuild reads schema "
                     f"{SCHEMA_VERSION}")

    def top_path(key: str, default: str) -> Path:
        return r.to_path(top.get(key, default), key, top.key_lines.get(key))

    templates_dir = top_path("templates", "templates")
    dockerfiles_dir = top_path("dockerfiles", "dockerfiles")
    lock_path = top_path("lock", "wheels.lock")
    locks_dir = top_path("locks", "locks")
    target = _read_target(r, top.get("target"), top.key_lines.get("target"))
    state_dir = top_path("state", "${IMAGEBUILD_STATE:-~/.local/state/imagebuild}")

    wheels_dir, wheels, built = _read_wheels(r, top.get("wheels"), top.key_lines.get("wheels"))
    checks = _read_checks(r, top.get("checks", _empty()), top.key_lines.get("checks"))
    images, aliases = _read_images(r, top["images"], top.key_lines.get("images"), wheels,
                                   set(built), checks)
    cluster = _read_cluster(r, top.get("cluster"), top.key_lines.get("cluster"))
    backups = _read_backups(r, top.get("backups"), top.key_lines.get("backups"))
    registry = _read_registry(r, top.get("registry"), top.key_lines.get("registry"),
                              state_dir)
    layers = _read_layers(r, top.get("layers"), top.key_lines.get("layers"))
    return Spec(
        path=path,
        templates_dir=templates_dir,
        dockerfiles_dir=dockerfiles_dir,
        lock_path=lock_path,
        wheels_dir=wheels_dir,
        wheels=wheels,
        images=images,
        checks=checks,
        cluster=cluster,
        backups=backups,
        state_dir=state_dir,
        target=target,
        registry=registry,
        locks_dir=locks_dir,
        built=built,
        layers=layers,
        _aliases=aliases,
    )


MAX_LAYER_GROUPS = 16


def _read_layers(r: _Reader, raw: Any, line: int | None) -> tuple[LayerGroup, ...]:
    """``layers:``: the install groups, stable to volatile (see layers.py); absent: the
    default (cuda, torch, deps, flashinfer, wheels)."""
    if raw is None:
        return DEFAULT_LAYERS
    if not isinstance(raw, list) or not raw:
        raise r.fail("layers", line, "expected a list of {name, packages, local}",
                     hint="leave 'layers:' out for the default groups")
    if len(raw) > MAX_LAYER_GROUPS:
        raise r.fail("layers", line, f"{len(raw)} groups; at most {MAX_LAYER_GROUPS}",
                     hint="each group is two build steps in every image")
    groups: list[LayerGroup] = []
    for i, item in enumerate(raw):
        where = f"layers[{i}]"
        iline = raw.item_lines[i] if isinstance(raw, _LineList) else line
        entry = r.mapping(item, where, iline)
        r.keys(entry, where, {"name", "packages", "local"}, {"name"})
        name = r.string(entry["name"], f"{where}.name", entry.key_lines.get("name"),
                        GROUP_NAME, "group name (lower case letters, digits, -)")
        packages = r.string_list(entry.get("packages", []), f"{where}.packages",
                                 entry.key_lines.get("packages"), PATTERN,
                                 "package name or pattern (such as nvidia-*)")
        local = entry.get("local", False)
        if not isinstance(local, bool):
            raise r.fail(f"{where}.local", entry.key_lines.get("local"),
                         f"expected true or false, got {local!r}")
        if not packages and not local:
            raise r.fail(where, iline, f"group {name!r} takes nothing",
                         hint="give it packages: [names or patterns], or local: true")
        if any(g.name == name for g in groups):
            raise r.fail(f"{where}.name", entry.key_lines.get("name"),
                         f"group {name!r} is declared twice")
        canonical = tuple(canonicalize_name(p) for p in packages)  # keeps * and ?
        groups.append(LayerGroup(name=name, packages=canonical, local=local))
    if sum(g.catch_all for g in groups) != 1:
        raise r.fail("layers", line, "exactly one group must hold '*' (what no other group "
                     "takes)", hint="add packages: ['*'] to the group of the rest of the "
                                    "closure")
    if sum(g.local for g in groups) > 1:
        raise r.fail("layers", line, "at most one group can be local: true")
    return tuple(groups)


def _read_target(r: _Reader, raw: Any, line: int | None) -> Target:
    m = r.mapping(raw, "target", line)
    r.keys(m, "target", {"python", "platform"}, {"python", "platform"})
    python = m["python"]
    if isinstance(python, float):
        raise r.fail("target.python", m.key_lines.get("python"),
                     f"{python!r} is a number: YAML reads an unquoted 3.10 as 3.1",
                     hint=f'quote it: python: "{python}"')
    return Target(
        python=r.string(python, "target.python", m.key_lines.get("python"), _PYTHON,
                        'Python version such as "3.12"'),
        platform=r.expanded(m["platform"], "target.platform", m.key_lines.get("platform"),
                            _PLATFORM, "uv platform such as aarch64-manylinux_2_28"))


def _read_overrides(r: _Reader, raw: Any, where: str, line: int | None) -> tuple[Override, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise r.fail(where, line, "expected a list of {requirement, reason, covers}")
    out: dict[str, Override] = {}
    for i, item in enumerate(raw):
        w = f"{where}[{i}]"
        iline = raw.item_lines[i] if isinstance(raw, _LineList) else line
        entry = r.mapping(item, w, iline)
        r.keys(entry, w, {"requirement", "reason", "covers"}, {"requirement", "reason"})
        req = r.requirement(entry["requirement"], f"{w}.requirement",
                            entry.key_lines.get("requirement"))
        reason = entry["reason"]
        if not isinstance(reason, str) or not reason.strip() or _CONTROL.search(reason.strip()):
            raise r.fail(f"{w}.reason", entry.key_lines.get("reason"),
                         "say why the override exists, in one line of text",
                         hint="an override without a reason is a pin nobody dares to remove")
        covers = tuple(dict.fromkeys(canonicalize_name(n) for n in r.string_list(
            entry.get("covers", []), f"{w}.covers", entry.key_lines.get("covers"), _PACKAGE,
            "distribution name")))
        o = Override(requirement=req, reason=" ".join(reason.split()), covers=covers)
        if o.package in out:
            raise r.fail(w, iline, f"{o.package} is overridden twice in {where}")
        out[o.package] = o
    return tuple(out.values())


def _empty() -> _LineDict:
    d = _LineDict()
    d.key_lines = {}
    return d


def _read_wheels(r: _Reader, raw: Any, line: int | None
                 ) -> tuple[Path, tuple[WheelDecl, ...], dict[str, WheelBuild]]:
    if raw is None:
        return r.to_path("wheels", "wheels", line), (), {}
    m = r.mapping(raw, "wheels", line)
    r.keys(m, "wheels", {"directory", "local", "index", "url", "build"}, set())
    directory = r.to_path(m.get("directory", "wheels"), "wheels.directory",
                       m.key_lines.get("directory"))
    declared: list[dict[str, Any]] = []  # each a WheelDecl's fields, its file name unparsed
    for name in r.string_list(m.get("local", []), "wheels.local", m.key_lines.get("local"),
                              _WHEEL_FILE, "wheel filename"):
        declared.append({"filename": name})
    index_raw = m.get("index", [])
    if not isinstance(index_raw, list):
        raise r.fail("wheels.index", m.key_lines.get("index"), "expected a list")
    for i, item in enumerate(index_raw):
        where = f"wheels.index[{i}]"
        entry = r.mapping(item, where, index_raw.item_lines[i])  # type: ignore[attr-defined]
        r.keys(entry, where, {"file", "url", "packages"}, {"file", "url"})
        declared.append(dict(
            filename=r.expanded(entry["file"], f"{where}.file", entry.key_lines["file"],
                                _WHEEL_FILE, "wheel filename"),
            index=r.string(entry["url"], f"{where}.url", entry.key_lines["url"], _URL,
                           "http(s) index URL").rstrip("/"),
            serves=tuple(str(canonicalize_name(n)) for n in r.string_list(
                entry.get("packages", []), f"{where}.packages",
                entry.key_lines.get("packages"), _PACKAGE, "package name")),
        ))
    declared.extend(_read_urls(r, m.get("url", []), m.key_lines.get("url")))
    decls: list[WheelDecl] = []
    seen: dict[str, str] = {}
    for fields in declared:
        try:
            d = WheelDecl(**fields)  # parses the file name
        except LockError as exc:
            raise r.fail("wheels", line, exc.message, hint=exc.hint) from None
        project = d.name
        decls.append(d)
        if d.filename in seen.values():
            raise r.fail("wheels", line, f"wheel {d.filename!r} is declared twice")
        if project in seen:
            raise r.fail("wheels", line, f"two files of {project} are declared: "
                         f"{seen[project]} and {d.filename}",
                         hint="a stack pins exactly one file per project; keep the one the "
                              "images should install")
        seen[project] = d.filename
    built = _read_builds(r, m.get("build"), m.key_lines.get("build"))
    for name in built:
        if name in seen:
            raise r.fail("wheels.build", m.key_lines.get("build"),
                         f"{name} is built from source and also declared as {seen[name]}",
                         hint="a stack pins exactly one file per project: remove one of them")
    return directory, tuple(decls), built


def _repository(reference: str) -> str:
    """An image reference's repository as ``docker inspect``'s RepoDigests names it: no tag,
    no digest, no ``docker.io/`` or ``library/`` (``nvidia/cuda:13.2.0-devel`` ->
    ``nvidia/cuda``)."""
    name = reference.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name = name[:len(name) - len(last)] + last.split(":", 1)[0]
    for prefix in ("docker.io/", "index.docker.io/", "library/"):
        name = name.removeprefix(prefix)
    return name


def _read_digest(r: _Reader, value: Any, where: str, line: int | None, reference: str) -> str:
    """A digest as ``sha256:<64 hex>``, or as ``docker inspect --format
    '{{index .RepoDigests 0}}'`` prints it (``nvidia/cuda@sha256:...``), whose name must
    be the reference's repository. Returns the bare digest."""
    text = r.string(value, where, line, None, "digest")
    name, at, digest = text.rpartition("@")
    if not _DIGEST.match(digest):
        raise r.fail(where, line, f"{text!r} is not a digest (sha256:<64 hex>, or "
                                  f"NAME@sha256:<64 hex> as docker inspect prints it)",
                     hint=f"docker inspect --format '{{{{index .RepoDigests 0}}}}' {reference}")
    if at and _repository(name) != _repository(reference):
        raise r.fail(where, line, f"{text!r} is a digest of {name}, not of {reference}",
                     hint="pin the digest of the image the reference names")
    return digest


def _read_urls(r: _Reader, raw: Any, line: int | None) -> list[dict[str, Any]]:
    """wheels.url: prebuilt wheels by URL, each with the sha256 its bytes must have."""
    if not isinstance(raw, list):
        raise r.fail("wheels.url", line, "expected a list of {url, sha256}")
    out = []
    for i, item in enumerate(raw):
        where = f"wheels.url[{i}]"
        entry = r.mapping(item, where, raw.item_lines[i] if isinstance(raw, _LineList) else line)
        r.keys(entry, where, {"url", "sha256"}, {"url", "sha256"})
        url = r.string(entry["url"], f"{where}.url", entry.key_lines["url"], WHEEL_URL,
                       "http(s) URL of a .whl file (no query)")
        if not isinstance(entry["sha256"], str):  # YAML reads 0123e4... as a number
            raise r.fail(f"{where}.sha256", entry.key_lines["sha256"],
                         f"{entry['sha256']!r} is not text", hint='quote it: sha256: "..."')
        sha = r.string(entry["sha256"], f"{where}.sha256", entry.key_lines["sha256"], SHA256,
                       "sha256 (64 lowercase hex digits)")
        filename = url_filename(url)
        try:
            if not _WHEEL_FILE.match(filename):
                raise LockError(filename)
            parse_wheel(filename)
        except LockError:
            raise r.fail(f"{where}.url", entry.key_lines["url"],
                         f"{url!r} does not end in a wheel filename",
                         hint="the URL's last part is the wheel's file name (PEP 427)"
                         ) from None
        out.append({"filename": filename, "url": url, "sha256": sha})
    return out


_BUILD_KEYS = {"name", "git", "commit", "patches", "builder", "builder_digest", "env",
               "command", "submodules"}
# no host or path that starts with "-" (git would read it as an option of ssh)
_GIT_URL = re.compile(r"^(?:(?:https?|ssh|git|file)://(?![^/]*@-)(?!-)[A-Za-z0-9._~:/@%+=-]+"
                      r"|/[A-Za-z0-9._/+@-]+)\Z")
_COMMIT = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})\Z")
_BUILD_ENV_VALUE = re.compile(r"^[^\x00-\x1f\x7f]*\Z")


def _read_builds(r: _Reader, raw: Any, line: int | None) -> dict[str, WheelBuild]:
    """``wheels.build``: the wheels built from a pinned source. Nothing here reaches a
    shell or a Dockerfile: the git URL goes to git after ``--``, the command and env to
    the engine's container API as lists."""
    if raw is None:
        return {}
    if not isinstance(raw, list):
        raise r.fail("wheels.build", line, "expected a list of wheels built from source")
    out: dict[str, WheelBuild] = {}
    for i, item in enumerate(raw):
        where = f"wheels.build[{i}]"
        iline = raw.item_lines[i] if isinstance(raw, _LineList) else line
        b = r.mapping(item, where, iline)
        r.keys(b, where, _BUILD_KEYS, {"name", "git", "commit", "builder"})

        def kl(k: str, b: _LineDict = b) -> int | None:
            return b.key_lines.get(k)

        name = canonicalize_name(r.string(b["name"], f"{where}.name", kl("name"), _ALIAS,
                                          "project name"))
        if name in out:
            raise r.fail(f"{where}.name", kl("name"), f"{name} is built twice")
        git = r.string(b["git"], f"{where}.git", kl("git"), _GIT_URL,
                       "git URL (https://, ssh://, git://, file:// or an absolute path)")
        commit = b["commit"]
        if not isinstance(commit, str) or not _COMMIT.match(commit):
            raise r.fail(f"{where}.commit", kl("commit"),
                         f"{commit!r} is not a full commit id (40 lowercase hex digits)",
                         hint="a branch, a tag or a short id can move or be ambiguous: pin "
                              "the full commit, e.g. git rev-parse v0.22.1^{commit}")
        patches: list[Path] = []
        for j, text in enumerate(r.string_list(b.get("patches", []), f"{where}.patches",
                                               kl("patches"), None, "patch file")):
            path = r.to_path(text, f"{where}.patches[{j}]", kl("patches"))
            if not path.is_file():
                raise r.fail(f"{where}.patches[{j}]", kl("patches"),
                             f"patch file {path} does not exist",
                             hint="patches are kept in the repository, next to the spec")
            patches.append(path)
        builder = r.string(b["builder"], f"{where}.builder", kl("builder"), _REFERENCE,
                           "image reference such as nvidia/cuda:13.2.0-devel-ubuntu24.04")
        digest = None
        if b.get("builder_digest") is not None:
            digest = _read_digest(r, b["builder_digest"], f"{where}.builder_digest",
                                  kl("builder_digest"), builder)
        env: list[tuple[str, str]] = []
        if b.get("env") is not None:
            em = r.mapping(b["env"], f"{where}.env", kl("env"))
            for k, v in em.items():
                eline = em.key_lines.get(k)
                r.string(k, f"{where}.env", eline, _ENV_KEY, "environment variable name")
                if k in RESERVED_BUILD_ENV:
                    raise r.fail(f"{where}.env", eline, f"{k} is set by imagebuild",
                                 hint=f"imagebuild sets {', '.join(sorted(RESERVED_BUILD_ENV))}"
                                      " in every wheel build")
                env.append((k, r.string(v, f"{where}.env.{k}", eline, _BUILD_ENV_VALUE,
                                        "environment value")))
        command: tuple[str, ...] = DEFAULT_WHEEL_COMMAND
        if b.get("command") is not None:
            cmd = r.string_list(b["command"], f"{where}.command", kl("command"), None,
                                "command word")
            if not cmd:
                raise r.fail(f"{where}.command", kl("command"),
                             "expected the command in exec form, e.g. [uv, build, --wheel, "
                             f"--no-build-isolation, --out-dir, {BUILD_OUT}]")
            command = cmd
        submodules = b.get("submodules", True)
        if not isinstance(submodules, bool):
            raise r.fail(f"{where}.submodules", kl("submodules"),
                         f"expected true or false, got {submodules!r}")
        out[name] = WheelBuild(name=name, git=git, commit=commit, patches=tuple(patches),
                               builder=builder, builder_digest=digest,
                               env=tuple(sorted(env)), command=command,
                               submodules=submodules)
    return out


def _read_checks(r: _Reader, raw: Any, line: int | None) -> dict[str, Check]:
    m = r.mapping(raw, "checks", line)
    out: dict[str, Check] = {}
    for name, body in m.items():
        where = f"checks.{name}"
        kline = m.key_lines.get(name)
        r.string(name, where, kline, _ALIAS, "check name")
        c = r.mapping(body, where, kline)
        r.keys(c, where, _CHECK_KEYS, {"run"})
        run_raw = c["run"]
        rline = c.key_lines.get("run")
        if not isinstance(run_raw, list) or not run_raw:
            raise r.fail(f"{where}.run", rline,
                         "expected a non-empty list (the command, in exec form, no shell)")
        for i, arg in enumerate(run_raw):
            if isinstance(arg, bool) or not isinstance(arg, str | int):
                raise r.fail(f"{where}.run[{i}]", rline,
                             f"{arg!r} is not a word of a command (a string)",
                             hint="quote it: run: [python3, -c, \"...\"]")
        run = tuple(str(a) for a in run_raw)  # exec form: never a shell, never a Dockerfile
        kinds = [k for k in _CHECK_KINDS if k in c]
        if len(kinds) != 1:
            raise r.fail(where, c.line,
                         "state exactly one expectation: expect (exact output), specifier "
                         "(a version range), locked (a wheel name) or succeeds: true")
        key = kinds[0]
        kind = _CHECK_KINDS[key]
        value = c[key]
        vline = c.key_lines.get(key)
        if kind == "succeeds":
            if value is not True:
                raise r.fail(f"{where}.succeeds", vline, "only 'succeeds: true' is meaningful")
            expected = ""
        elif kind == "specifier":
            if not isinstance(value, str):
                raise r.fail(f"{where}.specifier", vline, f"{value!r} is not text",
                             hint="quote it: specifier: \">=5.0.0\"")
            expected = r.string(value, f"{where}.specifier", vline, None, "version specifier")
            try:
                SpecifierSet(expected)
            except InvalidSpecifier:
                raise r.fail(f"{where}.specifier", vline,
                             f"{expected!r} is not a version specifier such as '>=5.0.0'") from None
        elif kind == "locked":
            expected = canonicalize_name(
                r.string(value, f"{where}.locked", vline, None, "wheel name"))
        else:
            if not isinstance(value, str):
                raise r.fail(f"{where}.expect", vline,
                             f"{value!r} is a {type(value).__name__}, not text: YAML reads "
                             f"an unquoted 2.10 as the number 2.1",
                             hint=f"quote it: expect: \"{value}\"")
            try:
                expect_fields(value)
            except ValueError as exc:
                raise r.fail(f"{where}.expect", vline, str(exc),
                             hint="a field takes its value from the lock, e.g. expect: "
                                  "\"{torch.version} {torch.cuda}\"") from None
            expected = value
        timeout = c.get("timeout", 120)
        if (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                or not math.isfinite(timeout) or not 0 < timeout <= MAX_CHECK_TIMEOUT):
            raise r.fail(f"{where}.timeout", c.key_lines.get("timeout"),
                         f"{timeout!r}: expected a number of seconds, more than 0 and at "
                         f"most {MAX_CHECK_TIMEOUT}")
        hint = c.get("hint")
        if hint is not None and not isinstance(hint, str):
            raise r.fail(f"{where}.hint", c.key_lines.get("hint"), "expected text")
        out[name] = Check(name=name, run=run, kind=kind, expected=expected,
                          hint=hint.strip() if hint is not None else None,
                          timeout=float(timeout))
    return out


def _read_params(r: _Reader, raw: Any, where: str, line: int | None) -> Params:
    if raw is None:
        return Params()
    m = r.mapping(raw, where, line)
    r.keys(m, where, _PARAM_KEYS, set())

    def kl(k: str) -> int | None:
        return m.key_lines.get(k)

    apt = r.string_list(m.get("apt_packages", []), f"{where}.apt_packages", kl("apt_packages"),
                        _APT, "Debian package name")
    env_items: list[tuple[str, str]] = []
    if "env" in m:
        env = r.mapping(m["env"], f"{where}.env", kl("env"))
        for k, v in env.items():
            eline = env.key_lines.get(k)
            r.string(k, f"{where}.env", eline, _ENV_KEY, "environment variable name")
            env_items.append((k, r.string(v, f"{where}.env.{k}", eline, _ENV_VALUE,
                                          "environment value (letters, digits and _.,:/=+@%-)")))
    uv = (canonicalize_name(r.string(m["uv"], f"{where}.uv", kl("uv"), _ALIAS, "wheel name"))
          if m.get("uv") is not None else None)
    pip_index = (r.string(m["pip_index"], f"{where}.pip_index", kl("pip_index"), _URL,
                          "http(s) index URL").rstrip("/")
                 if m.get("pip_index") is not None else None)
    return Params(apt_packages=apt, env=tuple(env_items), uv=uv, pip_index=pip_index)


MAX_FILES = 64


def _read_files(r: _Reader, raw: Any, where: str, line: int | None
                ) -> tuple[DeclaredFile, ...]:
    """``files:``: [{src, dest, mode}]: what the image copies from the user's disk."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_FILES:
        raise r.fail(where, line, f"expected a list of at most {MAX_FILES} {{src, dest, "
                     f"mode}}")
    out: list[DeclaredFile] = []
    for i, item in enumerate(raw):
        w = f"{where}[{i}]"
        iline = raw.item_lines[i] if isinstance(raw, _LineList) else line
        entry = r.mapping(item, w, iline)
        r.keys(entry, w, _FILE_KEYS, {"src", "dest"})
        source = r.to_path(entry["src"], f"{w}.src", entry.key_lines.get("src"))
        dest = r.string(entry["dest"], f"{w}.dest", entry.key_lines.get("dest"), _IMAGE_PATH,
                        "absolute path in the image (letters, digits and ._+@-)")
        if dest == "/":
            raise r.fail(f"{w}.dest", entry.key_lines.get("dest"), "not the image's root")
        mode = entry.get("mode")
        if mode is not None:
            if isinstance(mode, str) and re.fullmatch(r"0?[0-7]{3,4}", mode):
                mode = int(mode, 8)
            if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
                raise r.fail(f"{w}.mode", entry.key_lines.get("mode"),
                             f"{mode!r} is not a file mode", hint='quote it: mode: "0755"')
        if any(f.dest == dest for f in out):
            raise r.fail(f"{w}.dest", entry.key_lines.get("dest"), f"{dest} is declared twice")
        out.append(DeclaredFile(source=source, dest=dest.rstrip("/") or "/", mode=mode))
    return tuple(out)


def _wheel_names(wheels: tuple[WheelDecl, ...]) -> dict[str, WheelDecl]:
    out: dict[str, WheelDecl] = {}
    for d in wheels:
        out[d.name] = d
    return out


def _check_fields(r: _Reader, cname: str, text: str, by_name: Mapping[str, WheelDecl],
                  built: set[str]) -> None:
    """Each field of an ``expect:`` names a declared wheel; ``cuda`` only of a wheel whose
    version names a CUDA release (known from its file name; a wheel built from source is
    checked when the lock is read)."""
    for part in expect_fields(text):
        if isinstance(part, str):
            continue
        name, attr = part
        if name not in by_name and name not in built:
            raise r.fail(f"checks.{cname}.expect", None,
                         f"{{{name}.{attr}}}: wheel {name!r} is not declared under wheels"
                         f"{did_you_mean(name, {*by_name, *built})}")
        decl = by_name.get(name)
        if attr == "cuda" and decl is not None:
            version = decl.version
            if cuda_of(version) is None:
                raise r.fail(f"checks.{cname}.expect", None,
                             f"{{{name}.cuda}}: {name} {version} names no CUDA release "
                             f"(no +cuNNN in its version)",
                             hint="use {" + name + ".version}, or write the CUDA release")


def _read_images(r: _Reader, raw: Any, line: int | None, wheels: tuple[WheelDecl, ...],
                 built: set[str], checks: Mapping[str, Check]
                 ) -> tuple[dict[str, ImageSpec], dict[str, str]]:
    m = r.mapping(raw, "images", line)
    if not m:
        raise r.fail("images", line, "the spec defines no images")
    try:
        by_name = _wheel_names(wheels)
    except Exception as exc:  # LockError from parse_wheel: name the spec, not the lock
        raise r.fail("wheels", None, str(exc)) from None
    images: dict[str, ImageSpec] = {}
    aliases: dict[str, str] = {}
    for name, body in m.items():
        where = f"images.{name}"
        kline = m.key_lines.get(name)
        r.string(name, where, kline, _IMAGE_NAME, "image name (lowercase Docker repository)")
        b = r.mapping(body, where, kline)
        r.keys(b, where, _IMAGE_KEYS, {"template"})

        def kl(k: str, b: _LineDict = b) -> int | None:
            return b.key_lines.get(k)

        if ("parent" in b) == ("base" in b):
            raise r.fail(where, b.line, "give exactly one of 'parent' (another image of this "
                         "spec) or 'base' (the root base image reference)")
        template = r.string(b["template"], f"{where}.template", kl("template"),
                            re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*\Z"), "template file name")
        parent = base = digest = None
        if "parent" in b:
            parent = r.string(b["parent"], f"{where}.parent", kl("parent"), _IMAGE_NAME,
                              "image name")
        else:
            base = r.string(b["base"], f"{where}.base", kl("base"), _REFERENCE,
                            "image reference such as nvidia/cuda:13.2.0-devel-ubuntu24.04")
            if b.get("base_digest") is not None:
                digest = _read_digest(r, b["base_digest"], f"{where}.base_digest",
                                      kl("base_digest"), base)
        img_aliases = r.string_list(b.get("aliases", []), f"{where}.aliases", kl("aliases"),
                                    _ALIAS, "short name")
        wheel_names: list[str] = []
        for wn in r.string_list(b.get("wheels", []), f"{where}.wheels", kl("wheels"), None,
                                "wheel name"):
            cn = canonicalize_name(wn)
            decl = by_name.get(cn)
            if cn not in built and (decl is None or decl.index is not None):
                local = sorted({*(n for n, d in by_name.items() if d.index is None), *built})
                raise r.fail(f"{where}.wheels", kl("wheels"),
                             f"wheel {wn!r} is not declared under wheels.local or "
                             f"wheels.build{did_you_mean(cn, local)}",
                             hint="every wheel an image installs must be declared, and locked "
                                  "in wheels.lock")
            wheel_names.append(cn)
        torch = None
        if b.get("torch") is not None:
            tn = canonicalize_name(r.string(b["torch"], f"{where}.torch", kl("torch"), None,
                                            "wheel name"))
            decl = by_name.get(tn)
            if decl is None or decl.index is None:
                raise r.fail(f"{where}.torch", kl("torch"),
                             f"{tn!r} is not declared under wheels.index",
                             hint="the torch force-reinstall takes a hash-pinned wheel from an "
                                  "index; declare it under wheels.index")
            torch = tn
        check_names = r.string_list(b.get("checks", []), f"{where}.checks", kl("checks"), None,
                                    "check name")
        for cname in check_names:
            if cname not in checks:
                raise r.fail(f"{where}.checks", kl("checks"),
                             f"unknown check {cname!r}{did_you_mean(cname, set(checks))}")
            check = checks[cname]
            if check.kind == "locked" and check.expected not in {*by_name, *built}:
                raise r.fail(f"checks.{cname}.locked", None,
                             f"wheel {check.expected!r} is not declared under wheels")
            if check.kind == "output":
                _check_fields(r, cname, check.expected, by_name, built)
        params = _read_params(r, b.get("params"), f"{where}.params", kl("params"))
        if params.uv is not None:
            decl = by_name.get(params.uv)
            if decl is None or decl.index is None:
                raise r.fail(f"{where}.params.uv", kl("params"),
                             f"{params.uv!r} is not declared under wheels.index",
                             hint="uv is installed from a hash-pinned wheel: declare its file "
                                  "under wheels.index (e.g. uv-0.9.7-py3-none-manylinux_2_17_"
                                  "aarch64.manylinux2014_aarch64.whl from "
                                  "https://pypi.org/simple) and run 'imagebuild lock'")
        requires = tuple(
            r.requirement(v, f"{where}.requires[{i}]", kl("requires"))
            for i, v in enumerate(r.string_list(b.get("requires", []), f"{where}.requires",
                                                kl("requires"), None, "requirement")))
        overrides = _read_overrides(r, b.get("overrides"), f"{where}.overrides",
                                    kl("overrides"))
        files = _read_files(r, b.get("files"), f"{where}.files", kl("files"))
        workdir = (r.string(b["workdir"], f"{where}.workdir", kl("workdir"), _IMAGE_PATH,
                            "absolute path in the image (letters, digits and ._+@-)")
                   if b.get("workdir") is not None else None)
        entrypoint, cmd = (
            r.string_list(b[k], f"{where}.{k}", kl(k), None, "argument") or None
            if b.get(k) is not None else None for k in ("entrypoint", "cmd"))
        images[name] = ImageSpec(
            name=name, aliases=img_aliases, template=template, parent=parent, base=base,
            base_digest=digest, params=params, wheels=tuple(wheel_names), torch=torch,
            checks=check_names, requires=requires, overrides=overrides, files=files,
            workdir=workdir, entrypoint=entrypoint, cmd=cmd,
        )
        for a in img_aliases:
            if a in aliases or a in m:
                raise r.fail(f"{where}.aliases", kl("aliases"), f"short name {a!r} is ambiguous")
            aliases[a] = name
    for name, img in images.items():
        if img.parent is not None and img.parent not in images:
            raise r.fail(f"images.{name}.parent", m[name].key_lines.get("parent"),
                         f"unknown parent {img.parent!r}"
                         f"{did_you_mean(img.parent, set(images))}")
    _check_cycles(r, images, m)
    return images, aliases


def _check_cycles(r: _Reader, images: Mapping[str, ImageSpec], m: _LineDict) -> None:
    for start in images:
        seen: list[str] = []
        current: str | None = start
        while current is not None:
            if current in seen:
                cycle = " -> ".join([*seen[seen.index(current):], current])
                raise r.fail(f"images.{start}.parent", m[start].key_lines.get("parent"),
                             f"the lineage has a cycle: {cycle}",
                             hint="every chain of parents must end at an image with 'base'")
            seen.append(current)
            current = images[current].parent


def _read_cluster(r: _Reader, raw: Any, line: int | None) -> Cluster:
    if raw is None:
        return Cluster()
    m = r.mapping(raw, "cluster", line)
    r.keys(m, "cluster", _CLUSTER_KEYS, set())
    if "inventory" in m:
        if len(m) > 1:
            raise r.fail("cluster", line, "'inventory' replaces the whole cluster section; "
                         "put the other keys in the inventory file")
        inv_path = r.to_path(m["inventory"], "cluster.inventory", m.key_lines.get("inventory"))
        try:
            text = inv_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            where = f"{r.path}:{m.key_lines.get('inventory')}" if m.key_lines.get(
                "inventory") else str(r.path)
            return Cluster(unavailable=f"{where}: cluster.inventory: {inv_path} does not "
                                       f"exist, so no worker is known")
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise r.fail("cluster.inventory", m.key_lines.get("inventory"),
                         f"cannot read {inv_path}: {why}",
                         hint="for the test bed, run scripts/testbed up first") from None
        inv = _parse_yaml(text, inv_path)
        sub = _Reader(inv_path)
        m = sub.mapping(inv, "cluster", 1)
        sub.keys(m, "cluster", _CLUSTER_KEYS - {"inventory"}, set())
        r = sub

    def kl(k: str) -> int | None:
        return m.key_lines.get(k)

    user = (r.string(m["ssh_user"], "cluster.ssh_user", kl("ssh_user"), _USER, "user name")
            if m.get("ssh_user") is not None else None)
    port = m.get("ssh_port")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                             or not 0 < port < 65536):
        raise r.fail("cluster.ssh_port", kl("ssh_port"), f"{port!r} is not a TCP port")
    identity = (str(r.to_path(m["ssh_identity"], "cluster.ssh_identity", kl("ssh_identity")))
                if m.get("ssh_identity") is not None else None)
    config = (str(r.to_path(m["ssh_config"], "cluster.ssh_config", kl("ssh_config")))
              if m.get("ssh_config") is not None else None)
    workers: list[Worker] = []
    raw_workers = m.get("workers", [])
    if not isinstance(raw_workers, list):
        raise r.fail("cluster.workers", kl("workers"), "expected a list of workers")
    for i, w in enumerate(raw_workers):
        where = f"cluster.workers[{i}]"
        wl = raw_workers.item_lines[i] if isinstance(raw_workers, _LineList) else None
        wm = r.mapping(w, where, wl)
        r.keys(wm, where, {"name", "address"}, {"name", "address"})
        name = r.string(wm["name"], f"{where}.name", wm.key_lines["name"], _WORKER, "worker name")
        if any(x.name == name for x in workers):
            raise r.fail(f"{where}.name", wm.key_lines["name"], f"worker {name!r} appears twice")
        workers.append(Worker(
            name=name,
            address=r.string(wm["address"], f"{where}.address", wm.key_lines["address"], _HOST,
                             "host name or address"),
        ))
    return Cluster(ssh_user=user, ssh_port=port, ssh_identity=identity, ssh_config=config,
                   workers=tuple(workers))


def _read_backups(r: _Reader, raw: Any, line: int | None) -> Backups | None:
    if raw is None:
        return None
    m = r.mapping(raw, "backups", line)
    r.keys(m, "backups", {"directory", "keep", "mirror"}, {"directory"})
    dline = m.key_lines["directory"]
    raw_dir = r.string(m["directory"], "backups.directory", dline, None, "directory")
    location: Path | SshLocation
    if raw_dir.startswith("ssh://"):
        location = _ssh_location(r, raw_dir, "backups.directory", dline)
    else:
        location = r.to_path(raw_dir, "backups.directory", dline)
    keep = m.get("keep", 2)
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise r.fail("backups.keep", m.key_lines.get("keep"),
                     "expected a whole number >= 1 (generations kept beside the newest)")
    mirrors = _read_mirrors(r, m.get("mirror"), m.key_lines.get("mirror"))
    if isinstance(location, SshLocation) and location in mirrors:
        raise r.fail("backups.mirror", m.key_lines.get("mirror"),
                     "a mirror must be another place than backups.directory")
    return Backups(location=location, keep=keep, mirrors=mirrors)


def _read_mirrors(r: _Reader, raw: Any, line: int | None) -> tuple[SshLocation, ...]:
    """``backups.mirror``: one ``ssh://`` URL, or a list of them."""
    if raw is None:
        return ()
    items = raw if isinstance(raw, list) else [raw]
    out: list[SshLocation] = []
    for i, item in enumerate(items):
        where = f"backups.mirror[{i}]" if isinstance(raw, list) else "backups.mirror"
        url = r.string(item, where, line, None, "ssh:// URL")
        if not url.startswith("ssh://"):
            raise r.fail(where, line, f"{url!r}: a mirror lives on another host: "
                                      f"ssh://[user@]host[:port]/path")
        loc = _ssh_location(r, url, where, line)
        if loc in out:
            raise r.fail(where, line, f"{url!r} is listed twice")
        out.append(loc)
    return tuple(out)


_REGISTRY_ADDRESS = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?\Z")
_REPO_PREFIX = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*\Z")


def _read_registry(r: _Reader, raw: Any, line: int | None, state_dir: Path) -> Registry | None:
    if raw is None:
        return None
    m = r.mapping(raw, "registry", line)
    r.keys(m, "registry", {"address", "tls", "repository", "start", "storage", "min_workers"},
           {"address"})

    def kl(k: str) -> int | None:
        return m.key_lines.get(k)

    if not isinstance(m["address"], str):  # 5000 would read as a host named "5000"
        raise r.fail("registry.address", kl("address"),
                     f"expected host:port as text, got {m['address']!r}")
    address = r.string(m["address"], "registry.address", kl("address"), _REGISTRY_ADDRESS,
                       "registry address (host or host:port, no scheme)")
    port = address.rpartition(":")[2] if not address.endswith("]") and ":" in address else ""
    if port and not 0 < int(port) < 65536:
        raise r.fail("registry.address", kl("address"), f"port {port} is not a TCP port")
    flags = {}
    for key, default in (("tls", True), ("start", False)):
        value = m.get(key, default)
        if not isinstance(value, bool):
            raise r.fail(f"registry.{key}", kl(key), f"expected true or false, got {value!r}")
        flags[key] = value
    prefix = (r.string(m["repository"], "registry.repository", kl("repository"), _REPO_PREFIX,
                       "repository prefix (lower-case path components, e.g. cluster/vllm)")
              if m.get("repository") is not None else "")
    if flags["start"] and flags["tls"]:
        raise r.fail("registry.start", kl("start"),
                     "imagebuild starts a plain-HTTP registry only (tls: false)",
                     hint="set tls: false for a registry on the cluster's own fabric, or run a "
                          "TLS registry yourself and set start: false")
    storage = (r.to_path(m["storage"], "registry.storage", kl("storage"))
               if m.get("storage") is not None else state_dir / "registry")
    least = m.get("min_workers", 4)
    if isinstance(least, bool) or not isinstance(least, int) or least < 1:
        raise r.fail("registry.min_workers", kl("min_workers"),
                     "expected a whole number >= 1 (distribute uses the registry from this "
                     "many workers on)")
    return Registry(address=address, tls=flags["tls"], repository=prefix,
                    start=flags["start"], storage=storage, min_workers=least)


def _ssh_location(r: _Reader, url: str, where: str, line: int | None) -> SshLocation:
    """``ssh://[user@]host[:port]/absolute/path``, each part checked like a worker's."""
    form = "ssh://[user@]host[:port]/absolute/path"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise r.fail(where, line, f"{url!r} is not {form}: {exc}") from None
    if parts.query or parts.fragment or parts.password is not None:
        raise r.fail(where, line, f"{url!r} is not {form} (no password, query or fragment)")
    host = parts.hostname or ""
    if not _HOST.match(host):
        raise r.fail(where, line, f"{url!r}: {host!r} is not a valid host name or address")
    if parts.username is not None and not _USER.match(parts.username):
        raise r.fail(where, line, f"{url!r}: {parts.username!r} is not a valid user name")
    if port is not None and not 0 < port < 65536:
        raise r.fail(where, line, f"{url!r}: port {port} is not a TCP port (1-65535)")
    if parts.netloc.endswith(":"):
        raise r.fail(where, line, f"{url!r}: the port after ':' is missing")
    path = parts.path.rstrip("/")
    if not parts.path.startswith("/") or not path:
        raise r.fail(where, line, f"{url!r}: the directory must be an absolute path other "
                     f"than /", hint=f"write it as {form}")
    return SshLocation(host=host, path=path, user=parts.username, port=port)
