"""git, for what imagebuild asks of it: the commit a spec is checked out at (a label),
a lock file as last committed (``plan``'s lock changes), and the source of a wheel built
from source (a bare mirror, a checkout of one commit, patches). Run through remote.py,
with argument lists; a URL or path always comes after ``--``, and git never prompts.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import RemoteError
from .remote import Completed, local

GIT_TIMEOUT = 10
GIT_FETCH_TIMEOUT = 3600  # a first clone of a large repository over a slow link


def _quiet(args: list[str]) -> str | None:
    """git's stdout, or None when git is missing, slow, fails or is not in a repository:
    for the optional questions (a label, what was committed)."""
    git = shutil.which("git")
    if git is None:
        return None
    try:
        done = local([git, *args], GIT_TIMEOUT)
    except RemoteError:
        return None
    return done.stdout if done.code == 0 else None


def git_commit(root: Path) -> str | None:
    """The commit ``root`` is checked out at (``-dirty`` with local changes), or None when
    it is not a git repository or git is missing, slow or broken."""
    commit = (_quiet(["-C", str(root), "rev-parse", "HEAD"]) or "").strip()
    if not commit:
        return None
    dirty = _quiet(["-C", str(root), "status", "--porcelain"])
    if dirty is None:
        return None
    return commit + ("-dirty" if dirty.strip() else "")


def git_show_head(path: Path) -> str | None:
    """The text of ``path`` as committed in HEAD of its repository, or None (not in git,
    not committed, git missing or slow)."""
    return _quiet(["-C", str(path.parent), "show", f"HEAD:./{path.name}"])


def _git(args: list[str], timeout: float, cwd: Path | None = None) -> Completed:
    """git with an argument list; never prompts (a fetch that needs credentials fails)."""
    git = shutil.which("git")
    if git is None:
        raise RemoteError("git is not installed", hint="install git (apt-get install git)")
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true",
           "LC_ALL": "C"}
    return local([git, *args], timeout, cwd, env=env)


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


# -- the source of a wheel build ---------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """What ``checkout_source`` did: the commit's tree at ``dest`` with every patch
    applied, or where it stopped (``failed``) with the failing git command's output."""

    fetched: bool  # the mirror was fetched (it did not hold the commit yet)
    epoch: int | None = None  # the commit's committer time
    applied: tuple[str, ...] = ()  # patch file names, in order
    failed: str = ""  # "fetch", "commit", "time", "checkout" or "patch"; "": done
    patch: Path | None = None  # the patch that does not apply
    output: Completed | None = None


def checkout_source(url: str, mirror: Path, commit: str, patches: Sequence[Path],
                    dest: Path, on_fetch: Callable[[], None] = lambda: None) -> Source:
    """A working tree of ``commit`` of ``url`` at ``dest`` with ``patches`` applied in
    order: the bare mirror at ``mirror`` fetched first only when it lacks the commit
    (``on_fetch`` is told before a fetch). One call for a wheel build's whole source."""
    fetched = False
    if not ((mirror / "HEAD").is_file() and git_has_commit(mirror, commit)):
        on_fetch()
        fetched = True
        done = git_mirror(url, mirror)
        if done.code != 0:
            return Source(fetched, failed="fetch", output=done)
        if not git_has_commit(mirror, commit):
            return Source(fetched, failed="commit")
    epoch = git_commit_time(mirror, commit)
    if epoch is None:
        return Source(fetched, failed="time")
    done = git_checkout(mirror, commit, dest)
    if done.code != 0:
        return Source(fetched, epoch, failed="checkout", output=done)
    applied: list[str] = []
    for patch in patches:
        done = git_apply(dest, patch)
        if done.code != 0:
            return Source(fetched, epoch, tuple(applied), failed="patch", patch=patch,
                          output=done)
        applied.append(patch.name)
    return Source(fetched, epoch, tuple(applied))
