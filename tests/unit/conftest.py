"""A small, self-contained stack in a temp directory, using the repository's templates."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from imagebuild.lock import compute_lock, format_lock
from imagebuild.spec import Spec, load_spec

REPO = Path(__file__).resolve().parents[2]
TORCH_SHA = "a" * 64
UV_SHA = "b" * 64

SPEC = """\
schema: 1
templates: templates
state: state
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
    checks: [torch-gate]
  vllm-node-tf5:
    aliases: [tf5]
    template: vllm-node-tf5.Dockerfile.j2
    parent: vllm-node
    params:
      transformers: transformers>=4.57,<5
  vllm-node-mimo:
    aliases: [mimo]
    template: vllm-node-mimo.Dockerfile.j2
    parent: vllm-node-tf5
    params:
      transformers: transformers>=5.0.0
    wheels: [vllm, flashinfer-python, extra-mimo]
    torch: torch
checks:
  torch-gate:
    run: [python3, -c, "import torch; print(torch.__version__, torch.version.cuda)"]
    expect: "2.11.0+cu130 13.0"
"""


class Stack:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.spec_path = root / "imagebuild.yaml"

    def write_spec(self, text: str = SPEC) -> Path:
        self.spec_path.write_text(text)
        return self.spec_path

    def wheel(self, filename: str, content: bytes) -> Path:
        p = self.root / "wheels" / filename
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(content)
        return p

    def lock(self) -> None:
        spec = load_spec(self.spec_path)
        result = compute_lock(spec.wheels_dir, [(d.filename, d.index) for d in spec.wheels],
                              None, fetch=lambda url: _fake_index(url))
        spec.lock_path.write_text(format_lock(result.wheels, "imagebuild.yaml"))

    def load(self) -> Spec:
        return load_spec(self.spec_path)


def _fake_index(url: str) -> str:
    pages = {"http://127.0.0.1:9/simple/torch/": ("torch-2.11.0+cu130-py3-none-any.whl",
                                                   TORCH_SHA),
             "http://127.0.0.1:9/simple/uv/": ("uv-0.9.7-py3-none-any.whl", UV_SHA)}
    assert url in pages, url
    name, sha = pages[url]
    return f'<a href="{name}#sha256={sha}">{name}</a>'


@pytest.fixture
def stack(tmp_path: Path) -> Stack:
    shutil.copytree(REPO / "templates", tmp_path / "templates")
    s = Stack(tmp_path)
    s.write_spec()
    s.wheel("vllm-0.22.1rc1.dev124+gace95c9cf.d20260603.cu132-py3-none-any.whl", b"vllm bytes")
    s.wheel("flashinfer_python-0.6.12-py3-none-any.whl", b"flashinfer bytes")
    s.wheel("extra_mimo-1.0-py3-none-any.whl", b"extra bytes")
    s.lock()
    return s
