"""web.py against a small HTTP server on 127.0.0.1: bodies read whole only up to their
limit, a missing file is None, a download is hashed as it is written, other errors raise."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from imagebuild import web

from .httpserver import StaticServer, serving

PAGES = {"/page": "<a href='x.whl#sha256=ab'>x.whl</a> é".encode(), "/big": b"x" * 5000}


@pytest.fixture
def base() -> Iterator[str]:
    with serving(StaticServer(PAGES, broken={"/broken"})) as server:
        yield server.base


def test_pages_bytes_and_downloads(base: str, tmp_path: Path) -> None:
    assert web.get_text(f"{base}/page") == PAGES["/page"].decode()
    assert web.get_bytes(f"{base}/big") == PAGES["/big"]
    dest = tmp_path / "big.whl"
    assert web.download(f"{base}/big", dest) == hashlib.sha256(PAGES["/big"]).hexdigest()
    assert dest.read_bytes() == PAGES["/big"]


def test_missing_is_none_or_false_and_other_errors_raise(base: str, tmp_path: Path) -> None:
    assert web.get_bytes(f"{base}/nothing") is None
    assert web.download(f"{base}/nothing", tmp_path / "x") is None
    assert not (tmp_path / "x").exists()
    with pytest.raises(requests.HTTPError):
        web.get_text(f"{base}/nothing")  # an index page that is not there is an error
    for call in (web.get_text, web.get_bytes):
        with pytest.raises(requests.HTTPError):
            call(f"{base}/broken")


def test_a_body_past_its_limit_is_refused(base: str) -> None:
    with pytest.raises(web.TooLarge, match="more than 4096 bytes"):
        web.get_bytes(f"{base}/big", limit=4096)
    with pytest.raises(web.TooLarge):
        web.get_text(f"{base}/big", limit=4096)
    assert web.get_bytes(f"{base}/big", limit=5000) == PAGES["/big"]  # exactly at it
