from __future__ import annotations

import io
import tarfile

import pytest

from imagebuild.build import CHUNK, context_stream, preflight
from imagebuild.derivation import ContextFile, plan
from imagebuild.errors import WheelHashMismatch
from imagebuild.lock import read_lock, sha256_file

from .conftest import Stack


def test_context_holds_only_what_the_dockerfile_copies(stack: Stack) -> None:
    spec = stack.load()
    mimo = plan(spec, read_lock(spec.lock_path), ["mimo"])[-1]
    preflight(spec, mimo)
    data = b"".join(context_stream(mimo.context))
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        names = sorted(tf.getnames())
        assert names == sorted([
            "Dockerfile", "torch-requirements.txt",
            "wheels/extra_mimo-1.0-py3-none-any.whl",
            "wheels/flashinfer_python-0.6.12-py3-none-any.whl",
            "wheels/vllm-0.22.1rc1.dev124+gace95c9cf.d20260603.cu132-py3-none-any.whl",
        ])
        df = tf.extractfile("Dockerfile")
        assert df is not None and df.read().decode() == mimo.dockerfile
        req = tf.extractfile("torch-requirements.txt")
        assert req is not None
        assert req.read() == b"torch==2.11.0+cu130 --hash=sha256:" + b"a" * 64 + b"\n"
        w = tf.extractfile("wheels/extra_mimo-1.0-py3-none-any.whl")
        assert w is not None and w.read() == b"extra bytes"


def test_streaming_is_chunked(stack: Stack) -> None:
    big = stack.wheel("extra_mimo-1.0-py3-none-any.whl", b"x" * (3 * CHUNK + 5))
    f = ContextFile(arcname="wheels/big.whl", sha256=sha256_file(big), source=big)
    sizes = [len(c) for c in context_stream((f,))]
    assert max(sizes) <= CHUNK
    assert sum(sizes) % 512 == 0


def test_a_wheel_that_changes_after_preflight_aborts_the_stream(stack: Stack) -> None:
    p = stack.wheel("extra_mimo-1.0-py3-none-any.whl", b"original")
    f = ContextFile(arcname="wheels/x.whl", sha256=sha256_file(p), source=p)
    p.write_bytes(b"tampered")
    with pytest.raises(WheelHashMismatch):
        b"".join(context_stream((f,)))


def test_preflight_refuses_a_mismatching_wheel(stack: Stack) -> None:
    spec = stack.load()
    node = plan(spec, read_lock(spec.lock_path), ["node"])[0]
    stack.wheel("flashinfer_python-0.6.12-py3-none-any.whl", b"not what was locked")
    with pytest.raises(WheelHashMismatch, match=r"does not match wheels\.lock"):
        preflight(spec, node)
