"""git as the wheel builder runs it, at its edges: a server that never answers, and a
terminal ssh could prompt on. Real git, local stand-ins for the servers."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagebuild import git

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server that accepts connections and never answers (a stalled git daemon)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                held.append(conn)
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield int(srv.getsockname()[1])
    stop.set()
    t.join()
    for c in held:
        c.close()
    srv.close()


def test_a_fetch_from_a_server_that_never_answers_stops_when_it_stalls(
        silent_server: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(git, "GIT_IDLE_TIMEOUT", 1.5)
    started = time.monotonic()
    done = git.git_mirror(f"git://127.0.0.1:{silent_server}/vllm.git", tmp_path / "mirror")
    took = time.monotonic() - started
    assert done.code is None and "stopped after" in done.stderr and "without output" in done.stderr
    assert took < 30  # not the hour a first clone may take
    assert not (tmp_path / "mirror").exists()
    assert not (tmp_path / "mirror.partial").exists()  # nothing half-written stays


def test_git_never_gives_ssh_a_terminal_to_ask_about_a_host_key(tmp_path: Path) -> None:
    """Run under a real terminal (script(1)); the ssh git starts for an ssh:// URL is a
    stand-in that records whether it could open /dev/tty, where ssh would ask 'Are you
    sure you want to continue connecting?'."""
    script = shutil.which("script")  # util-linux, on every Debian
    assert script is not None
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "tty"
    fake = bin_dir / "ssh"
    fake.write_text("#!/bin/sh\n"
                    f"if ( : </dev/tty ) 2>/dev/null; then echo yes > {marker}; "
                    f"else echo no > {marker}; fi\nexit 255\n")
    fake.chmod(0o755)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); from imagebuild import git; "
             "print(git._git(['ls-remote', 'ssh://unknown.invalid/x.git'], 30).code)")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("GIT_SSH_COMMAND", None)
    env.pop("GIT_SSH", None)
    cmd = shlex.join([sys.executable, "-c", probe, str(REPO)])
    # first show the stand-in sees the terminal when run on it directly
    r = subprocess.run([script, "-qec", str(fake), "/dev/null"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert marker.read_text().strip() == "yes", r.stdout + r.stderr
    marker.unlink()
    r = subprocess.run([script, "-qec", cmd, "/dev/null"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert marker.read_text().strip() == "no", r.stdout + r.stderr
