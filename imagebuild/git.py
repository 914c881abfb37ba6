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
GIT_IDLE_TIMEOUT = 120.0  # a fetch that prints no progress for this long has stalled


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


def _git(args: list[str], timeout: float, cwd: Path | None = None,
         idle: float | None = None) -> Completed:
    """git with an argument list; never prompts (a fetch that needs credentials fails,
    and git runs without the terminal, so ssh cannot ask about a host key there either:
    an unknown host fails, host-key checking stays on). ``idle``: stop it after that
    many seconds without output (with --progress, a transfer prints as it goes)."""
    git = shutil.which("git")
    if git is None:
        raise RemoteError("git is not installed", hint="install git (apt-get install git)")
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true",
           "LC_ALL": "C"}
    return local([git, *args], timeout, cwd, env=env, no_tty=True, idle=idle)


def git_mirror(url: str, mirror: Path) -> Completed:
    """Bring the bare mirror ``mirror`` of ``url`` up to date: a ``git clone --mirror``
    the first time (into a temporary name, renamed when complete), a ``git fetch``
    afterwards. The URL comes after ``--``: it can never be read as an option."""
    if (mirror / "HEAD").is_file():
        return _git(["-C", str(mirror), "fetch", "--progress", "--prune", "--tags",
                     "origin"], GIT_FETCH_TIMEOUT, idle=GIT_IDLE_TIMEOUT)
    mirror.parent.mkdir(parents=True, exist_ok=True)
    partial = mirror.with_name(mirror.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    done = _git(["clone", "--progress", "--mirror", "--", url, str(partial)],
                GIT_FETCH_TIMEOUT, idle=GIT_IDLE_TIMEOUT)
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


def git_rev_parse(repo: Path, ref: str) -> str | None:
    """The full commit ``ref`` (a branch, a tag, a commit) names in ``repo``, or None.
    ``ref`` never starts with ``-`` (its caller checks it) and goes after
    ``--end-of-options``."""
    done = _git(["-C", str(repo), "rev-parse", "--verify", "--quiet", "--end-of-options",
                 f"{ref}^{{commit}}"], GIT_TIMEOUT)
    text = done.stdout.strip()
    return text if done.code == 0 and len(text) in (40, 64) else None


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
    failed: str = ""  # "fetch", "commit", "time", "checkout", "submodule" or "patch"
    patch: Path | None = None  # the patch that does not apply
    output: Completed | None = None
    submodules: tuple[str, ...] = ()  # "path commit" of each submodule checked out
    why: str = ""  # what went wrong with a submodule


def _ensure_commit(url: str, mirror: Path, commit: str, on_fetch: Callable[[str], None]
                   ) -> tuple[bool, Completed | None, bool]:
    """(fetched, the failed fetch's output, the mirror has the commit): the mirror is
    fetched only when it lacks the commit."""
    if (mirror / "HEAD").is_file() and git_has_commit(mirror, commit):
        return False, None, True
    on_fetch(url)
    done = git_mirror(url, mirror)
    if done.code != 0:
        return True, done, False
    return True, None, git_has_commit(mirror, commit)


def checkout_source(url: str, mirror: Path, commit: str, patches: Sequence[Path],
                    dest: Path, on_fetch: Callable[[str], None] = lambda url: None,
                    mirror_for: Callable[[str], Path] | None = None) -> Source:
    """A working tree of ``commit`` of ``url`` at ``dest`` with ``patches`` applied in
    order: the bare mirror at ``mirror`` fetched first only when it lacks the commit
    (``on_fetch`` is told the URL before a fetch). With ``mirror_for`` (a submodule's URL
    -> its mirror), the submodules are checked out recursively at the commits the
    source records, each from a mirror of its own, before the patches. One call for a
    wheel build's whole source."""
    fetched, failed_fetch, has = _ensure_commit(url, mirror, commit, on_fetch)
    if failed_fetch is not None:
        return Source(fetched, failed="fetch", output=failed_fetch)
    if not has:
        return Source(fetched, failed="commit")
    epoch = git_commit_time(mirror, commit)
    if epoch is None:
        return Source(fetched, failed="time")
    done = git_checkout(mirror, commit, dest)
    if done.code != 0:
        return Source(fetched, epoch, failed="checkout", output=done)
    subs: list[str] = []
    if mirror_for is not None:
        try:
            fetched = _submodules(dest, dest, url, mirror_for, on_fetch, subs, 0) or fetched
        except _SubmoduleFailed as exc:
            return Source(fetched, epoch, failed="submodule", output=exc.output,
                          submodules=tuple(subs), why=exc.why)
    applied: list[str] = []
    for patch in patches:
        done = git_apply(dest, patch)
        if done.code != 0:
            return Source(fetched, epoch, tuple(applied), failed="patch", patch=patch,
                          output=done, submodules=tuple(subs))
        applied.append(patch.name)
    return Source(fetched, epoch, tuple(applied), submodules=tuple(subs))


# -- submodules --------------------------------------------------------------------------------

MAX_SUBMODULE_DEPTH = 8
GITLINK = "160000"


class _SubmoduleFailed(Exception):
    def __init__(self, why: str, output: Completed | None = None) -> None:
        super().__init__(why)
        self.why, self.output = why, output


def submodule_url(base: str, url: str) -> str:
    """A submodule's URL as git resolves it: ``./x`` and ``../x`` are relative to the
    superproject's URL (as if it were a directory), anything else is as written."""
    if not url.startswith(("./", "../")):
        return url
    out = base.rstrip("/")
    rest = url
    while True:
        if rest.startswith("./"):
            rest = rest[2:]
        elif rest.startswith("../"):
            rest = rest[3:]
            cut = max(out.rfind("/"), out.rfind(":"))
            if cut <= 0 or out[cut - 1:cut + 1] == "//" or out[cut:cut + 3] == "://":
                raise _SubmoduleFailed(f"{url!r} goes above the root of {base!r}")
            out = out[:cut + 1] if out[cut] == ":" else out[:cut]
        else:
            break
    sep = "" if out.endswith(":") else "/"
    return f"{out}{sep}{rest}"


def _submodules(root: Path, tree: Path, url: str, mirror_for: Callable[[str], Path],
                on_fetch: Callable[[str], None], done: list[str], depth: int) -> bool:
    """Check out the submodules of the working tree ``tree`` (of ``url``) at the commits
    its HEAD records, each cloned from its own mirror, then theirs. Returns whether any
    mirror was fetched."""
    listed = _git(["-C", str(tree), "ls-tree", "-r", "-z", "HEAD"], GIT_TIMEOUT * 6)
    if listed.code != 0:
        raise _SubmoduleFailed(f"cannot list the tree of {tree}", listed)
    links = {}
    for entry in listed.stdout.split("\0"):
        meta, tab, path = entry.partition("\t")
        parts = meta.split()
        if tab and len(parts) == 3 and parts[0] == GITLINK:
            links[path] = parts[2]
    if not links:
        return False
    if depth >= MAX_SUBMODULE_DEPTH:
        raise _SubmoduleFailed(f"submodules nest deeper than {MAX_SUBMODULE_DEPTH} levels")
    urls = _gitmodules(tree)
    fetched = False
    for path, commit in sorted(links.items()):
        where = tree / path
        shown = str(where.relative_to(root))
        sub = urls.get(path)
        if sub is None:
            raise _SubmoduleFailed(f"{shown}: a submodule with no URL in .gitmodules")
        if (Path(path).is_absolute() or ".." in Path(path).parts
                or not where.resolve().is_relative_to(tree.resolve())
                or where.is_symlink() or not where.is_dir() or any(where.iterdir())):
            raise _SubmoduleFailed(f"{shown}: not an empty directory inside the source")
        sub_url = submodule_url(url, sub)
        if sub_url.startswith("-") or "::" in sub_url.split("/", 1)[0]:
            raise _SubmoduleFailed(f"{shown}: {sub_url!r} is not a URL git may fetch "
                                   f"for a submodule")
        mirror = mirror_for(sub_url)
        got, failed_fetch, has = _ensure_commit(sub_url, mirror, commit, on_fetch)
        fetched = fetched or got
        if failed_fetch is not None:
            raise _SubmoduleFailed(f"{shown}: fetching {sub_url} failed", failed_fetch)
        if not has:
            raise _SubmoduleFailed(f"{shown}: commit {commit} is not in {sub_url}")
        out = git_checkout(mirror, commit, where)
        if out.code != 0:
            raise _SubmoduleFailed(f"{shown}: cannot check out {commit}", out)
        done.append(f"{shown} {commit}")
        fetched = _submodules(root, where, sub_url, mirror_for, on_fetch, done,
                              depth + 1) or fetched
    return fetched


def _gitmodules(tree: Path) -> dict[str, str]:
    """path -> URL of each submodule .gitmodules declares (read by git itself)."""
    if not (tree / ".gitmodules").is_file():
        return {}
    done = _git(["-C", str(tree), "config", "--file", ".gitmodules", "--null",
                 "--get-regexp", r"^submodule\..*\.(path|url)$"], GIT_TIMEOUT)
    if done.code not in (0, 1):  # 1: no match
        raise _SubmoduleFailed(f"cannot read {tree / '.gitmodules'}", done)
    paths: dict[str, str] = {}
    urls: dict[str, str] = {}
    for entry in filter(None, done.stdout.split("\0")):
        key, _nl, value = entry.partition("\n")
        name, _dot, kind = key.removeprefix("submodule.").rpartition(".")
        (paths if kind == "path" else urls)[name] = value
    return {p: urls[n] for n, p in paths.items() if n in urls}
