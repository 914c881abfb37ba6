"""The loopback wheel server, driven over real HTTP (no engine involved)."""

from __future__ import annotations

import http.client
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from imagebuild.engine import is_local_engine_url
from imagebuild.wheelserve import WheelServer

NAME = "vllm-0.22.1rc1.dev124+gace95c9cf.d20260603.cu132-py3-none-any.whl"


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    p = tmp_path / NAME
    p.write_bytes(bytes(range(256)) * 4096 + b"tail")  # 1 MiB + 4 bytes
    return p


def _get(url: str, path: str, method: str = "GET",
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def test_serves_the_whole_file_and_byte_ranges_on_the_loopback(wheel: Path) -> None:
    data = wheel.read_bytes()
    with WheelServer({NAME: wheel}) as srv:
        assert srv.url.startswith("http://127.0.0.1:")
        status, h, body = _get(srv.url, "/" + NAME)
        assert (status, body) == (200, data)
        assert h["accept-ranges"] == "bytes" and h["content-length"] == str(len(data))
        # '+' may arrive percent-encoded
        assert _get(srv.url, "/" + NAME.replace("+", "%2B"))[2] == data
        status, h, body = _get(srv.url, "/" + NAME, "HEAD")
        assert (status, body, h["content-length"]) == (200, b"", str(len(data)))
        status, h, body = _get(srv.url, "/" + NAME, headers={"Range": "bytes=10-19"})
        assert (status, body) == (206, data[10:20])
        assert h["content-range"] == f"bytes 10-19/{len(data)}"
        status, _, body = _get(srv.url, "/" + NAME, headers={"Range": "bytes=-4"})
        assert (status, body) == (206, b"tail")
        status, _, body = _get(srv.url, "/" + NAME, headers={"Range": f"bytes={len(data) - 2}-"})
        assert (status, body) == (206, b"il")
        status, h, _ = _get(srv.url, "/" + NAME, headers={"Range": f"bytes={len(data)}-"})
        assert status == 416 and h["content-range"] == f"bytes */{len(data)}"
        # several ranges are not served as such: the whole file instead
        assert _get(srv.url, "/" + NAME, headers={"Range": "bytes=0-1,5-6"})[:3:2] == (200, data)
        sent = srv.bytes_sent
    assert sent == 3 * len(data) + 10 + 4 + 2


@pytest.mark.parametrize("path", ["/", "/other.whl", "/../" + NAME, "/%2e%2e/" + NAME,
                                  "/x/" + NAME, "/etc/passwd"])
def test_serves_nothing_but_the_named_files(wheel: Path, path: str) -> None:
    (wheel.parent / "other.whl").write_bytes(b"not given to the server")
    with WheelServer({NAME: wheel}) as srv:
        status, _, body = _get(srv.url, path)
    assert status == 404 and b"not given" not in body


def test_a_wheel_replaced_after_the_check_is_refused(wheel: Path) -> None:
    logged: list[str] = []
    with WheelServer({NAME: wheel}, log=logged.append) as srv:
        replacement = wheel.with_suffix(".new")
        replacement.write_bytes(b"swapped in after the lock check")
        os.replace(replacement, wheel)
        status, _, body = _get(srv.url, "/" + NAME)
        assert status == 409 and b"changed" in body
        assert srv.refused and "changed after it was checked" in srv.refused[0]
        assert srv.bytes_sent == 0
    assert any("changed after it was checked" in m for m in logged)


def test_the_port_is_closed_when_the_build_is_over(wheel: Path) -> None:
    with WheelServer({NAME: wheel}) as srv:
        port = urlsplit(srv.url).port
        assert port
    with pytest.raises(ConnectionRefusedError), socket.create_connection(
            ("127.0.0.1", port), timeout=5):
        pass


@pytest.mark.parametrize(("url", "local"), [
    ("unix:///var/run/docker.sock", True),
    ("unix:///var/lib/imagebuild-bed/head/docker.sock", True),
    ("tcp://127.0.0.1:2375", True),
    ("tcp://localhost:2375", True),
    ("tcp://10.0.0.5:2376", False),
    ("ssh://admin@head-node", False),
])
def test_only_an_engine_on_this_machine_can_reach_the_served_wheels(url: str,
                                                                    local: bool) -> None:
    assert is_local_engine_url(url) is local
