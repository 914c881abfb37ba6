"""Serve an image's wheels to its build over loopback HTTP, for the duration of one build.

Why not ``COPY wheels/*.whl``: with the classic builder a COPY is a layer of its own, so
the wheels stay in the image for good (the install RUN deletes them, but only from a
later layer) and every rebuild ships them to every worker twice: once as the COPY
layer, once installed. Served instead, the install RUN is the only layer they touch.

Builds run with host networking, so the RUN reaches this server on 127.0.0.1. It binds
the loopback only, on a port fixed per state directory (``preferred_port``) when that is
free: the URL is a build argument, and the classic builder counts a build argument's
value in the cache key of every RUN after its declaration, so a URL that changed from
build to build would rebuild every install group that can take a local wheel (the
flashinfer group below vllm's, on a vllm bump). Otherwise any free port. It serves
exactly the files it was given (by name, nothing else, no listings), answers byte
ranges (uv reads a wheel's metadata with a range request before it downloads the whole
file) and moves the bytes with
``sendfile`` (no Python copying, flat memory). Integrity is checked twice: imagebuild
hashes every wheel against wheels.lock before the engine is touched, and the
requirements file the RUN installs from pins each URL by sha256, which uv checks on
download. Each file is opened once, hashed through that descriptor, and served from the
same descriptor: a file swapped in by rename afterwards is never seen, and one rewritten
in place (its ctime moves even when its mtime is put back) is refused with 409.

Bounded: an idle connection is closed after ``IDLE_TIMEOUT`` seconds, at most
``MAX_CONNECTIONS`` are served at once, a malformed ``Range`` is answered 400, one past
the end 416 (one whose last byte is before its first is ignored: the whole file),
and nothing is served once the server is closed (open connections are shut down).
"""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote, urlsplit

from .fsutil import PinnedFile

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)\Z")
_MAX_DIGITS = 18  # byte offsets beyond an exabyte are not offsets
PORT_BASE, PORT_SPAN = 20000, 10000  # below the usual ephemeral range (32768 on Linux)
SHUTDOWN_POLL = 0.02  # how soon the serving thread sees close(): a build waits for it
IDLE_TIMEOUT = 30.0  # seconds a connection may sit idle
MAX_CONNECTIONS = 32

class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    owner: WheelServer

    allow_reuse_address = True  # a preferred port in TIME_WAIT from the last build is free

    def __init__(self, owner: WheelServer, handler: type[_Handler], port: int = 0) -> None:
        self.owner = owner
        self.active: set[socket.socket] = set()
        self.guard = threading.Lock()
        super().__init__(("127.0.0.1", port), handler)

    def process_request(self, request: socket.socket | tuple[bytes, socket.socket],
                        client_address: object) -> None:
        assert isinstance(request, socket.socket)
        with self.guard:
            full = len(self.active) >= MAX_CONNECTIONS or self.owner.closed
            if not full:
                self.active.add(request)
        if full:
            self.owner.log("wheel server: connection refused (too many, or closed)")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket | tuple[bytes, socket.socket]
                         ) -> None:
        with self.guard:
            self.active.discard(request)
        super().shutdown_request(request)

    def drop_all(self, wait: float = 5.0) -> None:
        """Shut down every open connection and wait (a little) for their handlers."""
        with self.guard:
            conns = list(self.active)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with self.guard:
                if not self.active:
                    return
            time.sleep(0.01)


def preferred_port(state_dir: Path) -> int:
    """The wheel server's port for builds of the stack whose state is ``state_dir``: the
    same for every build of it (the builder cache stays usable), another for another
    stack on the same host (so two of them seldom meet)."""
    digest = hashlib.sha256(str(state_dir).encode()).digest()
    return PORT_BASE + int.from_bytes(digest[:4], "big") % PORT_SPAN


class WheelServer:
    """``with WheelServer({filename: PinnedFile.open(path)}) as srv:`` then pass
    ``srv.url`` to the build. The files stay the caller's to close."""

    def __init__(self, files: dict[str, PinnedFile], log: Callable[[str], None] | None = None,
                 port: int = 0) -> None:
        self._files = dict(files)
        self.port = port  # preferred (0: any); taken when free, else any free port
        self.log = log or (lambda _msg: None)
        self._lock = threading.Lock()
        self.bytes_sent = 0
        self.refused: list[str] = []  # why a request for a known file was refused
        self.closed = False
        self._httpd: _Server | None = None
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

        try:
            self._httpd = _Server(self, Handler, self.port)
        except OSError as exc:
            if not self.port:
                raise
            self.log(f"wheel server: port {self.port} is taken ({exc.strerror}); serving on "
                     f"another one, so the builder cache cannot reuse the steps that "
                     f"install local wheels this time")
            self._httpd = _Server(self, Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": SHUTDOWN_POLL},
                                        name="imagebuild-wheelserve", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving: the port closes and open connections are shut down. A file that
        changed while the server ran is recorded as refused."""
        self.closed = True
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.drop_all()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        for name, pinned in self._files.items():
            if pinned.fd >= 0 and pinned.changed():
                self.refuse(f"{pinned.path} changed while it was served; {name} is not "
                            f"what was checked against wheels.lock")

    # -- used by the handler ------------------------------------------------------------

    def lookup(self, name: str) -> PinnedFile | None:
        return self._files.get(name)

    def refuse(self, why: str) -> None:
        with self._lock:
            if why not in self.refused:
                self.refused.append(why)
        self.log(f"wheel server: {why}")

    def count(self, n: int) -> None:
        with self._lock:
            self.bytes_sent += n


class _Handler(http.server.BaseHTTPRequestHandler):
    owner: WheelServer
    protocol_version = "HTTP/1.1"
    server_version = "imagebuild-wheelserve"
    timeout = IDLE_TIMEOUT

    def log_message(self, format: str, *args: object) -> None:
        self.owner.log("wheel server: " + (format % args))

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, *, body: bool) -> None:
        if self.owner.closed:
            self.close_connection = True
            self._plain(503, "the build is over\n")
            return
        name = unquote(urlsplit(self.path).path).lstrip("/")
        pinned = self.owner.lookup(name)  # exact names only: no paths, no listing
        if pinned is None:
            self._plain(404, f"not served here: {name}\n")
            return
        if pinned.changed():
            self.owner.refuse(f"{pinned.path} changed after it was checked against "
                              f"wheels.lock; not served")
            self._plain(409, f"{name} changed after it was checked\n")
            return
        span = _parse_range(self.headers.get("Range"), pinned.size)
        if isinstance(span, str):
            self._plain(400, "malformed Range header\n")
            return
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
            with os.fdopen(os.dup(pinned.fd), "rb") as fh:
                sent = self.connection.sendfile(fh, offset=start, count=length)
        except OSError:  # the client went away, or timed out
            self.close_connection = True
            return
        self.owner.count(sent)
        if sent != length or pinned.changed():
            self.close_connection = True  # the client sees a short body, uv a bad hash
            if pinned.changed():
                self.owner.refuse(f"{pinned.path} changed while it was served")

    def _plain(self, code: int, text: str) -> None:
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


def _parse_range(header: str | None, size: int) -> tuple[int, int, bool] | str | None:
    """(start, length, partial) for a ``Range`` header; the whole file when there is none,
    it asks for several ranges (not served here) or its last byte is before its first
    (invalid: ignored); None when it is out of bounds;
    ``"bad"`` when it is malformed."""
    whole = (0, size, False)
    if header is None:
        return whole
    text = header.strip()
    if "," in text and text.startswith("bytes="):
        return whole
    m = _RANGE.match(text)
    if m is None or (m.group(1) == "" and m.group(2) == ""):
        return "bad"
    first, last = m.group(1), m.group(2)
    if len(first) > _MAX_DIGITS or len(last) > _MAX_DIGITS:
        return None
    if first == "":  # a suffix: the last N bytes
        n = min(int(last), size)
        return (size - n, n, True) if n > 0 else None
    start = int(first)
    if last and int(last) < start:
        return whole  # an invalid range (5-2) is ignored, as RFC 9110 says: the whole file
    end = min(int(last), size - 1) if last else size - 1
    if start >= size:
        return None
    return (start, end - start + 1, True)
