"""distribute --via registry without a registry: the spec's ``registry`` section, the
choice of path, the docker config's credentials, the HTTP client against a small
server on 127.0.0.1, and what a worker is planned to pull."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import socket
import stat
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from imagebuild.archive import ArchiveIndex
from imagebuild.distribute import Item, WorkerState, oci_image, oci_pieces, plan_item
from imagebuild.errors import BackupError, RegistryError, SpecError
from imagebuild.fsutil import PinnedFile
from imagebuild.image import ImageInfo
from imagebuild.registry import (
    MANIFEST_MEDIA,
    Credentials,
    RegistryClient,
    docker_credentials,
)
from imagebuild.shipping import choose_path
from imagebuild.spec import Registry, Spec
from imagebuild.streams import archive_chunks

from ..archives import oci_like, save_like
from .conftest import SPEC, Stack

# -- the spec's registry section -----------------------------------------------------------


def _with_registry(stack: Stack, body: str) -> Spec:
    stack.write_spec(SPEC + "registry:\n" + body)
    return stack.load()


def _registry_fails(stack: Stack, body: str) -> SpecError:
    stack.write_spec(SPEC + "registry:\n" + body)
    with pytest.raises(SpecError) as info:
        stack.load()
    assert info.value.exit_code == 2
    return info.value


def test_a_spec_without_a_registry_section_has_none(stack: Stack) -> None:
    assert stack.load().registry is None


def test_registry_defaults(stack: Stack) -> None:
    spec = _with_registry(stack, "  address: head:5000\n")
    reg = spec.registry
    assert reg is not None
    assert reg.address == "head:5000"
    assert reg.tls is True and reg.start is False
    assert reg.repository == "" and reg.min_workers == 4
    assert reg.storage == spec.state_dir / "registry"
    assert spec.state_dir == stack.root / "state"
    assert reg.repo("vllm-node") == "vllm-node"


def test_registry_every_key_given(stack: Stack, tmp_path: Path) -> None:
    spec = _with_registry(stack, "  address: 192.168.100.1:15000\n  tls: false\n"
                                 "  repository: cluster/vllm-images\n  start: true\n"
                                 f"  storage: {tmp_path / 'blobs'}\n  min_workers: 2\n")
    assert spec.registry == Registry(address="192.168.100.1:15000", tls=False,
                                     repository="cluster/vllm-images", start=True,
                                     storage=tmp_path / "blobs", min_workers=2)
    assert spec.registry.repo("vllm-node") == "cluster/vllm-images/vllm-node"


@pytest.mark.parametrize("address", ["registry.lan", "head", "[::1]:5000", "[fd00::1]",
                                     "h-1.example:65535", "127.0.0.1:1"])
def test_registry_addresses_that_are_accepted(stack: Stack, address: str) -> None:
    spec = _with_registry(stack, f'  address: "{address}"\n')
    assert spec.registry is not None and spec.registry.address == address


def test_a_relative_storage_is_under_the_spec_directory(stack: Stack) -> None:
    spec = _with_registry(stack, "  address: head:5000\n  storage: reg/blobs\n")
    assert spec.registry is not None and spec.registry.storage == stack.root / "reg/blobs"


@pytest.mark.parametrize(("body", "key", "says"), [
    ("  address: http://x:5000\n", "address", "no scheme"),
    ("  address: https://x\n", "address", "no scheme"),
    ("  address: -x:5000\n", "address", "is not a valid registry address"),
    ("  address: x/y:5000\n", "address", "is not a valid registry address"),
    ("  address: host:99999\n", "address", "port 99999 is not a TCP port"),
    ("  address: host:65536\n", "address", "port 65536 is not a TCP port"),
    ("  address: host:0\n", "address", "port 0 is not a TCP port"),
    ('  address: "[::1]:99999"\n', "address", "port 99999 is not a TCP port"),
    ('  address: "host:"\n', "address", "is not a valid registry address"),
    ('  address: "x:5000\\n"\n', "address", "newline or control character"),
    ('  address: "x:5000\\nevil"\n', "address", "newline or control character"),
    ("  address: true\n", "address", "expected host:port as text"),
    ("  address: [a, b]\n", "address", "expected host:port as text"),
    ("  address: 5000\n", "address", "expected host:port as text, got 5000"),
    ('  address: head:5000\n  tls: "yes"\n', "tls", "expected true or false, got 'yes'"),
    ("  address: head:5000\n  tls: 1\n", "tls", "expected true or false"),
    ("  address: head:5000\n  start: yes please\n", "start", "expected true or false"),
    ("  address: head:5000\n  start: true\n", "start", "plain-HTTP registry only"),
    ("  address: head:5000\n  min_workers: 0\n", "min_workers", "whole number >= 1"),
    ("  address: head:5000\n  min_workers: -3\n", "min_workers", "whole number >= 1"),
    ("  address: head:5000\n  min_workers: true\n", "min_workers", "whole number >= 1"),
    ("  address: head:5000\n  min_workers: 2.5\n", "min_workers", "whole number >= 1"),
    ('  address: head:5000\n  min_workers: "4"\n', "min_workers", "whole number >= 1"),
    ("  address: head:5000\n  repository: UPPER/Case\n", "repository",
     "is not a valid repository prefix"),
    ("  address: head:5000\n  repository: /lead\n", "repository",
     "is not a valid repository prefix"),
    ("  address: head:5000\n  repository: a//b\n", "repository",
     "is not a valid repository prefix"),
    ("  address: head:5000\n  repository: a/b/\n", "repository",
     "is not a valid repository prefix"),
    ("  address: head:5000\n  storage: ${IMAGEBUILD_TEST_UNSET_VAR}/r\n", "storage",
     "IMAGEBUILD_TEST_UNSET_VAR which is unset"),
])
def test_a_bad_registry_value_names_its_key_and_line(
        stack: Stack, monkeypatch: pytest.MonkeyPatch, body: str, key: str, says: str) -> None:
    monkeypatch.delenv("IMAGEBUILD_TEST_UNSET_VAR", raising=False)
    err = _registry_fails(stack, body)
    lines = body.splitlines()
    line = len(SPEC.splitlines()) + 1 + next(
        i for i, text in enumerate(lines, 1) if text.startswith(f"  {key}:"))
    assert f"imagebuild.yaml:{line}: registry.{key}: " in err.message
    assert says in err.message


def test_start_with_tls_says_how_to_fix_it(stack: Stack) -> None:
    err = _registry_fails(stack, "  address: head:5000\n  start: true\n")
    assert err.hint is not None and "tls: false" in err.hint
    # the same with tls off is a registry imagebuild may start
    spec = _with_registry(stack, "  address: head:5000\n  start: true\n  tls: false\n")
    assert spec.registry is not None and spec.registry.start and not spec.registry.tls


def test_an_unknown_registry_key_is_refused_with_a_suggestion(stack: Stack) -> None:
    err = _registry_fails(stack, "  address: head:5000\n  min_worker: 2\n")
    line = len(SPEC.splitlines()) + 3
    assert f"imagebuild.yaml:{line}: registry: unknown key 'min_worker'" in err.message
    assert "did you mean 'min_workers'" in err.message
    assert err.hint is not None and "min_workers" in err.hint


def test_a_registry_without_an_address_or_not_a_mapping_is_refused(stack: Stack) -> None:
    err = _registry_fails(stack, "  tls: false\n")
    assert "registry: missing required key 'address'" in err.message
    err = _registry_fails(stack, "  - head:5000\n")
    assert "registry: expected a mapping, got " in err.message
    stack.write_spec(SPEC + "registry: head:5000\n")
    with pytest.raises(SpecError, match="registry: expected a mapping, got str"):
        stack.load()


# -- ssh or the registry -------------------------------------------------------------------


def _spec(stack: Stack, registry: Registry | None) -> Spec:
    return replace(stack.load(), registry=registry)


def test_via_ssh_is_always_ssh(stack: Stack) -> None:
    for reg in (None, Registry("head:5000", min_workers=1)):
        assert choose_path(_spec(stack, reg), "ssh", 100) == ("ssh", "--via ssh")


def test_via_registry_needs_a_registry_section(stack: Stack) -> None:
    spec = _spec(stack, None)
    with pytest.raises(SpecError) as err:
        choose_path(spec, "registry", 8)
    assert str(spec.path) in err.value.message and "no registry section" in err.value.message
    assert err.value.hint is not None and "registry: {address:" in err.value.hint
    assert err.value.exit_code == 2
    with_reg = _spec(stack, Registry("head:5000", min_workers=50))
    assert choose_path(with_reg, "registry", 1) == ("registry", "--via registry")


def test_auto_without_a_registry_is_ssh(stack: Stack) -> None:
    assert choose_path(_spec(stack, None), "auto", 1000) == ("ssh", "no registry in the spec")


@pytest.mark.parametrize(("workers", "via"), [(0, "ssh"), (1, "ssh"), (2, "ssh"),
                                              (3, "registry"), (4, "registry")])
def test_auto_uses_the_registry_from_min_workers_on(stack: Stack, workers: int,
                                                    via: str) -> None:
    path, why = choose_path(_spec(stack, Registry("head:5000", min_workers=3)), "auto", workers)
    assert path == via
    sign = ">=" if via == "registry" else "<"
    assert why == f"{workers} workers {sign} registry.min_workers 3"


@pytest.mark.parametrize("via", ["", "SSH", "rsync", "registry "])
def test_an_unknown_via_is_refused(stack: Stack, via: str) -> None:
    for reg in (None, Registry("head:5000")):
        with pytest.raises(SpecError, match="expected ssh, registry or auto"):
            choose_path(_spec(stack, reg), via, 4)


# -- credentials from the docker config ----------------------------------------------------

ADDR = "reg.lan:5000"


def _config(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_an_auths_entry_with_base64_auth(tmp_path: Path) -> None:
    path = _config(tmp_path, {"auths": {ADDR: {"auth": _b64("alice:s3:cr:et")},
                                        "other:5000": {"auth": _b64("bob:x")}}})
    creds = docker_credentials(ADDR, path)
    assert creds == Credentials("alice", "s3:cr:et")  # the password may hold colons
    assert "s3:cr:et" not in repr(creds)


@pytest.mark.parametrize("key", [ADDR, f"https://{ADDR}", f"http://{ADDR}"])
def test_an_auths_entry_with_username_and_password_under_each_key(tmp_path: Path,
                                                                   key: str) -> None:
    path = _config(tmp_path, {"auths": {key: {"username": "u", "password": "p"}}})
    assert docker_credentials(ADDR, path) == Credentials("u", "p")


def test_the_plain_address_wins_over_a_url_key(tmp_path: Path) -> None:
    path = _config(tmp_path, {"auths": {f"https://{ADDR}": {"auth": _b64("https:1")},
                                        ADDR: {"auth": _b64("plain:2")}}})
    assert docker_credentials(ADDR, path) == Credentials("plain", "2")


def test_no_config_or_no_entry_is_none(tmp_path: Path) -> None:
    assert docker_credentials(ADDR, tmp_path / "missing.json") is None
    assert docker_credentials(ADDR, _config(tmp_path, {})) is None
    assert docker_credentials(ADDR, _config(tmp_path, {"auths": {
        "reg.lan:5001": {"auth": _b64("a:b")}, "reg.lan": {"auth": _b64("a:b")}}})) is None
    # an entry docker login leaves when a credential store holds the secret
    assert docker_credentials(ADDR, _config(tmp_path, {"auths": {ADDR: {}}})) is None


def test_the_default_config_is_found_through_docker_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    assert docker_credentials(ADDR) is None
    _config(tmp_path, {"auths": {ADDR: {"auth": _b64("d:c")}}})
    assert docker_credentials(ADDR) == Credentials("d", "c")


@pytest.mark.parametrize(("data", "says"), [
    ("{not json", "is not JSON"),
    ("[]", "is not a JSON object"),
    ({"auths": ["x"]}, "'auths' is not an object"),
    ({"auths": "x"}, "'auths' is not an object"),
    ({"auths": {ADDR: "x"}}, "is not an object"),
    ({"auths": {ADDR: {"auth": "not base64!"}}}, "'auth' is not base64 of user:password"),
    ({"auths": {ADDR: {"auth": base64.b64encode(b"\xff\xfe:x").decode()}}},
     "'auth' is not base64"),
    ({"auths": {ADDR: {"username": "u", "password": 5}}}, "are not strings"),
])
def test_a_bad_docker_config_is_a_registry_error(tmp_path: Path, data: object,
                                                 says: str) -> None:
    path = _config(tmp_path, data)
    with pytest.raises(RegistryError) as err:
        docker_credentials(ADDR, path)
    assert str(path) in err.value.message and says in err.value.message
    assert err.value.exit_code == 11


def test_malformed_json_and_bad_base64_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(RegistryError) as err:
        docker_credentials(ADDR, _config(tmp_path, "{"))
    assert err.value.hint is not None and "docker login" in err.value.hint
    with pytest.raises(RegistryError) as err:
        docker_credentials(ADDR, _config(tmp_path, {"auths": {ADDR: {"auth": "%%%"}}}))
    assert err.value.hint is not None and "docker login" in err.value.hint


def test_a_credential_helper_that_is_not_installed(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    path = _config(tmp_path, {"credHelpers": {ADDR: "imagebuild-test-none"},
                              "auths": {ADDR: {"auth": _b64("a:b")}}})
    with pytest.raises(RegistryError) as err:  # the registry path's failure: exit 11
        docker_credentials(ADDR, path)
    assert "docker-credential-imagebuild-test-none" in err.value.message
    assert "not installed" in err.value.message and err.value.exit_code == 11


@pytest.mark.parametrize("helper", ["../evil", "/usr/bin/x", "a b", "-x;rm"])
def test_a_credential_helper_that_is_not_a_program_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, helper: str) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing would run even if it tried
    path = _config(tmp_path, {"credHelpers": {ADDR: helper}})
    with pytest.raises(RegistryError, match="not a plain program name"):
        docker_credentials(ADDR, path)


def _helper(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    p = bin_dir / f"docker-credential-{name}"
    p.write_text("#!/bin/sh\n" + script)
    p.chmod(p.stat().st_mode | stat.S_IXUSR)


def test_a_credential_helper_is_asked_for_the_address(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    asked = tmp_path / "asked"
    _helper(bin_dir, "good", f'read -r server\nprintf %s "$1 $server" > {asked}\n'
                             'printf \'{"Username": "hu", "Secret": "hs"}\'\n')
    _helper(bin_dir, "empty", "echo 'credentials not found in native keychain'; exit 1\n")
    _helper(bin_dir, "garbled", "echo 'hello'\n")
    _helper(bin_dir, "broken", "echo 'keyring locked' >&2; exit 3\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    path = _config(tmp_path, {"credHelpers": {ADDR: "good"},
                              "auths": {ADDR: {"auth": _b64("file:entry")}}})
    assert docker_credentials(ADDR, path) == Credentials("hu", "hs")
    assert asked.read_text() == f"get {ADDR}"
    # credsStore answers for every registry without a credHelpers entry
    path = _config(tmp_path, {"credsStore": "good", "credHelpers": {"x:1": "empty"}})
    assert docker_credentials(ADDR, path) == Credentials("hu", "hs")
    path = _config(tmp_path, {"credsStore": "empty"})
    assert docker_credentials(ADDR, path) is None
    path = _config(tmp_path, {"credsStore": "garbled"})
    with pytest.raises(RegistryError, match="did not reply with Username and Secret"):
        docker_credentials(ADDR, path)
    path = _config(tmp_path, {"credsStore": "broken"})
    with pytest.raises(RegistryError, match=r"exit 3\): keyring locked"):
        docker_credentials(ADDR, path)
    # a helper that never answers is given up on, also as the registry path's failure
    _helper(bin_dir, "silent", "sleep 5\n")
    monkeypatch.setattr("imagebuild.registry.HELPER_TIMEOUT", 0.5)
    path = _config(tmp_path, {"credsStore": "silent"})
    with pytest.raises(RegistryError, match=r"did not answer within 0.5s") as err:
        docker_credentials(ADDR, path)
    assert err.value.exit_code == 11


# -- the HTTP client against a small server ------------------------------------------------


@dataclass
class Seen:
    """One request as the server read it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: bytes


Reply = tuple[int, dict[str, str], bytes]
Respond = Callable[[Seen], Reply]


class FakeRegistry:
    """A ThreadingHTTPServer on 127.0.0.1 that records every request and answers with
    ``respond``."""

    def __init__(self, respond: Respond, host: str = "127.0.0.1") -> None:
        self.host = host
        self.respond = respond
        self.seen: list[Seen] = []
        self.arrived = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # a client that stops mid-body cannot hold a thread for long

            def handle_one(self) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                body = self._body(headers)
                parts = urlsplit(self.path)
                req = Seen(self.command, parts.path,
                           parse_qs(parts.query, keep_blank_values=True), headers, body)
                with outer.arrived:
                    outer.seen.append(req)
                    outer.arrived.notify_all()
                status, reply_headers, data = outer.respond(req)
                try:
                    self.send_response(status)
                    for name, value in reply_headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                except OSError:  # the client went away
                    pass

            def _body(self, headers: dict[str, str]) -> bytes:
                if headers.get("transfer-encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0] or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                length = int(headers.get("content-length", "0"))
                return self.rfile.read(length) if length else b""

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = handle_one

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def client(self, credentials: Credentials | None = None) -> RegistryClient:
        return RegistryClient(self.address, tls=False, credentials=credentials)

    def wait_for(self, n: int) -> list[Seen]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.seen) >= n, timeout=10)
            return list(self.seen)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Callable[[Respond],
                                                                               FakeRegistry]]:
    """Start a FakeRegistry (stopped after the test); requests goes straight to it."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,127.0.0.2,localhost")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    started: list[FakeRegistry] = []
    clients: list[RegistryClient] = []

    def start(respond: Respond, host: str = "127.0.0.1") -> FakeRegistry:
        srv = FakeRegistry(respond, host)
        started.append(srv)
        original = srv.client

        def client(credentials: Credentials | None = None) -> RegistryClient:
            c = original(credentials)
            clients.append(c)
            return c

        srv.client = client  # type: ignore[method-assign]
        return srv

    yield start
    for c in clients:
        c.close()
    for srv in started:
        srv.close()


Serve = Callable[..., FakeRegistry]


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _basic(user: str, password: str) -> str:
    return "Basic " + _b64(f"{user}:{password}")


def test_ping_with_200(serve: Serve) -> None:
    srv = serve(lambda req: (200, {}, b"{}"))
    srv.client().ping()
    [req] = srv.seen
    assert (req.method, req.path) == ("GET", "/v2/")
    assert "authorization" not in req.headers
    assert req.headers["user-agent"] == "imagebuild"


@pytest.mark.parametrize(("status", "says", "hint"), [
    (404, "HTTP 404", None),
    (500, "HTTP 500", None),
    (503, "HTTP 503", "refuses writes"),
])
def test_ping_of_something_that_is_not_a_registry(serve: Serve, status: int, says: str,
                                                  hint: str | None) -> None:
    srv = serve(lambda req: (status, {}, b"<html>nope</html>\n"))
    with pytest.raises(RegistryError) as err:
        srv.client().ping()
    assert srv.address in err.value.message and says in err.value.message
    assert "is this a registry?" in err.value.message and "nope" in err.value.message
    assert err.value.hint == hint or (hint is not None and hint in (err.value.hint or ""))


def test_ping_with_an_unknown_scheme(serve: Serve) -> None:
    srv = serve(lambda req: (401, {"WWW-Authenticate": "Negotiate"}, b""))
    with pytest.raises(RegistryError, match="unknown authentication scheme: 'Negotiate'"):
        srv.client(Credentials("u", "p")).ping()


def _basic_registry(user: str, password: str) -> Respond:
    def respond(req: Seen) -> Reply:
        if req.headers.get("authorization") == _basic(user, password):
            return 200, {}, b"{}"
        return 401, {"WWW-Authenticate": 'Basic realm="x"'}, b'{"errors":["UNAUTHORIZED"]}'
    return respond


def test_basic_auth_without_credentials_says_docker_login(serve: Serve) -> None:
    srv = serve(_basic_registry("alice", "pw"))
    with pytest.raises(RegistryError) as err:
        srv.client().ping()
    assert "needs credentials" in err.value.message
    assert err.value.hint == f"docker login {srv.address}"
    assert len(srv.seen) == 1  # nothing retried without anything to retry with


def test_basic_auth_retries_with_the_credentials(serve: Serve) -> None:
    srv = serve(_basic_registry("alice", "pa:ss"))
    client = srv.client(Credentials("alice", "pa:ss"))
    client.ping()
    first, second = srv.seen
    assert "authorization" not in first.headers
    assert (second.method, second.path) == ("GET", "/v2/")
    assert second.headers["authorization"] == _basic("alice", "pa:ss")
    # every later request carries them too
    assert client.has_blob("team/img", _digest(b"x"))
    assert srv.seen[-1].method == "HEAD"
    assert srv.seen[-1].headers["authorization"] == _basic("alice", "pa:ss")


def test_basic_auth_with_wrong_credentials(serve: Serve) -> None:
    srv = serve(_basic_registry("alice", "right"))
    with pytest.raises(RegistryError) as err:
        srv.client(Credentials("alice", "wrong")).ping()
    assert "HTTP 401" in err.value.message and "credentials" in err.value.message
    assert err.value.hint is not None and "docker login" in err.value.hint
    assert srv.seen[-1].headers["authorization"] == _basic("alice", "wrong")


DIGEST_OK = _digest(b"present")
DIGEST_MISSING = _digest(b"missing")
DIGEST_BROKEN = _digest(b"broken")


def _bearer_registry(srv_port: Callable[[], int], *, token_reply: Reply | None = None
                     ) -> Respond:
    def respond(req: Seen) -> Reply:
        if req.path == "/token":
            return token_reply or (200, {}, b'{"token": "t"}')
        if req.headers.get("authorization") != "Bearer t":
            realm = f"http://127.0.0.1:{srv_port()}/token"
            return 401, {"WWW-Authenticate": f'Bearer realm="{realm}",service="svc"'}, b""
        if req.method == "HEAD" and req.path.startswith("/v2/team/img/blobs/"):
            digest = req.path.rsplit("/", 1)[1]
            status = {DIGEST_OK: 200, DIGEST_MISSING: 404}.get(digest, 500)
            return status, {}, b""
        return 400, {}, b"unexpected"
    return respond


def test_bearer_tokens_are_fetched_once_per_scope_and_sent(serve: Serve) -> None:
    srv: FakeRegistry
    srv = serve(_bearer_registry(lambda: srv.port))
    client = srv.client()
    client.ping()
    assert client.has_blob("team/img", DIGEST_OK) is True
    assert client.has_blob("team/img", DIGEST_MISSING) is False
    with pytest.raises(RegistryError) as err:
        client.has_blob("team/img", DIGEST_BROKEN)
    assert "HTTP 500" in err.value.message and DIGEST_BROKEN[:19] in err.value.message
    tokens = [r for r in srv.seen if r.path == "/token"]
    assert len(tokens) == 1  # one scope, one token
    assert tokens[0].method == "GET"
    assert tokens[0].query == {"scope": ["repository:team/img:pull"], "service": ["svc"]}
    assert "authorization" not in tokens[0].headers  # anonymous: no credentials
    heads = [r for r in srv.seen if r.method == "HEAD"]
    assert [r.path.rsplit("/", 1)[1] for r in heads] == [DIGEST_OK, DIGEST_MISSING,
                                                          DIGEST_BROKEN]
    assert all(r.headers["authorization"] == "Bearer t" for r in heads)


def test_bearer_token_service_gets_the_credentials(serve: Serve) -> None:
    srv: FakeRegistry
    srv = serve(_bearer_registry(lambda: srv.port))
    client = srv.client(Credentials("bob", "pw"))
    client.ping()
    assert client.has_blob("team/img", DIGEST_OK)
    [token] = [r for r in srv.seen if r.path == "/token"]
    assert token.headers["authorization"] == _basic("bob", "pw")


@pytest.mark.parametrize(("reply", "says"), [
    ((200, {}, b'{"access_token": "t"}'), ""),  # the OAuth2 name is taken too
    ((200, {}, b"{}"), "replied without a token"),
    ((200, {}, b'{"token": ""}'), "replied without a token"),
    ((200, {}, b"[]"), "replied without a token"),
    ((200, {}, b"not json"), "failed"),
    ((401, {}, b"denied"), "HTTP 401"),
])
def test_bearer_token_service_replies(serve: Serve, reply: Reply, says: str) -> None:
    srv: FakeRegistry
    srv = serve(_bearer_registry(lambda: srv.port, token_reply=reply))
    client = srv.client()
    client.ping()
    if not says:
        assert client.has_blob("team/img", DIGEST_OK)
        return
    with pytest.raises(RegistryError, match=says):
        client.has_blob("team/img", DIGEST_OK)
    assert not any(r.method == "HEAD" for r in srv.seen)  # nothing asked without a token


def test_bearer_without_a_token_service(serve: Serve) -> None:
    srv = serve(lambda req: (401, {"WWW-Authenticate": 'Bearer realm="/token"'}, b""))
    client = srv.client()
    client.ping()
    with pytest.raises(RegistryError, match="names no token service"):
        client.has_blob("team/img", DIGEST_OK)


REPO_PATH = "/v2/team/img/blobs/uploads/"


def _upload_registry(*, stored_as: str | None = None, mount: bool = False,
                     put_status: int = 201) -> Respond:
    def respond(req: Seen) -> Reply:
        if req.method == "POST" and req.path == REPO_PATH:
            if mount and "mount" in req.query:
                return 201, {"Location": f"/v2/team/img/blobs/{req.query['mount'][0]}"}, b""
            return 202, {"Location": f"{REPO_PATH}u-1?_state=s1"}, b""
        if req.method == "PUT" and req.path == f"{REPO_PATH}u-1":
            said = stored_as or req.query["digest"][0]
            return put_status, {"Docker-Content-Digest": said}, b""
        return 400, {}, b"unexpected"
    return respond


BLOB_CHUNKS = [b"first chunk ", b"x" * 70000, b"", b"last"]
BLOB = b"".join(BLOB_CHUNKS)


def _chunks(consumed: list[int] | None = None) -> Iterator[bytes]:
    for chunk in BLOB_CHUNKS:
        if consumed is not None:
            consumed.append(len(chunk))
        yield chunk


def test_upload_blob_streams_one_put_with_its_length(serve: Serve) -> None:
    srv = serve(_upload_registry())
    seen_bytes: list[int] = []
    sent = srv.client().upload_blob("team/img", _digest(BLOB), len(BLOB), _chunks(),
                                    on_bytes=seen_bytes.append)
    assert sent is True
    post, put = srv.seen
    assert (post.method, post.path, post.query) == ("POST", REPO_PATH, {})
    assert (put.method, put.path) == ("PUT", f"{REPO_PATH}u-1")
    assert put.query == {"_state": ["s1"], "digest": [_digest(BLOB)]}
    assert put.headers["content-length"] == str(len(BLOB))
    assert "transfer-encoding" not in put.headers
    assert put.headers["content-type"] == "application/octet-stream"
    assert put.body == BLOB
    assert sum(seen_bytes) == len(BLOB)


def test_upload_blob_stored_under_another_digest(serve: Serve) -> None:
    srv = serve(_upload_registry(stored_as=_digest(b"other")))
    with pytest.raises(RegistryError) as err:
        srv.client().upload_blob("team/img", _digest(BLOB), len(BLOB), _chunks())
    assert f"stored blob {_digest(BLOB)[:19]} as {_digest(b'other')[:19]}" in err.value.message


@pytest.mark.parametrize(("status", "hint"), [(400, None), (405, "refuses writes"),
                                              (401, "docker login")])
def test_upload_blob_put_refused(serve: Serve, status: int, hint: str | None) -> None:
    srv = serve(_upload_registry(put_status=status))
    with pytest.raises(RegistryError) as err:
        srv.client().upload_blob("team/img", _digest(BLOB), len(BLOB), _chunks())
    assert f"HTTP {status}" in err.value.message and "into team/img" in err.value.message
    assert err.value.hint is None if hint is None else hint in (err.value.hint or "")


@pytest.mark.parametrize("reply", [(202, {}, b""), (405, {}, b"read-only"),
                                   (201, {"Location": "/x"}, b"")])
def test_upload_blob_start_refused(serve: Serve, reply: Reply) -> None:
    srv = serve(lambda req: reply)
    consumed: list[int] = []
    with pytest.raises(RegistryError, match="starting an upload into team/img"):
        srv.client().upload_blob("team/img", _digest(BLOB), len(BLOB), _chunks(consumed))
    assert [r.method for r in srv.seen] == ["POST"] and consumed == []


def test_upload_blob_mounted_sends_nothing(serve: Serve) -> None:
    srv = serve(_upload_registry(mount=True))
    consumed: list[int] = []
    sent = srv.client().upload_blob("team/img", _digest(BLOB), len(BLOB), _chunks(consumed),
                                    mount_from="team/base")
    assert sent is False
    [post] = srv.seen
    assert post.method == "POST" and post.path == REPO_PATH
    assert post.query == {"mount": [_digest(BLOB)], "from": ["team/base"]}
    assert consumed == []


def test_upload_blob_mount_declined_falls_back_to_a_put(serve: Serve) -> None:
    srv = serve(_upload_registry(mount=False))
    sent = srv.client().upload_blob("team/img", _digest(BLOB), len(BLOB), _chunks(),
                                    mount_from="team/base")
    assert sent is True
    assert [r.method for r in srv.seen] == ["POST", "PUT"] and srv.seen[1].body == BLOB


def test_upload_blob_with_bearer_asks_for_push_and_the_mount_source(serve: Serve) -> None:
    srv: FakeRegistry
    upload = _upload_registry(mount=True)

    def respond(req: Seen) -> Reply:
        if req.path == "/token":
            return 200, {}, b'{"token": "t"}'
        if req.headers.get("authorization") != "Bearer t":
            realm = f"http://127.0.0.1:{srv.port}/token"
            return 401, {"WWW-Authenticate": f'Bearer realm="{realm}"'}, b""
        return upload(req)

    srv = serve(respond)
    client = srv.client()
    client.ping()
    assert client.upload_blob("team/img", _digest(BLOB), len(BLOB), _chunks(),
                              mount_from="team/base") is False
    [token] = [r for r in srv.seen if r.path == "/token"]
    assert token.query == {"scope": ["repository:team/img:pull,push",
                                     "repository:team/base:pull"]}
    assert srv.seen[-1].headers["authorization"] == "Bearer t"


def test_a_damaged_layer_stops_the_upload_with_its_own_error(serve: Serve) -> None:
    srv = serve(_upload_registry())
    boom = BackupError("layer 2 is damaged: its bytes do not have the sha256")

    def damaged() -> Iterator[bytes]:
        yield b"a" * 1000
        yield b"b" * 1000
        raise boom

    with pytest.raises(BackupError) as err:
        srv.client().upload_blob("team/img", _digest(b"whatever"), 3000, damaged())
    assert err.value is boom
    post, put = srv.wait_for(2)
    assert post.method == "POST" and put.method == "PUT" and put.headers["content-length"] == "3000"
    assert put.body == b"a" * 1000 + b"b" * 1000  # cut short: the registry stores nothing


MANIFEST = b'{"schemaVersion":2}'


def _manifest_registry(said: str | None) -> Respond:
    def respond(req: Seen) -> Reply:
        if req.method == "PUT" and req.path == "/v2/team/img/manifests/0123456789ab":
            return 201, {"Docker-Content-Digest": said} if said else {}, b""
        return 400, {}, b"unexpected"
    return respond


def test_put_manifest(serve: Serve) -> None:
    srv = serve(_manifest_registry(_digest(MANIFEST)))
    srv.client().put_manifest("team/img", "0123456789ab", MANIFEST, _digest(MANIFEST))
    [put] = srv.seen
    assert put.body == MANIFEST and put.headers["content-type"] == MANIFEST_MEDIA
    # a registry that does not say the digest is believed
    srv2 = serve(_manifest_registry(None))
    srv2.client().put_manifest("team/img", "0123456789ab", MANIFEST, _digest(MANIFEST))


@pytest.mark.parametrize("said", [_digest(b"other"), "sha256:short", "md5:abc"])
def test_put_manifest_stored_under_another_digest(serve: Serve, said: str) -> None:
    srv = serve(_manifest_registry(said))
    with pytest.raises(RegistryError, match=r"stored the manifest of team/img:0123456789ab"):
        srv.client().put_manifest("team/img", "0123456789ab", MANIFEST, _digest(MANIFEST))


def test_put_manifest_refused(serve: Serve) -> None:
    srv = serve(lambda req: (400, {}, b'{"errors":[{"code":"MANIFEST_BLOB_UNKNOWN"}]}'))
    with pytest.raises(RegistryError) as err:
        srv.client().put_manifest("team/img", "t1", MANIFEST, _digest(MANIFEST))
    assert "HTTP 400" in err.value.message and "MANIFEST_BLOB_UNKNOWN" in err.value.message


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_registry_that_does_not_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    address = f"127.0.0.1:{_closed_port()}"
    client = RegistryClient(address, tls=False)
    try:
        with pytest.raises(RegistryError) as err:
            client.ping()
    finally:
        client.close()
    assert f"the registry at {address} does not answer (GET /v2/)" in err.value.message
    assert err.value.hint is not None and "--via ssh" in err.value.hint
    assert "registry.start" in err.value.hint
    assert err.value.exit_code == 11


def test_tls_to_a_plain_http_registry_says_tls(serve: Serve) -> None:
    srv = serve(lambda req: (200, {}, b"{}"))
    client = RegistryClient(srv.address, tls=True)
    try:
        with pytest.raises(RegistryError) as err:
            client.ping()
    finally:
        client.close()
    assert "TLS failed" in err.value.message
    assert err.value.hint is not None and "registry.tls: false" in err.value.hint


# -- what a worker pulls --------------------------------------------------------------------


def _read(path: Path) -> ArchiveIndex:
    return ArchiveIndex.read(PinnedFile.open(path))


def _info(diff_ids: list[str] | tuple[str, ...], env: str = "B=2") -> ImageInfo:
    cfg = {"Env": [env]}
    return ImageInfo(id="sha256:" + "1" * 64, tags=(), labels={}, diff_ids=tuple(diff_ids),
                     size=1, created="", config=cfg)


LAYERS = [b"base" * 3000, b"middle" * 500, b"top" * 7, b"middle" * 500]  # the 4th repeats


def _pulled_item(tmp_path: Path) -> tuple[Item, list[str]]:
    saved = save_like(tmp_path / "a.tar", LAYERS, repeat="same")
    archive = _read(saved.path)
    image = oci_image(archive, tuple(saved.diff_ids))
    ref = f"head:5000/img@{image.digest}"
    return Item(name="img", info=saved.info, hash_tag="img:abc", archive=archive,
                pull=ref, oci=image), saved.diff_ids


@pytest.mark.parametrize(("has", "skipped", "blobs"), [
    (0, 0, [0, 1, 2]),  # nothing: every unique blob
    (1, 1, [1, 2]),  # the base: middle and top, middle once though named twice
    (2, 2, [2, 3]),  # base and middle: top, and middle again (its chain is new)
    (4, 4, []),  # every layer, other config: the config and manifest only
])
def test_plan_a_pull_counts_the_blobs_the_worker_lacks(tmp_path: Path, has: int,
                                                       skipped: int, blobs: list[int]) -> None:
    item, diff = _pulled_item(tmp_path)
    assert item.oci is not None
    state = WorkerState(store="classic")
    if has:
        state.add(_info(diff[:has]))
    plan = plan_item(state, item)
    assert plan.action == "pulled" and plan.pull == item.pull and plan.pieces == []
    assert plan.layers_skipped == skipped and plan.note == "from the registry"
    unique = {diff[i]: len(LAYERS[i]) for i in blobs}
    assert plan.pull_bytes == (sum(unique.values()) + len(item.oci.config)
                               + len(item.oci.manifest))


def test_plan_a_pull_needs_whole_chains(tmp_path: Path) -> None:
    item, diff = _pulled_item(tmp_path)
    assert item.oci is not None
    other = WorkerState(store="containerd")
    other.add(_info(["sha256:" + "9" * 64, diff[1], diff[2]]))  # same layers, other base
    plan = plan_item(other, item)
    assert (plan.action, plan.layers_skipped) == ("pulled", 0)
    assert plan.pull_bytes == (len(LAYERS[0]) + len(LAYERS[1]) + len(LAYERS[2])
                               + len(item.oci.config) + len(item.oci.manifest))


def test_plan_a_pull_of_an_image_the_worker_has_is_up_to_date(tmp_path: Path) -> None:
    item, _diff = _pulled_item(tmp_path)
    state = WorkerState(store="classic")
    state.add(item.info)
    plan = plan_item(state, item)
    assert plan.action == "up to date" and plan.layers_skipped == len(LAYERS)
    assert plan.pull == "" and plan.pull_bytes == 0 and plan.pieces == []


def test_without_a_registry_reference_the_archive_is_sent(tmp_path: Path) -> None:
    item, diff = _pulled_item(tmp_path)
    state = WorkerState(store="classic")
    state.add(_info(diff[:1]))
    for it in (replace(item, pull=""), replace(item, oci=None)):
        plan = plan_item(state, it)
        assert (plan.action, plan.layers_skipped, plan.pull) == ("partial", 1, "")
        assert plan.pieces and plan.pull_bytes == 0


def test_plan_a_pull_counts_compressed_blobs_as_the_registry_holds_them(
        tmp_path: Path) -> None:
    layers = [b"base" * 999, b"mid" * 99, b"top" * 9]
    _data, diff_ids = oci_like(tmp_path / "oci.tar", layers)
    archive = _read(tmp_path / "oci.tar")
    image = oci_image(archive, diff_ids)
    info = _info(diff_ids, env="A=1")
    item = Item(name="img", info=info, hash_tag="img:abc", archive=archive,
                pull=f"head:5000/img@{image.digest}", oci=image)
    state = WorkerState(store="classic")
    state.add(_info(diff_ids[:1], env="C=3"))
    plan = plan_item(state, item)
    gz = [m.size for _media, _digest, m in image.layers]
    assert gz[1] != len(layers[1])  # the blobs are gzip, not the layers' own bytes
    assert plan.layers_skipped == 1
    assert plan.pull_bytes == gz[1] + gz[2] + len(image.config) + len(image.manifest)


def _tar_files(data: bytes) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf.getmembers():
            f = tf.extractfile(m) if m.isfile() else None
            if f is not None:
                out[m.name] = f.read()
    return out


@pytest.mark.parametrize("kind", ["classic", "gzip"])
@pytest.mark.parametrize("skip", [0, 2])
def test_oci_image_is_the_manifest_the_oci_layout_carries(tmp_path: Path, kind: str,
                                                          skip: int) -> None:
    layers = [b"base" * 999, b"mid" * 99, b"top" * 9]
    if kind == "classic":
        diff_ids = tuple(save_like(tmp_path / "a.tar", layers).diff_ids)
        archive = _read(tmp_path / "a.tar")
    else:
        _data, diff_ids = oci_like(tmp_path / "a.tar", layers)
        archive = _read(tmp_path / "a.tar")
    image = oci_image(archive, diff_ids)
    assert image.digest == _digest(image.manifest)
    assert image.config == archive.config and image.config_digest == _digest(archive.config)
    files = _tar_files(b"".join(archive_chunks(oci_pieces(archive, diff_ids, skip,
                                                          "img:abc"))))
    [entry] = json.loads(files["index.json"])["manifests"]
    assert entry["digest"] == image.digest and entry["size"] == len(image.manifest)
    assert files["blobs/sha256/" + image.digest.removeprefix("sha256:")] == image.manifest
    assert files["blobs/sha256/" + image.config_digest.removeprefix("sha256:")] == image.config
    manifest = json.loads(image.manifest)
    assert manifest["mediaType"] == MANIFEST_MEDIA
    assert manifest["config"] == {"mediaType": "application/vnd.oci.image.config.v1+json",
                                  "digest": image.config_digest, "size": len(image.config)}
    assert [d["digest"] for d in manifest["layers"]] == [d for _m, d, _x in image.layers]
    for i, layer in enumerate(manifest["layers"]):
        blob = "blobs/sha256/" + layer["digest"].removeprefix("sha256:")
        if i < skip:
            assert blob not in files
            continue
        assert _digest(files[blob]) == layer["digest"] and len(files[blob]) == layer["size"]
    if kind == "classic":
        assert [d["digest"] for d in manifest["layers"]] == list(diff_ids)
        assert {d["mediaType"] for d in manifest["layers"]} == {
            "application/vnd.oci.image.layer.v1.tar"}
    else:
        assert {d["mediaType"] for d in manifest["layers"]} == {
            "application/vnd.oci.image.layer.v1.tar+gzip"}
        assert not set(diff_ids) & {d["digest"] for d in manifest["layers"]}


# -- credentials go to the registry alone ------------------------------------------------------


def test_an_upload_location_on_another_host_gets_the_layer_without_the_credentials(
        serve: Serve) -> None:
    """The registry (127.0.0.1, Basic auth) hands out an upload location on another host
    (127.0.0.2): the layer is sent there without the docker config's credentials, and,
    as that host's 201 proves nothing, the registry is asked whether it has the blob."""
    other = serve(lambda req: (201, {}, b""), "127.0.0.2")
    has = {"blob": False}

    def respond(req: Seen) -> Reply:
        if req.headers.get("authorization") != _basic("bob", "pw"):
            return 401, {"WWW-Authenticate": 'Basic realm="r"'}, b""
        if req.method == "POST" and req.path == REPO_PATH:
            return 202, {"Location": f"http://{other.address}/upload/u-1"}, b""
        if req.method == "HEAD":
            return (200 if has["blob"] else 404), {}, b""
        return 200, {}, b"{}"

    srv = serve(respond)
    client = srv.client(Credentials("bob", "pw"))
    client.ping()
    with pytest.raises(RegistryError, match=r"said it stored blob .* but does not have it"):
        client.upload_blob("team/img", _digest(BLOB), len(BLOB), _chunks())
    [put] = other.seen
    assert put.method == "PUT" and put.body == BLOB
    assert "authorization" not in put.headers  # the layer went; the credentials did not
    assert all(r.headers.get("authorization") == _basic("bob", "pw")
               for r in srv.seen[1:])  # after the first GET /v2/, which learns the scheme
    has["blob"] = True  # the other host was the registry's own storage front: fine
    assert client.upload_blob("team/img", _digest(BLOB), len(BLOB), _chunks()) is True
    assert all("authorization" not in r.headers for r in other.seen)


def test_a_token_service_on_another_host_is_asked_without_the_credentials(
        serve: Serve) -> None:
    tokens = serve(lambda req: (200, {}, b'{"token": "t"}'), "127.0.0.2")

    def respond(req: Seen) -> Reply:
        if req.headers.get("authorization") != "Bearer t":
            realm = f"http://{tokens.address}/token"
            return 401, {"WWW-Authenticate": f'Bearer realm="{realm}",service="svc"'}, b""
        return 200, {}, b""

    srv = serve(respond)
    client = srv.client(Credentials("bob", "pw"))
    client.ping()
    assert client.has_blob("team/img", DIGEST_OK) is True
    [token] = tokens.seen
    assert "authorization" not in token.headers  # anonymous there
    assert [r.headers.get("authorization") for r in srv.seen if r.method == "HEAD"] == [
        "Bearer t"]  # the token goes to the registry only


def test_a_blob_is_present_by_the_registrys_own_answer_never_another_hosts(
        serve: Serve) -> None:
    """A registry with its storage elsewhere redirects a HEAD of a blob it has: that is
    its answer (every layer is not sent again); the host it points to is never asked, so
    its answer can never skip an upload."""
    other = serve(lambda req: (200, {}, b""), "127.0.0.2")

    def respond(req: Seen) -> Reply:
        if req.method == "HEAD":
            if req.path.endswith(DIGEST_MISSING):
                return 404, {}, b""
            return 307, {"Location": f"http://{other.address}{req.path}"}, b""
        return _upload_registry()(req)

    srv = serve(respond)
    client = srv.client()
    assert client.has_blob("team/img", DIGEST_OK) is True
    assert client.has_blob("team/img", DIGEST_MISSING) is False
    assert other.seen == []


def test_https_to_http_is_refused_for_a_token_service_and_an_upload_location() -> None:
    client = RegistryClient("registry.example:5000", tls=True,
                            credentials=Credentials("bob", "pw"))
    client._scheme = "bearer"
    client._challenge = {"realm": "http://registry.example:5000/token", "service": "s"}
    with pytest.raises(RegistryError) as err:
        client.has_blob("team/img", DIGEST_OK)  # asks for a token first: refused before
    assert err.value.exit_code == 11
    assert ("is HTTPS, but names http://registry.example:5000/token as its token service"
            in err.value.message)
    with pytest.raises(RegistryError, match="as the place to upload a layer to"):
        client._not_downgraded("http://registry.example:5000/v2/x/blobs/uploads/u",
                               "the place to upload a layer to")
    assert client._not_downgraded("https://registry.example:5000/u", "x") == (
        "https://registry.example:5000/u")
    plain = RegistryClient("registry.example:5000", tls=False)
    assert plain._not_downgraded("http://elsewhere/u", "x") == "http://elsewhere/u"


def test_an_error_body_is_printed_without_terminal_escapes(serve: Serve) -> None:
    srv = serve(lambda req: (500, {}, b"\x1b]0;owned\x07\x1b[8mhidden\x1b[0m boom"))
    with pytest.raises(RegistryError) as err:
        srv.client().ping()
    assert "\x1b" not in err.value.message and "\x07" not in err.value.message
    assert "boom" in err.value.message


# -- replies read within bounds --------------------------------------------------------------


class RawServer:
    """A TCP server on 127.0.0.1 whose every connection ``behave(conn)`` serves by hand:
    replies no HTTP server library would send."""

    def __init__(self, behave: Callable[[socket.socket], None]) -> None:
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(8)
        self.stop = threading.Event()
        self.behave = behave
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.srv.getsockname()[1]}"

    def _accept(self) -> None:
        self.srv.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.srv.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                conn.recv(65536)  # the request (small: a GET)
                self.behave(conn)
            except OSError:  # the client gave up: as it should
                pass

    def close(self) -> None:
        self.stop.set()
        self.srv.close()


def _endless_error(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"x" * 65536
    for _ in range(10_000):  # 640 MB, unless the client stops reading (it must)
        conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))


def _never_answers(conn: socket.socket) -> None:
    time.sleep(30)


def _trickles(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 500 Slow\r\nContent-Length: 1000000\r\n\r\n")
    for _ in range(300):
        conn.sendall(b"x")
        time.sleep(0.1)


@pytest.mark.parametrize(("behave", "says"), [
    (_endless_error, "HTTP 500"),
    (_never_answers, "did not answer GET /v2/ within 1s"),
    (_trickles, "did not answer GET /v2/ within 1s"),
])
def test_a_reply_is_read_within_a_size_and_a_time_bound(
        behave: Callable[[socket.socket], None], says: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("imagebuild.registry.DEADLINE", 1.0)
    server = RawServer(behave)
    client = RegistryClient(server.address, tls=False)
    started = time.monotonic()
    try:
        with pytest.raises(RegistryError, match=says) as err:
            client.ping()
    finally:
        client.close()
        server.close()
    assert time.monotonic() - started < 15
    assert err.value.exit_code == 11 and len(err.value.message) < 1000
