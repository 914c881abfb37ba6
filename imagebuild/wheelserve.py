"""Serve an image's wheels to its build over loopback HTTP, for the duration of one build.

Why not ``COPY wheels/*.whl``: with the classic builder a COPY is a layer of its own, so
the wheels stay in the image for good (the install RUN deletes them, but only from a
later layer) and every rebuild ships them to every worker twice: once as the COPY
layer, once installed. Served instead, the install RUN is the only layer they touch.

Builds run with host networking, so the RUN reaches this server on 127.0.0.1. It binds
an ephemeral port on the loopback only, serves exactly the files it was given (by
name, nothing else, no listings), answers byte ranges (uv reads a wheel's metadata
with a range request before it downloads the whole file) and moves the bytes with
``sendfile`` (no Python copying, flat memory). Integrity is checked twice: imagebuild
hashes every wheel against wheels.lock before the engine is touched, and the
requirements file the RUN installs from pins each URL by sha256, which uv checks on
download. A file whose size, mtime or inode changed after that first check is not
served at all.
"""

from __future__ import annotations

import http.server
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass(frozen=True)
class _Pinned:
    path: Path
    identity: tuple[int, int, int, int]  # dev, ino, size, mtime_ns

    @property
    def size(self) -> int:
        return self.identity[2]


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class WheelServer:
    """``with WheelServer({filename: path}) as srv:`` then pass ``srv.url`` to the build.

    The files are pinned (size, mtime, inode) when the server starts: call it right after
    the files were checked against wheels.lock.
    """

    def __init__(self, files: dict[str, Path], log: Callable[[str], None] | None = None
                 ) -> None:
        self._files: dict[str, _Pinned] = {}
        for name, path in files.items():
            self._files[name] = _Pinned(path, _identity(path.stat()))
        self._log = log or (lambda _msg: None)
        self._lock = threading.Lock()
        self.bytes_sent = 0
        self.refused: list[str] = []  # why a request for a known file was refused
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None, "the server is not running"
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> WheelServer:
        server = self

        class Handler(_Handler):
            owner = server

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.2},
                                        name="imagebuild-wheelserve", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # -- used by the handler ------------------------------------------------------------

    def lookup(self, name: str) -> _Pinned | None:
        return self._files.get(name)

    def refuse(self, why: str) -> None:
        with self._lock:
            self.refused.append(why)
        self._log(f"wheel server: {why}")

    def count(self, n: int) -> None:
        with self._lock:
            self.bytes_sent += n


class _Handler(http.server.BaseHTTPRequestHandler):
    owner: WheelServer
    protocol_version = "HTTP/1.1"
    server_version = "imagebuild-wheelserve"

    def log_message(self, format: str, *args: object) -> None:
        self.owner._log("wheel server: " + (format % args))

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, *, body: bool) -> None:
        name = unquote(urlsplit(self.path).path).lstrip("/")
        pinned = self.owner.lookup(name)  # exact names only: no paths, no listing
        if pinned is None:
            self._plain(404, f"not served here: {name}\n")
            return
        try:
            fh = pinned.path.open("rb")
        except OSError as exc:
            self.owner.refuse(f"{pinned.path}: cannot open: {exc.strerror}")
            self._plain(500, f"cannot open {name}\n")
            return
        with fh:
            if _identity(os.fstat(fh.fileno())) != pinned.identity:
                self.owner.refuse(f"{pinned.path} changed after it was checked against "
                                  f"wheels.lock; not served")
                self._plain(409, f"{name} changed after it was checked\n")
                return
            span = _parse_range(self.headers.get("Range"), pinned.size)
            if span is None:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{pinned.size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, length, partial = span
            self.send_response(206 if partial else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(length))
            if partial:
                self.send_header("Content-Range",
                                 f"bytes {start}-{start + length - 1}/{pinned.size}")
            self.end_headers()
            if not body or length == 0:
                return
            self.wfile.flush()
            try:
                sent = self.connection.sendfile(fh, offset=start, count=length)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
                return
            self.owner.count(sent)
            if sent != length:  # the file shrank under us: the client sees a short body
                self.close_connection = True

    def _plain(self, code: int, text: str) -> None:
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


def _parse_range(header: str | None, size: int) -> tuple[int, int, bool] | None:
    """(start, length, partial) for a ``Range`` header; the whole file when there is none
    or it is a form not served here (several ranges); None when it is out of bounds."""
    whole = (0, size, False)
    m = _RANGE.match(header.strip()) if header else None
    if m is None or (m.group(1) == "" and m.group(2) == ""):
        return whole
    first, last = m.group(1), m.group(2)
    if first == "":  # a suffix: the last N bytes
        n = min(int(last), size)
        return (size - n, n, True) if n > 0 else None
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        return None
    return (start, end - start + 1, True)
