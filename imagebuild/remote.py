"""The one process boundary: OpenSSH to the workers and backup hosts, git, and uv.

Commands are argument lists (never ``shell=True``); the remote command is a single
string built with ``shlex.join`` so the remote shell sees exactly the words we mean.
The user's ssh config, agent and known_hosts are respected, and host-key checking is
never weakened: we only add BatchMode (no prompts), a connect timeout and keepalives so
a dead worker fails instead of hanging. Every value that reaches an ssh command line
was validated when the spec loaded (user and host names cannot start with ``-``), and
the host is put after ``--`` so it can never be read as an option.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import RemoteError

CONNECT_TIMEOUT = 10
KEEPALIVE = ("-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3")
GIT_TIMEOUT = 10


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


def git_commit(root: Path) -> str | None:
    """The commit ``root`` is checked out at (``-dirty`` with local changes), or None when
    it is not a git repository or git is missing, slow or broken."""
    git = shutil.which("git")
    if git is None:
        return None

    def ask(*args: str) -> str | None:
        try:
            r = subprocess.run([git, "-C", str(root), *args], capture_output=True, text=True,
                               timeout=GIT_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = ask("rev-parse", "HEAD")
    if not commit:
        return None
    dirty = ask("status", "--porcelain")
    if dirty is None:
        return None
    return commit + ("-dirty" if dirty else "")


def git_show_head(path: Path) -> str | None:
    """The text of ``path`` as committed in HEAD of its repository, or None (not in git,
    not committed, git missing or slow)."""
    git = shutil.which("git")
    if git is None:
        return None
    try:
        r = subprocess.run([git, "-C", str(path.parent), "show", f"HEAD:./{path.name}"],
                           capture_output=True, timeout=GIT_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return _text(r.stdout) if r.returncode == 0 else None


def local(argv: list[str], timeout: float, cwd: Path | None = None) -> Completed:
    """Run a local tool (uv) with an argument list, never a shell; what happened, whatever
    its exit status. A missing program is a RemoteError naming it."""
    try:
        r = subprocess.run(argv, capture_output=True, timeout=timeout, check=False, cwd=cwd,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        return Completed(None, _text(exc.stdout), _text(exc.stderr))
    except FileNotFoundError:
        raise RemoteError(f"{argv[0]} is not installed",
                          hint="reinstall imagebuild (pip install -e .), which brings uv") from None
    return Completed(r.returncode, _text(r.stdout), _text(r.stderr))


# -- git: fetching the source of a wheel build ------------------------------------------------

GIT_FETCH_TIMEOUT = 3600  # a first clone of a large repository over a slow link


def _git(args: list[str], timeout: float, cwd: Path | None = None) -> Completed:
    """git with an argument list; never prompts (a fetch that needs credentials fails)."""
    git = shutil.which("git")
    if git is None:
        raise RemoteError("git is not installed", hint="install git (apt-get install git)")
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true",
           "LC_ALL": "C"}
    try:
        r = subprocess.run([git, *args], capture_output=True, timeout=timeout, check=False,
                           cwd=cwd, stdin=subprocess.DEVNULL, env=env)
    except subprocess.TimeoutExpired as exc:
        return Completed(None, _text(exc.stdout), _text(exc.stderr))
    return Completed(r.returncode, _text(r.stdout), _text(r.stderr))


def git_mirror(url: str, mirror: Path) -> Completed:
    """Bring the bare mirror ``mirror`` of ``url`` up to date: a ``git clone --mirror``
    the first time (into a temporary name, renamed when complete), a ``git fetch``
    afterwards. The URL comes after ``--``: it can never be read as an option."""
    if (mirror / "HEAD").is_file():
        return _git(["-C", str(mirror), "fetch", "--quiet", "--prune", "--tags", "origin"],
                    GIT_FETCH_TIMEOUT)
    mirror.parent.mkdir(parents=True, exist_ok=True)
    partial = mirror.with_name(mirror.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    done = _git(["clone", "--quiet", "--mirror", "--", url, str(partial)], GIT_FETCH_TIMEOUT)
    if done.code == 0:
        os.replace(partial, mirror)
    else:
        shutil.rmtree(partial, ignore_errors=True)
    return done


def git_has_commit(repo: Path, commit: str) -> bool:
    return _git(["-C", str(repo), "cat-file", "-e", f"{commit}^{{commit}}"], GIT_TIMEOUT
                ).code == 0


def git_checkout(mirror: Path, commit: str, dest: Path) -> Completed:
    """A working tree of ``commit`` at ``dest``, cloned from the local mirror (its objects
    hard-linked, not copied, and no alternates pointing back at the mirror)."""
    done = _git(["clone", "--quiet", "--no-checkout", "--", str(mirror), str(dest)],
                GIT_FETCH_TIMEOUT)
    if done.code != 0:
        return done
    return _git(["-C", str(dest), "-c", "advice.detachedHead=false", "checkout", "--quiet",
                 "--detach", commit], GIT_FETCH_TIMEOUT)


def git_apply(tree: Path, patch: Path) -> Completed:
    """Apply one patch file to a working tree (all of it or nothing)."""
    return _git(["-C", str(tree), "apply", "--whitespace=nowarn", "--", str(patch)],
                GIT_TIMEOUT * 6)


def git_commit_time(repo: Path, commit: str) -> int | None:
    """The committer time of ``commit`` (seconds since the epoch), or None."""
    done = _git(["-C", str(repo), "show", "-s", "--format=%ct", commit], GIT_TIMEOUT)
    text = done.stdout.strip()
    return int(text) if done.code == 0 and text.isdigit() else None


# -- the registry of distribute --via registry ---------------------------------------------


def credential_helper(helper: str, server: str) -> str | None:
    """``docker-credential-<helper> get`` for ``server`` (the name given on stdin, as the
    docker CLI does): its JSON reply, or None when it holds nothing for that server."""
    program = f"docker-credential-{helper}"
    try:
        r = subprocess.run([program, "get"], input=server.encode(), capture_output=True,
                           timeout=30, check=False)
    except FileNotFoundError:
        raise RemoteError(f"the docker config names the credential helper {program}, which "
                          f"is not installed", hint=f"install {program}, or docker login "
                          f"again without it") from None
    except subprocess.TimeoutExpired:
        raise RemoteError(f"{program} get did not answer within 30s") from None
    if r.returncode != 0:
        if b"credentials not found" in r.stdout + r.stderr:
            return None
        raise RemoteError(f"{program} get failed (exit {r.returncode}): "
                          f"{last_line(_text(r.stderr or r.stdout)) or 'no output'}")
    return _text(r.stdout)


def start_daemon(argv: list[str], log: Path) -> int:
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
