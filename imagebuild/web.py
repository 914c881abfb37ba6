"""Plain HTTP GETs, with ``requests``: an index page (the sha256 an index publishes), a
wheel's metadata file, a wheel downloaded to a file. Bodies are streamed and bounded (a
reply past ``limit`` bytes is refused, never read whole into memory), every request has
a connect and a read timeout. The registry's API is registry.py's, on its own session.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import requests

CONNECT_TIMEOUT = 10
MAX_BODY = 64 << 20  # an index page or a metadata file; a wheel goes to a file instead
CHUNK = 1 << 20


class TooLarge(ValueError):
    """A reply longer than the caller allows."""


def _body(resp: requests.Response, url: str, limit: int) -> bytes:
    out = bytearray()
    for chunk in resp.iter_content(CHUNK):
        out += chunk
        if len(out) > limit:
            raise TooLarge(f"{url} answered with more than {limit} bytes")
    return bytes(out)


def get_text(url: str, timeout: float = 30, limit: int = MAX_BODY) -> str:
    """The body of ``url`` as text (an HTTP error, 404 included, raises)."""
    body = _get(url, timeout, limit, missing_ok=False)
    assert body is not None
    return body.decode("utf-8", errors="replace")


def get_bytes(url: str, timeout: float = 60, limit: int = MAX_BODY) -> bytes | None:
    """The body of ``url``, or None when it is not there (404)."""
    return _get(url, timeout, limit, missing_ok=True)


def _get(url: str, timeout: float, limit: int, *, missing_ok: bool) -> bytes | None:
    with requests.get(url, timeout=(CONNECT_TIMEOUT, timeout), stream=True) as resp:
        if missing_ok and resp.status_code == 404:
            return None
        resp.raise_for_status()
        return _body(resp, url, limit)


def download(url: str, dest: Path, timeout: float = 60) -> str | None:
    """``url`` streamed into the file ``dest``, hashed as it is written: the sha256 of the
    bytes written, or None when it is not there (404). The caller checks the digest; the
    file is never read a second time to hash it."""
    h = hashlib.sha256()
    with requests.get(url, timeout=(CONNECT_TIMEOUT, timeout), stream=True) as resp:
        if resp.status_code == 404:
            return None
        resp.raise_for_status()
        with dest.open("wb") as f:
            for chunk in resp.iter_content(CHUNK):
                h.update(chunk)
                f.write(chunk)
    return h.hexdigest()
