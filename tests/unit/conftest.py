"""A small, self-contained stack in a temp directory, using the repository's templates."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path
from urllib.parse import unquote

import pytest

from imagebuild.closure import ClosureLock, LockedDist, conflicts, format_closure
from imagebuild.lock import compute_lock, format_lock, parse_wheel, sha256_file
from imagebuild.locking import image_inputs, unresolved_reason
from imagebuild.resolve import Resolution, requires_dist, wheel_metadata
from imagebuild.spec import Spec, load_spec

REPO = Path(__file__).resolve().parents[2]
TORCH_SHA = "a" * 64
UV_SHA = "b" * 64

SPEC = """\
schema: 2
templates: templates
state: state
target: {python: "3.12", platform: aarch64-manylinux_2_28}
wheels:
  directory: wheels
  local:
    - vllm-0.22.1rc1.dev124+gace95c9cf.d20260603.cu132-py3-none-any.whl
    - flashinfer_python-0.6.12-py3-none-any.whl
    - extra_mimo-1.0-py3-none-any.whl
  index:
    - file: torch-2.11.0+cu130-py3-none-any.whl
      url: http://127.0.0.1:9/simple
    - file: uv-0.9.7-py3-none-any.whl
      url: http://127.0.0.1:9/simple
images:
  vllm-node:
    aliases: [node]
    template: vllm-node.Dockerfile.j2
    base: example/base:1
    params:
      uv: uv
    wheels: [vllm, flashinfer-python]
    torch: torch
    overrides:
      - {requirement: torch==2.11.0+cu130, reason: vllm pins torch==2.10.0, covers: [vllm]}
    checks: [torch-gate]
  vllm-node-tf5:
    aliases: [tf5]
    template: vllm-node-tf5.Dockerfile.j2
    parent: vllm-node
    requires: ["transformers>=4.57,<5"]
  vllm-node-mimo:
    aliases: [mimo]
    template: vllm-node-mimo.Dockerfile.j2
    parent: vllm-node-tf5
    overrides:
      - {requirement: transformers>=5.0.0, reason: mimo needs transformers 5, covers: [vllm]}
    wheels: [vllm, flashinfer-python, extra-mimo]
    torch: torch
checks:
  torch-gate:
    run: [python3, -c, "import torch; print(torch.__version__, torch.version.cuda)"]
    expect: "2.11.0+cu130 13.0"
"""


def _dist(name: str, version: str, sha: str) -> LockedDist:
    filename = f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    return LockedDist(name, version, filename, sha, f"http://127.0.0.1:9/simple/{filename}")


TOKENIZERS = _dist("tokenizers", "0.22.1", "c" * 64)
# what a resolution adds to each image's declared wheels
CLOSURE = {
    "vllm-node": [_dist("transformers", "4.57.1", "d" * 64), TOKENIZERS],
    "vllm-node-tf5": [_dist("transformers", "4.57.1", "d" * 64), TOKENIZERS],
    "vllm-node-mimo": [_dist("transformers", "5.0.0", "e" * 64), TOKENIZERS],
}


class Stack:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.spec_path = root / "imagebuild.yaml"
        # what the fake index publishes for torch and uv (None: no sha256)
        self.index_sha: dict[str, str | None] = {"torch": TORCH_SHA, "uv": UV_SHA}

    def write_spec(self, text: str = SPEC) -> Path:
        self.spec_path.write_text(text)
        return self.spec_path

    def wheel(self, filename: str, content: bytes, requires: tuple[str, ...] = ()) -> Path:
        """A small real wheel: METADATA (name and version from ``filename``, and
        ``requires`` as Requires-Dist) and ``content`` as its one data file."""
        p = self.root / "wheels" / filename
        p.parent.mkdir(exist_ok=True)
        parsed = parse_wheel(filename)
        info = f"{filename.split('-')[0]}-{parsed.version}.dist-info"
        meta = "".join([f"Metadata-Version: 2.1\nName: {parsed.name}\n",
                        f"Version: {parsed.version}\n",
                        *(f"Requires-Dist: {r}\n" for r in requires)])
        with zipfile.ZipFile(p, "w") as zf:
            for name, data in ((f"{info}/METADATA", meta.encode()), ("payload.bin", content)):
                zf.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0)), data)
        return p

    def lock(self, closure: dict[str, list[LockedDist]] | None = None) -> None:
        """wheels.lock from the fake index, and closure locks written as the lock step
        would from a resolution that took ``closure`` (default: CLOSURE) for each image:
        the unit tier never runs uv (see tests/unit/test_locking.py for what does)."""
        spec = load_spec(self.spec_path)
        result = compute_lock(spec.wheels_dir, [(d.filename, d.index) for d in spec.wheels],
                              None, fetch=lambda url: _fake_index(url, self.index_sha))
        spec.lock_path.write_text(format_lock(result.wheels, "imagebuild.yaml"))
        wheels = {w.name: w for w in result.wheels}
        unresolved: str | None = None
        for name in spec.closure(None):
            inputs = image_inputs(spec, wheels, name)
            unresolved = unresolved or unresolved_reason(spec, inputs)
            packages = {w.name: LockedDist(
                w.name, w.version, w.filename, w.sha256 or "",
                None if w.is_local else f"{w.index}/{w.name}/{w.filename}")
                for w in inputs.pinned}
            for p in (closure or CLOSURE).get(name, []):
                packages[p.name] = p
            # what the overrides silence, recorded as the lock step records it (the index
            # wheels of this stack state no requirements)
            stated = {p.filename: requires_dist(wheel_metadata(spec.wheels_dir / p.filename))[2]
                      for p in packages.values() if p.url is None and not unresolved}
            covered = tuple(sorted({c.record() for c in conflicts(
                stated, {p.name: p.version for p in packages.values()}, inputs.overridden,
                "3.12", "aarch64-manylinux_2_28") if c.covered}))
            lock = ClosureLock(path=spec.closure_lock_path(name), image=name,
                               parent=spec.images[name].parent, python="3.12",
                               platform="aarch64-manylinux_2_28",
                               requirements=inputs.requirements, overrides=inputs.overrides,
                               packages=() if unresolved else tuple(
                                   sorted(packages.values(), key=lambda p: p.name)),
                               unresolved=unresolved, covered=covered)
            lock.path.parent.mkdir(exist_ok=True)
            lock.path.write_text(format_closure(lock, "imagebuild.yaml"))

    def load(self) -> Spec:
        return load_spec(self.spec_path)


def _fake_index(url: str, shas: dict[str, str | None]) -> str:
    pages = {"http://127.0.0.1:9/simple/torch/": ("torch-2.11.0+cu130-py3-none-any.whl",
                                                   shas["torch"]),
             "http://127.0.0.1:9/simple/uv/": ("uv-0.9.7-py3-none-any.whl", shas["uv"])}
    assert url in pages, url
    name, sha = pages[url]
    return f'<a href="{name}#sha256={sha}">{name}</a>' if sha else f'<a href="{name}">{name}</a>'


@pytest.fixture
def stack(tmp_path: Path) -> Stack:
    shutil.copytree(REPO / "templates", tmp_path / "templates")
    s = Stack(tmp_path)
    s.write_spec()
    s.wheel("vllm-0.22.1rc1.dev124+gace95c9cf.d20260603.cu132-py3-none-any.whl", b"vllm bytes",
            requires=("torch==2.10.0", "transformers<5,>=4.56.0"))
    s.wheel("flashinfer_python-0.6.12-py3-none-any.whl", b"flashinfer bytes", requires=("torch",))
    s.wheel("extra_mimo-1.0-py3-none-any.whl", b"extra bytes")
    s.lock()
    return s


@pytest.fixture
def offline_lock(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[LockedDist]]:
    """'imagebuild lock' without uv or an index, for the unit tier: the resolver answers
    each image's declared wheels plus what the returned mapping (CLOSURE, editable by the
    test) adds; index wheels publish metadata with no requirements. Everything else of
    the lock step (the conflict checks, formatting, writing, --check) is the real code;
    tests/integration/test_lock.py runs it all with uv against the bed's index."""
    closure = {k: list(v) for k, v in CLOSURE.items()}

    def resolve(*, image: str, requirements: list[str], overrides: list[str],
                wheels_dir: Path, **_: object) -> Resolution:
        packages: dict[str, LockedDist] = {}
        for req in requirements:
            name, sep, version = req.partition("==")
            if not sep:
                continue
            local = [f for f in wheels_dir.glob("*.whl") if parse_wheel(f.name).name == name]
            if local:
                packages[name] = LockedDist(name, version, local[0].name,
                                            sha256_file(local[0]), None)
            else:
                packages[name] = _dist(name, version, "a" * 64)
        for p in closure.get(image, []):
            packages[p.name] = p
        for o in overrides:  # a file another index serves, given by URL (as uv locks it)
            name, sep, url = o.partition(" @ ")
            if sep and name in packages:
                where, _, frag = url.partition("#sha256=")
                filename = unquote(where.rsplit("/", 1)[-1])
                packages[name] = LockedDist(name, parse_wheel(filename).version, filename,
                                            frag or "e" * 64, where)
        return Resolution(tuple(sorted(packages.values(), key=lambda p: p.name)))

    def metadata(url: str) -> bytes:
        parsed = parse_wheel(url.removesuffix(".metadata").rsplit("/", 1)[-1])
        return f"Metadata-Version: 2.1\nName: {parsed.name}\nVersion: {parsed.version}\n".encode()

    def page(url: str) -> str:
        # the primary index (PyPI) lists what the resolution adds; the torch index
        # lists torch and uv (the stack's index wheels), with their published sha256
        index, project = url.rstrip("/").rsplit("/", 1)
        if index == "http://127.0.0.1:9/simple":
            return _fake_index(url, {"torch": TORCH_SHA, "uv": UV_SHA}) if project in (
                "torch", "uv") else ""
        assert index == "https://pypi.org/simple", url
        files = [p for ps in closure.values() for p in ps if p.name == project]
        return "".join(f'<a href="{p.filename}#sha256={p.sha256}">{p.filename}</a>'
                       for p in files)

    monkeypatch.setattr("imagebuild.locking.resolve", resolve)
    monkeypatch.setattr("imagebuild.web.get_bytes", metadata)
    monkeypatch.setattr("imagebuild.locking.index_page", page)
    return closure
