"""The one process boundary: running programs, locally (uv, git, credential helpers, a
registry started detached) and over OpenSSH (the workers and backup hosts). What to run
is decided by its callers (git.py, resolve.py, registry.py, publish.py, the ssh engine
and store); this module only runs it, with argument lists and timeouts.

Commands are argument lists (never ``shell=True``); the remote command is a single
string built with ``shlex.join`` so the remote shell sees exactly the words we mean.
The user's ssh config, agent and known_hosts are respected, and host-key checking is
never weakened: we only add BatchMode (no prompts), a connect timeout and keepalives so
a dead worker fails instead of hanging, and connection sharing (OpenSSH's ControlMaster):
the first command to a host opens a connection that the next ones of the same run reuse
(a backup to a remote store makes hundreds of calls: each would otherwise pay a new
key exchange, about 0.2 s on a LAN). The control sockets live in a private directory of
this run (0700), so one run never rides on another's connection; the shared connections
are closed when the run exits. Every value that reaches an ssh command line
was validated when the spec loaded (user and host names cannot start with ``-``), and
the host is put after ``--`` so it can never be read as an option.
"""

from __future__ import annotations

import atexit
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import RemoteError

CONNECT_TIMEOUT = 10
KEEPALIVE = ("-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3")
MUX_PERSIST = 30  # seconds a shared connection outlives its last command
MUX_OFF = "IMAGEBUILD_SSH_MULTIPLEX"  # =0: a connection per command, as before
_MAX_SOCKET_PATH = 100  # a unix socket's path is at most 107 bytes on Linux

_mux_lock = threading.Lock()
_mux_dir: list[Path] = []  # this run's control socket directory, once made


def _control_dir() -> Path | None:
    """This run's private directory for ssh control sockets (None: sharing is off, or
    no short private path could be made)."""
    if os.environ.get(MUX_OFF) == "0":
        return None
    with _mux_lock:
        if not _mux_dir:
            try:
                path = Path(tempfile.mkdtemp(prefix="imagebuild-ssh-", dir="/tmp"))
            except OSError:
                return None
            _mux_dir.append(path)
            atexit.register(_close_shared, path)
        path = _mux_dir[0]
    return path if len(str(path)) + 41 <= _MAX_SOCKET_PATH else None


def _close_shared(path: Path) -> None:
    """Close this run's shared connections (each master exits at once instead of
    lingering for MUX_PERSIST seconds), then remove their sockets' directory."""
    for sock in path.iterdir() if path.is_dir() else ():
        try:
            subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "--", "imagebuild"],
                           capture_output=True, timeout=5, check=False)
        except (OSError, subprocess.TimeoutExpired):
            pass
    shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class Target:
    """How to reach one host with ssh."""

    name: str
    host: str
    user: str | None = None
    port: int | None = None
    identity: str | None = None
    config: str | None = None

    def argv(self, remote: list[str]) -> list[str]:
        argv = ["ssh"]
        if self.config:
            argv += ["-F", self.config]
        argv += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT}", *KEEPALIVE]
        control = _control_dir()
        if control is not None:
            argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={control}/%C",
                     "-o", f"ControlPersist={MUX_PERSIST}"]
        if self.user:
            argv += ["-l", self.user]
        if self.port:
            argv += ["-p", str(self.port)]
        if self.identity:
            argv += ["-i", self.identity]
        argv += ["--", self.host, shlex.join(remote)]
        return argv

    def __str__(self) -> str:
        return f"{self.name} ({self.host})" if self.name != self.host else self.host


def explain(target: Target, code: int, stderr: str) -> str:
    """One line saying why an ssh command failed."""
    err = stderr.strip()
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in err:
        return (f"{target}: the host key does not match known_hosts; refused (host-key "
                f"checking stays on)")
    if "Host key verification failed" in err:
        return (f"{target}: host key verification failed; add the host's key to "
                f"known_hosts (ssh-keyscan, checked by hand)")
    if "Permission denied" in err:
        return f"{target}: ssh authentication failed: {last_line(err)}"
    if code == 255:
        return f"{target}: unreachable over ssh: {last_line(err) or 'no answer'}"
    return f"{target.name}: remote command failed (exit {code}): {last_line(err) or 'no output'}"


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


@dataclass(frozen=True)
class Completed:
    code: int | None  # None: killed at the timeout
    stdout: str
    stderr: str

    @property
    def timed_out(self) -> bool:
        return self.code is None


def call(target: Target, remote: list[str], timeout: float = 120,
         stdin: bytes | None = None) -> Completed:
    """Run ``remote`` on the host and return what happened, whatever its exit status."""
    try:
        r = subprocess.run(target.argv(remote), input=stdin, capture_output=True,
                           timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        return Completed(None, _text(exc.stdout), _text(exc.stderr))
    except FileNotFoundError:
        raise RemoteError("ssh is not installed", hint="install openssh-client") from None
    return Completed(r.returncode, _text(r.stdout), _text(r.stderr))


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


def run(target: Target, remote: list[str], timeout: float = 120,
        stdin: bytes | None = None) -> str:
    """Run ``remote`` on the host; return its stdout or raise RemoteError."""
    r = call(target, remote, timeout, stdin)
    if r.code is None:
        raise RemoteError(f"{target}: {shlex.join(remote)} did not finish within "
                          f"{timeout:.0f}s")
    if r.code != 0:
        raise RemoteError(explain(target, r.code, r.stderr))
    return r.stdout


Process = subprocess.Popen[bytes]


def start(target: Target, remote: list[str], *, read: bool = False) -> Process:
    """Start ``remote`` streaming: with a pipe on its stdin (to send it bytes) and on its
    stdout (a few lines of reply), or with ``read`` a pipe on its stdout only (to receive
    bytes). Its stderr is kept for messages."""
    try:
        return subprocess.Popen(target.argv(remote),
                                stdin=subprocess.DEVNULL if read else subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise RemoteError("ssh is not installed", hint="install openssh-client") from None


@contextmanager
def reading(target: Target, remote: list[str]) -> Iterator[Process]:
    """``remote`` started with a pipe on its stdout, for the caller to read; if the
    reading stops early (an error, Ctrl-C, a consumer that went away) the command is
    killed and reaped. Call ``finish`` after a complete read."""
    proc = start(target, remote, read=True)
    try:
        yield proc
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def finish(proc: Process) -> Completed:
    """Close a started command's stdin (if any), wait for it, and collect its output."""
    out, err = proc.communicate()  # closes stdin first; a broken pipe there is ignored
    return Completed(proc.returncode, _text(out), _text(err))


def local(argv: list[str], timeout: float, cwd: Path | None = None, *,
          env: dict[str, str] | None = None, stdin: bytes | None = None,
          missing: str = "reinstall imagebuild (pip install -e .), which brings uv",
          no_tty: bool = False, idle: float | None = None) -> Completed:
    """Run a local program (uv, git, a credential helper) with an argument list, never a
    shell, ``stdin`` as its input (none: /dev/null); what happened, whatever its exit
    status (``code`` None: it ran out of ``timeout``, or of ``idle``: seconds without a
    byte of output). ``no_tty``: in a session of its own, without the terminal, so that
    nothing it starts (ssh asking about a host key) can prompt there. A missing program
    is a RemoteError naming it, with ``missing`` as the hint."""
    if idle is not None:
        return _watched(argv, timeout, idle, cwd, env, no_tty, missing)
    try:
        r = subprocess.run(argv, capture_output=True, timeout=timeout, check=False, cwd=cwd,
                           env=env, input=stdin, start_new_session=no_tty,
                           stdin=subprocess.DEVNULL if stdin is None else None)
    except subprocess.TimeoutExpired as exc:
        return Completed(None, _text(exc.stdout), _text(exc.stderr))
    except FileNotFoundError:
        raise RemoteError(f"{argv[0]} is not installed", hint=missing) from None
    return Completed(r.returncode, _text(r.stdout), _text(r.stderr))


def _watched(argv: list[str], timeout: float, idle: float, cwd: Path | None,
             env: dict[str, str] | None, no_tty: bool, missing: str) -> Completed:
    """``local`` for a program that reports progress as it works (git --progress): killed,
    with what it started, when it prints nothing for ``idle`` seconds (a server that
    accepts and never answers) or runs past ``timeout``."""
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=cwd, env=env,
                                start_new_session=no_tty)
    except FileNotFoundError:
        raise RemoteError(f"{argv[0]} is not installed", hint=missing) from None
    started = last = time.monotonic()
    out: dict[str, list[bytes]] = {"stdout": [], "stderr": []}

    def drain(name: str) -> None:
        nonlocal last
        stream = getattr(proc, name)
        while chunk := stream.read1(65536):
            out[name].append(chunk)
            last = time.monotonic()

    readers = [threading.Thread(target=drain, args=(n,), daemon=True) for n in out]
    for t in readers:
        t.start()
    why = ""  # set when it was stopped
    while proc.poll() is None:
        now = time.monotonic()
        if now - started > timeout or now - last > idle:
            why = (f"\nimagebuild: stopped after {now - last:.0f}s without output"
                   if now - last > idle else f"\nimagebuild: stopped after {timeout:.0f}s")
            try:
                if no_tty:
                    os.killpg(proc.pid, 9)  # git and the ssh or helper it started
                else:
                    proc.kill()
            except ProcessLookupError:
                pass
            proc.wait()
            break
        time.sleep(min(0.2, idle / 10))
    for t in readers:
        t.join(timeout=5)
    stderr = _text(b"".join(out["stderr"])) + why
    return Completed(None if why else proc.returncode, _text(b"".join(out["stdout"])), stderr)


# -- long-running programs ------------------------------------------------------------------


def start_detached(argv: list[str], log: Path) -> int:
    """Start a long-running program (a registry) detached from this process: its own
    session, stdin closed, stdout and stderr appended to ``log``. Returns its pid."""
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with log.open("ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    start_new_session=True)
    except FileNotFoundError:
        raise RemoteError(f"{argv[0]} is not installed") from None
    return proc.pid


def process_alive(pid: int, marker: str) -> bool:
    """Whether ``pid`` runs and its command line contains ``marker`` (a pid file's
    process, not another that reused the number)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return marker.encode() in cmdline
