"""A static HTTP server on 127.0.0.1 for the unit tier: serves ``files`` (path -> body),
answers 500 for the paths in ``broken`` and 404 for the rest, and records every path
asked for. Started and stopped by ``serving``."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StaticServer:
    def __init__(self, files: dict[str, bytes] | None = None,
                 broken: set[str] | None = None) -> None:
        self.files = dict(files or {})
        self.broken = set(broken or ())
        self.requests: list[str] = []
        this = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                this.requests.append(self.path)
                if self.path in this.broken:
                    self.send_error(500)
                    return
                body = this.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"


@contextmanager
def serving(server: StaticServer) -> Iterator[StaticServer]:
    thread = threading.Thread(target=server.server.serve_forever,
                              kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()
