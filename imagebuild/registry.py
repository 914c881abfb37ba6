"""A client of a registry's HTTP API (the OCI distribution spec), with ``requests``.

What ``distribute --via registry`` needs and no more: ask whether a blob is there
(``HEAD``), mount one from another repository of the same registry, upload one in a
single streamed ``PUT`` (its bytes are ranges of the layer store's files, hashed as they
stream; the registry checks the digest too), and put a manifest. Credentials come from
the user's docker config (``docker login`` on this host): an ``auths`` entry, or a
credential helper. Both of the spec's schemes are answered: HTTP Basic, and the bearer
token a registry's ``WWW-Authenticate`` header sends us to fetch.

Every reply is checked before it is believed: a blob upload must come back ``201`` with
the digest we sent, a manifest with the digest of the bytes we put. Failures are
``RegistryError`` (exit 11) naming the registry, what was asked and what came back.
"""

from __future__ import annotations

import base64
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests

from .errors import RegistryError, RemoteError, printable
from .remote import last_line, local
from .untrusted import loads_json

CONNECT_TIMEOUT = 10
HELPER_TIMEOUT = 30
READ_TIMEOUT = 600  # a registry may take a while to commit a 10 GB blob
DEADLINE = 120.0  # a whole request and its reply (an upload: plus its size at MIN_RATE)
MIN_RATE = 1e6  # bytes/s: the slowest upload imagebuild waits for
BODY_CAP = 64 << 10  # of a reply's body, what is read (an error page, a token)
MANIFEST_MEDIA = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA = "application/vnd.oci.image.config.v1+json"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}\Z")
_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)


def docker_config_path() -> Path:
    """Where ``docker login`` keeps credentials: ``$DOCKER_CONFIG/config.json`` or
    ``~/.docker/config.json``."""
    base = os.environ.get("DOCKER_CONFIG")
    return (Path(base) if base else Path.home() / ".docker") / "config.json"


def docker_credentials(address: str, path: Path | None = None) -> Credentials | None:
    """The credentials the user's docker config holds for ``address`` (None: none).
    A credential helper (``credHelpers``, ``credsStore``) is asked through
    ``docker-credential-<helper> get``; an ``auths`` entry is decoded here."""
    path = path or docker_config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"cannot read the docker config {path}: {exc}") from None
    try:
        config = loads_json(text)
    except ValueError as exc:
        raise RegistryError(f"the docker config {path} is not JSON: {exc}",
                            hint="fix it, or run docker login again") from None
    if not isinstance(config, dict):
        raise RegistryError(f"the docker config {path} is not a JSON object")
    helpers = config.get("credHelpers") or {}
    helper = (helpers.get(address) if isinstance(helpers, dict) else None) or \
        config.get("credsStore")
    if isinstance(helper, str) and helper:
        return _from_helper(helper, address)
    auths = config.get("auths") or {}
    if not isinstance(auths, dict):
        raise RegistryError(f"the docker config {path}: 'auths' is not an object")
    for key in (address, f"https://{address}", f"http://{address}"):
        entry = auths.get(key)
        if entry is not None:
            return _from_entry(entry, path, key)
    return None


def _from_entry(entry: object, path: Path, key: str) -> Credentials | None:
    where = f"the docker config {path}, auths[{key!r}]"
    if not isinstance(entry, dict):
        raise RegistryError(f"{where} is not an object")
    user, password = entry.get("username"), entry.get("password")
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            user, _, password = base64.b64decode(auth, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise RegistryError(f"{where}: 'auth' is not base64 of user:password",
                                hint="run docker login again") from None
    if not user:
        return None
    if not isinstance(user, str) or not isinstance(password, str):
        raise RegistryError(f"{where}: username and password are not strings")
    return Credentials(user, password)


def _from_helper(helper: str, address: str) -> Credentials | None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", helper):
        raise RegistryError(f"the docker config names the credential helper {helper!r}, "
                            f"which is not a plain program name")
    reply = credential_helper(helper, address)
    if reply is None:
        return None
    try:
        data = loads_json(reply)
        user, secret = data["Username"], data["Secret"]
    except (ValueError, KeyError, TypeError):
        raise RegistryError(f"docker-credential-{helper} get did not reply with "
                            f"Username and Secret for {address}") from None
    if not isinstance(user, str) or not isinstance(secret, str):
        raise RegistryError(f"docker-credential-{helper}: Username or Secret is not a string")
    return Credentials(user, secret)


def credential_helper(helper: str, server: str) -> str | None:
    """``docker-credential-<helper> get`` for ``server`` (the name given on stdin, as the
    docker CLI does): its JSON reply, or None when it holds nothing for that server. A
    helper that is missing, silent or failing is the registry path's failure (exit 11)."""
    program = f"docker-credential-{helper}"
    try:
        done = local([program, "get"], HELPER_TIMEOUT, stdin=server.encode())
    except RemoteError:
        raise RegistryError(f"the docker config names the credential helper {program}, "
                            f"which is not installed",
                            hint=f"install {program}, or docker login again without it"
                            ) from None
    if done.code is None:
        raise RegistryError(f"{program} get did not answer within {HELPER_TIMEOUT}s",
                            hint="unlock the helper's keyring, or docker login again "
                                 "without it")
    if done.code != 0:
        if "credentials not found" in done.stdout + done.stderr:
            return None
        raise RegistryError(f"{program} get failed (exit {done.code}): "
                            f"{last_line(done.stderr or done.stdout) or 'no output'}")
    return done.stdout


class Body:
    """A streamed request body of known length: ``requests`` sends it with a
    Content-Length and writes each chunk as it comes (memory stays flat)."""

    def __init__(self, chunks: Iterable[bytes], length: int,
                 on_bytes: Callable[[int], None] | None = None) -> None:
        self.chunks = chunks
        self.length = length
        self.on_bytes = on_bytes

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            if self.on_bytes is not None:
                self.on_bytes(len(chunk))
            yield chunk


class RegistryClient:
    """One registry, reached at ``address`` over HTTPS (or HTTP when ``tls`` is off)."""

    def __init__(self, address: str, *, tls: bool = True,
                 credentials: Credentials | None = None) -> None:
        self.address = address
        self.base = f"{'https' if tls else 'http'}://{address}"
        self.credentials = credentials
        self.session = _new_session()
        self._bearer: dict[str, str] = {}  # scope -> token
        self._scheme = ""  # "", "basic" or "bearer", learnt from /v2/
        self._challenge: dict[str, str] = {}

    def close(self) -> None:
        self.session.close()

    # -- transport ---------------------------------------------------------------------------

    def _own(self, url: str) -> bool:
        """``url`` is the registry's own: its scheme, host and port. Credentials and
        tokens go there and nowhere else."""
        return _origin(url) == _origin(self.base)

    def _not_downgraded(self, url: str, what: str) -> str:
        """``url``, unless the registry is HTTPS and it is plain HTTP (refused: a token
        service or an upload location there would receive credentials or layers in
        clear text)."""
        if self.base.startswith("https://") and not url.startswith("https://"):
            raise RegistryError(
                f"the registry at {self.address} is HTTPS, but names {_clean(url)[:200]} "
                f"as {what}: imagebuild sends nothing there in clear text",
                hint="fix the registry's configuration (its token realm, or the upload "
                     "location it gives: http.host in distribution's config.yml)")
        return url

    def _send(self, method: str, url: str, what: str, scope: str = "",
              extra_time: float = 0.0, **kw: Any) -> Reply:
        headers = dict(kw.pop("headers", {}))
        if self._own(url):  # another host (an upload location elsewhere) gets neither
            if self._scheme == "bearer" and scope:
                headers["Authorization"] = f"Bearer {self._token(scope)}"
            elif self._scheme == "basic" and self.credentials is not None:
                kw["auth"] = (self.credentials.username, self.credentials.password)
        try:
            return self._exchange(method, url, what, DEADLINE + extra_time, headers=headers,
                                  allow_redirects=method == "GET", **kw)
        except requests.exceptions.SSLError as exc:
            raise RegistryError(
                f"the registry at {self.address}: TLS failed for {what}: {_short(exc)}",
                hint="give this host the registry's CA (/etc/ssl/certs, or REQUESTS_CA_BUNDLE),"
                     " or set registry.tls: false for a plain-HTTP registry") from None
        except requests.exceptions.ConnectionError as exc:
            raise RegistryError(
                f"the registry at {self.address} does not answer ({what}): {_short(exc)}",
                hint="start it (registry.start: true lets imagebuild start one on this "
                     "host), check registry.address, or distribute over ssh: "
                     "--via ssh") from None
        except requests.exceptions.RequestException as exc:
            raise RegistryError(f"the registry at {self.address}: {what} failed: "
                                f"{_short(exc)}") from None

    def _exchange(self, method: str, url: str, what: str, deadline: float,
                  **kw: Any) -> Reply:
        """One request and its reply, the body read up to ``BODY_CAP`` bytes (an error
        page, a token: never the whole of an endless one), all of it within ``deadline``
        seconds: a registry that accepts and never answers, or answers a byte at a time,
        is given up on (its connections closed) instead of holding the run."""
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                with self.session.request(method, url, stream=True,
                                          timeout=(CONNECT_TIMEOUT, READ_TIMEOUT), **kw) as r:
                    body = bytearray()
                    for chunk in r.iter_content(8192):
                        body += chunk[:BODY_CAP - len(body)]
                        if len(body) >= BODY_CAP:
                            break
                    box["reply"] = Reply(r.status_code, r.headers, r.url, bytes(body))
            except BaseException as exc:  # handed to the caller's thread
                box["error"] = exc

        worker = threading.Thread(target=run, daemon=True, name="registry-request")
        worker.start()
        worker.join(deadline)
        if worker.is_alive():  # left to its read timeout, on a session of its own
            self.session.close()
            self.session = _new_session()
            self._bearer.clear()
            raise RegistryError(f"the registry at {self.address} did not answer {what} "
                                f"within {deadline:.0f}s",
                                hint="check the registry (its logs, its disk), then run the "
                                     "command again")
        if "error" in box:
            raise box["error"]
        reply: Reply = box["reply"]
        return reply

    def _fail(self, what: str, r: Reply) -> RegistryError:
        detail = _clean(r.text[:300].strip())
        hint = None
        if r.status_code in (401, 403):
            hint = f"log in on this host: docker login {self.address}"
        elif r.status_code in (405, 503):
            hint = "the registry refuses writes (read-only, or in maintenance)"
        return RegistryError(f"the registry at {self.address}: {what}: HTTP {r.status_code}"
                             f"{': ' + detail if detail else ''}", hint=hint)

    def ping(self) -> None:
        """``GET /v2/``: the registry answers the API, and how it wants us to log in."""
        r = self._send("GET", f"{self.base}/v2/", "GET /v2/")
        if r.status_code == 200:
            return
        if r.status_code != 401:
            raise self._fail("GET /v2/ (is this a registry?)", r)
        challenge = r.headers.get("WWW-Authenticate", "")
        scheme = challenge.split(" ", 1)[0].lower()
        if scheme not in ("basic", "bearer"):
            raise RegistryError(f"the registry at {self.address} asks for an unknown "
                                f"authentication scheme: {challenge[:80]!r}")
        if self.credentials is None and scheme == "basic":
            raise RegistryError(f"the registry at {self.address} needs credentials and the "
                                f"docker config has none for it",
                                hint=f"docker login {self.address}")
        self._scheme = scheme
        self._challenge = dict(_CHALLENGE.findall(challenge))
        if scheme == "basic":  # check the credentials now, before any upload
            r = self._send("GET", f"{self.base}/v2/", "GET /v2/ with credentials")
            if r.status_code != 200:
                raise self._fail("GET /v2/ with the docker config's credentials", r)

    def _token(self, scope: str) -> str:
        if scope in self._bearer:
            return self._bearer[scope]
        realm = self._challenge.get("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise RegistryError(f"the registry at {self.address} names no token service")
        self._not_downgraded(realm, "its token service")
        params = [("scope", s) for s in scope.split()]
        if self._challenge.get("service"):
            params.append(("service", self._challenge["service"]))
        # the docker config's credentials are the registry's: a token service on another
        # host is asked without them (an anonymous token, for a registry that allows it)
        auth = ((self.credentials.username, self.credentials.password)
                if self.credentials is not None and self._own(realm) else None)
        try:
            r = self._exchange("GET", realm, f"a token for {scope}", DEADLINE, params=params,
                               auth=auth)
            data = r.json() if r.status_code == 200 else None
        except (requests.exceptions.RequestException, ValueError) as exc:
            raise RegistryError(f"the token service {realm} of {self.address} failed: "
                                f"{_short(exc)}") from None
        if data is None:
            raise self._fail(f"a token for {scope} from {realm}", r)
        token = data.get("token") or data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"the token service {realm} of {self.address} replied "
                                f"without a token")
        self._bearer[scope] = token
        return token

    # -- blobs and manifests -----------------------------------------------------------------

    def has_blob(self, repo: str, digest: str) -> bool:
        r = self._send("HEAD", f"{self.base}/v2/{repo}/blobs/{digest}",
                       f"HEAD {repo} blob {digest[:19]}", f"repository:{repo}:pull")
        # the registry's own answer only: a registry whose storage serves blobs elsewhere
        # (S3, GCS) redirects there for a blob it has; another host is never asked
        if r.status_code == 200 or (r.status_code in (301, 302, 303, 307, 308)
                                    and r.headers.get("Location")):
            return True
        if r.status_code == 404:
            return False
        raise self._fail(f"HEAD {repo} blob {digest[:19]}", r)

    def upload_blob(self, repo: str, digest: str, size: int, chunks: Iterable[bytes],
                    mount_from: str = "", on_bytes: Callable[[int], None] | None = None
                    ) -> bool:
        """Put blob ``digest`` into ``repo``: mounted from ``mount_from`` when that
        repository of the registry has it (returns False: nothing sent), else sent
        whole in one streamed PUT (returns True)."""
        scope = f"repository:{repo}:pull,push"
        url = f"{self.base}/v2/{repo}/blobs/uploads/"
        params = {"mount": digest, "from": mount_from} if mount_from else None
        if mount_from:
            scope += f" repository:{mount_from}:pull"
        r = self._send("POST", url, f"POST {repo} upload", scope, params=params)
        if r.status_code == 201 and mount_from:
            return False
        if r.status_code != 202 or not r.headers.get("Location"):
            raise self._fail(f"starting an upload into {repo}", r)
        location = self._not_downgraded(urljoin(url, r.headers["Location"]),
                                        "the place to upload a layer to")
        r = self._send("PUT", location, f"PUT {repo} blob {digest[:19]}", scope,
                       size / MIN_RATE, params={"digest": digest},
                       headers={"Content-Type": "application/octet-stream"},
                       data=Body(chunks, size, on_bytes))
        if r.status_code != 201:
            raise self._fail(f"uploading blob {digest[:19]} ({size / 1e6:,.1f} MB) into "
                             f"{repo}", r)
        said = r.headers.get("Docker-Content-Digest")
        if said is not None and said != digest:
            raise RegistryError(f"the registry at {self.address} stored blob {digest[:19]} "
                                f"as {_clean(said)[:19]}")
        if (said is None or not self._own(r.url)) and not self.has_blob(repo, digest):
            # the 201 named no digest, or came from another host: the registry must have it
            raise RegistryError(f"the registry at {self.address} said it stored blob "
                                f"{digest[:19]} into {repo}, but does not have it",
                                hint="the upload went elsewhere: check the registry's "
                                     "http.host (the upload location it gives)")
        return True

    def put_manifest(self, repo: str, tag: str, manifest: bytes, digest: str,
                     media_type: str = MANIFEST_MEDIA) -> None:
        """Put ``manifest`` (an image manifest of ``media_type`` whose sha256 is
        ``digest``) under ``repo:tag``."""
        r = self._send("PUT", f"{self.base}/v2/{repo}/manifests/{tag}",
                       f"PUT {repo}:{tag} manifest", f"repository:{repo}:pull,push",
                       headers={"Content-Type": media_type}, data=manifest)
        if r.status_code != 201:
            raise self._fail(f"putting the manifest of {repo}:{tag}", r)
        said = r.headers.get("Docker-Content-Digest", digest)
        if said != digest or not _DIGEST.match(said):
            raise RegistryError(f"the registry at {self.address} stored the manifest of "
                                f"{repo}:{tag} as {said[:19]}, not {digest[:19]}")


@dataclass(frozen=True)
class Reply:
    """A registry's reply: its status, headers, final URL and (at most ``BODY_CAP`` bytes
    of) its body."""

    status_code: int
    headers: Mapping[str, str]
    url: str
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return loads_json(self.body)


def _new_session() -> requests.Session:
    session = requests.Session()
    session.headers["User-Agent"] = "imagebuild"
    return session


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    default = {"https": 443, "http": 80}.get(parts.scheme)
    return parts.scheme, (parts.hostname or ""), port if port is not None else default


def _clean(text: str) -> str:
    """Remote-provided text on one line, without control characters, to print."""
    return printable(text.replace("\n", " "))


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) < 200 else text[:200] + "..."
