"""The loopback wheel server, driven over real HTTP (no engine involved)."""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from imagebuild import wheelserve
from imagebuild.engine import is_local_engine_url
from imagebuild.fsutil import PinnedFile
from imagebuild.wheelserve import WheelServer

NAME = "vllm-0.22.1rc1.dev124+gace95c9cf.d20260603.cu132-py3-none-any.whl"


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    p = tmp_path / NAME
    p.write_bytes(bytes(range(256)) * 4096 + b"tail")  # 1 MiB + 4 bytes
    return p


@pytest.fixture
def pinned(wheel: Path) -> Iterator[dict[str, PinnedFile]]:
    f = PinnedFile.open(wheel)
    yield {NAME: f}
    f.close()


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


def test_serves_the_whole_file_and_byte_ranges_on_the_loopback(
        wheel: Path, pinned: dict[str, PinnedFile]) -> None:
    data = wheel.read_bytes()
    assert pinned[NAME].sha256() == hashlib.sha256(data).hexdigest()
    with WheelServer(pinned) as srv:
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
        # last before first is invalid, and an invalid range is ignored (RFC 9110 14.2)
        assert _get(srv.url, "/" + NAME, headers={"Range": "bytes=5-2"})[:3:2] == (200, data)
    assert srv.bytes_sent == 4 * len(data) + 10 + 4 + 2


@pytest.mark.parametrize("path", ["/", "/other.whl", "/../" + NAME, "/%2e%2e/" + NAME,
                                  "/x/" + NAME, "/etc/passwd"])
def test_serves_nothing_but_the_named_files(wheel: Path, pinned: dict[str, PinnedFile],
                                            path: str) -> None:
    (wheel.parent / "other.whl").write_bytes(b"not given to the server")
    with WheelServer(pinned) as srv:
        status, _, body = _get(srv.url, path)
    assert status == 404 and b"not given" not in body


def test_a_wheel_swapped_after_the_check_is_never_seen(wheel: Path,
                                                       pinned: dict[str, PinnedFile]) -> None:
    """What is served is what was checked: the descriptor, not the path."""
    data = wheel.read_bytes()
    with WheelServer(pinned) as srv:
        replacement = wheel.with_suffix(".new")
        replacement.write_bytes(b"swapped in after the lock check")
        os.replace(replacement, wheel)
        status, _, body = _get(srv.url, "/" + NAME)
        assert (status, body) == (200, data)
    assert srv.refused == []


def test_a_wheel_rewritten_in_place_is_refused_even_with_its_mtime_put_back(
        wheel: Path, pinned: dict[str, PinnedFile]) -> None:
    logged: list[str] = []
    st = wheel.stat()
    with WheelServer(pinned, log=logged.append) as srv:
        time.sleep(0.01)
        with wheel.open("r+b") as f:  # same inode, same size
            f.write(b"EVIL")
        os.utime(wheel, ns=(st.st_atime_ns, st.st_mtime_ns))
        status, _, body = _get(srv.url, "/" + NAME)
        assert status == 409 and b"changed" in body
        assert srv.refused and "changed after it was checked" in srv.refused[0]
        assert srv.bytes_sent == 0
    assert any("changed after it was checked" in m for m in logged)


def test_a_wheel_changed_while_the_build_ran_fails_it(wheel: Path,
                                                      pinned: dict[str, PinnedFile]) -> None:
    with WheelServer(pinned) as srv:
        assert _get(srv.url, "/" + NAME)[0] == 200
        with wheel.open("r+b") as f:
            f.write(b"late")
    assert any("changed while it was served" in r for r in srv.refused)


@pytest.mark.parametrize("header, status", [
    ("bytes=" + "9" * 5000 + "-", 416),
    ("bytes=0-" + "9" * 5000, 416),
    ("bytes=-" + "9" * 40, 416),
    ("bytes=abc", 400),
    ("bytes=-", 400),
    ("items=0-1", 400),
    ("bytes=0-1-2", 400),
])
def test_a_malformed_range_is_refused_not_a_traceback(pinned: dict[str, PinnedFile],
                                                      header: str, status: int) -> None:
    logged: list[str] = []
    with WheelServer(pinned, log=logged.append) as srv:
        assert _get(srv.url, "/" + NAME, headers={"Range": header})[0] == status
        assert _get(srv.url, "/" + NAME, headers={"Range": "bytes=0-0"})[0] == 206
    assert not any("Traceback" in m for m in logged)


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_idle_connections_time_out_and_their_number_is_capped(
        pinned: dict[str, PinnedFile], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wheelserve, "MAX_CONNECTIONS", 4)
    monkeypatch.setattr(wheelserve._Handler, "timeout", 1.5)
    with WheelServer(pinned) as srv:
        u = urlsplit(srv.url)
        idle = [socket.create_connection((u.hostname or "", u.port or 0)) for _ in range(4)]
        time.sleep(0.3)
        extra = socket.create_connection((u.hostname or "", u.port or 0))
        assert _closed_by_peer(extra, 1.0)  # the fifth is turned away at once
        assert all(_closed_by_peer(s, 5.0) for s in idle)  # the idle ones time out
        time.sleep(0.3)
        assert _get(srv.url, "/" + NAME, headers={"Range": "bytes=0-0"})[0] == 206
        for s in [*idle, extra]:
            s.close()


def test_nothing_is_served_after_close_even_on_a_kept_alive_connection(
        pinned: dict[str, PinnedFile]) -> None:
    srv = WheelServer(pinned)
    srv.__enter__()
    u = urlsplit(srv.url)
    conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=5)
    conn.request("GET", "/" + NAME, headers={"Range": "bytes=0-1"})
    r = conn.getresponse()
    assert r.status == 206 and r.read() == bytes([0, 1])
    srv.close()
    with pytest.raises((http.client.HTTPException, OSError)):
        conn.request("GET", "/" + NAME)
        conn.getresponse()
    conn.close()
    assert srv.bytes_sent == 2


def test_the_port_is_closed_when_the_build_is_over(pinned: dict[str, PinnedFile]) -> None:
    with WheelServer(pinned) as srv:
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
    ("tcp://127.0.0.2:2375", True),
    ("tcp://[::1]:2375", True),
    ("tcp://127.attacker.example:2375", False),
    ("tcp://127.0.0.1.nip.io:2375", False),
    ("tcp://[::1:2375", False),
])
def test_only_an_engine_on_this_machine_can_reach_the_served_wheels(url: str,
                                                                    local: bool) -> None:
    assert is_local_engine_url(url) is local
