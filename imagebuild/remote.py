"""The one subprocess boundary: OpenSSH to the workers.

Commands are argument lists (never ``shell=True``); the remote command is a single
string built with ``shlex.join`` so the remote shell sees exactly the words we mean.
The user's ssh config, agent and known_hosts are respected, and host-key checking is
never weakened: we only add BatchMode (no prompts), a connect timeout and keepalives so
a dead worker fails instead of hanging.
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import RemoteError
from .spec import Cluster, Worker

CONNECT_TIMEOUT = 10
KEEPALIVE = ("-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3")


@dataclass(frozen=True)
class Target:
    """How to reach one worker with ssh."""

    name: str
    host: str
    user: str | None = None
    port: int | None = None
    identity: str | None = None
    config: str | None = None

    @classmethod
    def of(cls, cluster: Cluster, worker: Worker) -> Target:
        return cls(name=worker.name, host=worker.address, user=cluster.ssh_user,
                   port=cluster.ssh_port, identity=cluster.ssh_identity,
                   config=cluster.ssh_config)

    def argv(self, remote: list[str]) -> list[str]:
        argv = ["ssh"]
        if self.config:
            argv += ["-F", self.config]
        argv += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT}", *KEEPALIVE]
        if self.user:
            argv += ["-l", self.user]
        if self.port:
            argv += ["-p", str(self.port)]
        if self.identity:
            argv += ["-i", self.identity]
        argv += ["--", self.host, shlex.join(remote)]
        return argv


def explain(target: Target, code: int, stderr: str) -> str:
    """One line saying why an ssh command failed."""
    err = stderr.strip()
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in err:
        return (f"{target.name} ({target.host}): the host key does not match known_hosts; "
                f"refused (host-key checking stays on)")
    if "Host key verification failed" in err:
        return (f"{target.name} ({target.host}): host key verification failed; add the "
                f"worker's key to known_hosts (ssh-keyscan, checked by hand)")
    if "Permission denied" in err:
        return f"{target.name} ({target.host}): ssh authentication failed: {_last(err)}"
    if code == 255:
        return f"{target.name} ({target.host}): unreachable over ssh: {_last(err) or 'no answer'}"
    return f"{target.name}: remote command failed (exit {code}): {_last(err) or 'no output'}"


def _last(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def run(target: Target, remote: list[str], timeout: float = 120,
        stdin: bytes | None = None) -> str:
    """Run ``remote`` on the worker; return its stdout or raise RemoteError."""
    try:
        r = subprocess.run(target.argv(remote), input=stdin, capture_output=True,
                           timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise RemoteError(f"{target.name} ({target.host}): {shlex.join(remote)} did not "
                          f"finish within {timeout:.0f}s") from None
    except FileNotFoundError:
        raise RemoteError("ssh is not installed", hint="install openssh-client") from None
    if r.returncode != 0:
        raise RemoteError(explain(target, r.returncode, r.stderr.decode(errors="replace")))
    return r.stdout.decode(errors="replace")


def start(target: Target, remote: list[str], *, read: bool = False) -> subprocess.Popen[bytes]:
    """Start ``remote`` streaming: with a pipe on its stdin (to send it bytes), or with
    ``read`` a pipe on its stdout (to receive them). Its stderr is kept for messages."""
    try:
        return subprocess.Popen(target.argv(remote),
                                stdin=subprocess.DEVNULL if read else subprocess.PIPE,
                                stdout=subprocess.PIPE if read else subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise RemoteError("ssh is not installed", hint="install openssh-client") from None


@dataclass(frozen=True)
class RemoteDir:
    """A directory on another host, given as ``ssh://[user@]host[:port]/path``."""

    target: Target
    path: str

    @classmethod
    def parse(cls, url: str, ssh_config: str | None) -> RemoteDir:
        parts = urlsplit(url)
        if parts.scheme != "ssh" or not parts.hostname or not parts.path.startswith("/"):
            raise RemoteError(f"{url!r} is not ssh://[user@]host[:port]/absolute/path")
        target = Target(name=parts.hostname, host=parts.hostname, user=parts.username,
                        port=parts.port, config=ssh_config)
        return cls(target=target, path=parts.path.rstrip("/") or "/")

    def file(self, name: str) -> str:
        return f"{self.path}/{name}"

    def __str__(self) -> str:
        return f"ssh://{self.target.host}{self.path}"
