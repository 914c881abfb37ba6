"""The wheel-build workflow against the in-memory engine: a real git repository in
tmp (git is a local tool, no network), a fake builder that makes a wheel from the tree
it is given. Reuse without a job, what the job receives, failures that record nothing."""

from __future__ import annotations

import os
import subprocess
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from imagebuild import output, wheelops
from imagebuild.cli import main
from imagebuild.engine import Job
from imagebuild.errors import ImageNotFound, WheelBuildFailed
from imagebuild.git import submodule_url
from imagebuild.lock import BUILT_PREFIX, Lock, LockedWheel
from imagebuild.progress import Quiet
from imagebuild.spec import BUILD_CCACHE, BUILD_OUT, BUILD_SRC, Spec, load_spec
from imagebuild.wheelbuild import CCACHE_VOLUME, mirror_path
from imagebuild.wheelplan import wheel_plan
from imagebuild.wheelstore import LEFTOVER_AGE, WheelStore, prune_store, store_state

from ..fake_engine import FakeEngine

BUILDER = "example/builder:1"


def git(repo: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
           "GIT_AUTHOR_DATE": "2026-06-03T12:00:00Z",
           "GIT_COMMITTER_DATE": "2026-06-03T12:00:00Z", "PATH": "/usr/bin:/bin"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True, env=env).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, str]:
    """A source repository with one commit: its version in a file."""
    r = tmp_path / "src-repo"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    (r / "VERSION").write_text("0.1\n")
    (r / "pkg.py").write_text("REVISION = 1\n")
    git(r, "add", ".")
    git(r, "commit", "-q", "-m", "one")
    return r, git(r, "rev-parse", "HEAD")


def make_spec(root: Path, repo: Path, commit: str, patches: list[str] | None = None,
              command: list[str] | None = None, submodules: bool | None = None) -> Spec:
    entry: dict[str, object] = {"name": "vllm", "git": str(repo), "commit": commit,
                                "builder": BUILDER, "env": {"MAX_JOBS": "2"}}
    if submodules is not None:
        entry["submodules"] = submodules
    if patches:
        entry["patches"] = patches
    if command:
        entry["command"] = command
    doc = {"schema": 2, "state": "state",
           "target": {"python": "3.11", "platform": "x86_64-manylinux_2_28"},
           "wheels": {"build": [entry]},
           "images": {"node": {"template": "node.Dockerfile.j2", "base": "example/base:1",
                               "wheels": ["vllm"]}}}
    (root / "imagebuild.yaml").write_text(yaml.safe_dump(doc))
    return load_spec(root / "imagebuild.yaml")


def wheel_maker(name: str = "vllm", tag: str = "py3-none-any", copies: int = 1
                ) -> Callable[[Job, Path, Callable[[str], None]], int]:
    """A builder that writes ``copies`` wheels of ``name`` whose version and content
    come from the source tree it was given."""

    def run(job: Job, root: Path, on_line: Callable[[str], None]) -> int:
        src = root / BUILD_SRC.lstrip("/")
        version = (src / "VERSION").read_text().strip()
        on_line(f"building {name} {version}")
        for i in range(copies):
            out = root / BUILD_OUT.lstrip("/") / f"{name}-{version}{'.' + str(i) if i else ''}" \
                f"-{tag}.whl"
            with zipfile.ZipFile(out, "w") as zf:
                # a fixed entry time: writestr(name, ...) stamps the clock, and two builds
                # a second apart would differ (what the reproducibility check looks for)
                for entry, text in ((f"{name}-{version}.dist-info/METADATA",
                                     f"Metadata-Version: 2.1\nName: {name}\n"
                                     f"Version: {version}\n"),
                                    (f"{name}/pkg.py", (src / "pkg.py").read_text())):
                    zf.writestr(zipfile.ZipInfo(entry, date_time=(2026, 6, 3, 12, 0, 0)), text)
        return 0

    return run


def engine_with(runner: Callable[[Job, Path, Callable[[str], None]], int] | None
                ) -> FakeEngine:
    engine = FakeEngine(job_runner=runner)
    engine.add_base(BUILDER, [b"builder layer"])
    return engine


def test_built_once_then_reused_with_no_fetch_and_no_job(tmp_path: Path,
                                                         repo: tuple[Path, str]) -> None:
    path, commit = repo
    spec = make_spec(tmp_path, path, commit)
    engine = engine_with(wheel_maker())
    first = wheelops.build_wheels(spec, engine, ["vllm"], progress=Quiet())
    assert [o.built for o in first.wheels] == [True]
    record = first.wheels[0].record
    assert record.filename == "vllm-0.1-py3-none-any.whl"
    assert record.builder_id == engine.require(BUILDER).id
    assert (WheelStore(spec.wheel_store).blob(record.sha256, record.filename)).is_file()
    job = engine.jobs[0]
    env = dict(job.env)
    assert env["SOURCE_DATE_EPOCH"] == git(path, "show", "-s", "--format=%ct", commit)
    assert env["CCACHE_DIR"] == BUILD_CCACHE and env["MAX_JOBS"] == "2"
    assert "CCACHE_DISABLE" not in env
    assert job.volumes == ((CCACHE_VOLUME, BUILD_CCACHE),)
    assert job.workdir == BUILD_SRC and job.image == BUILDER
    # again: the store answers; no job, no fetch
    progress = Quiet()
    mirror = mirror_path(spec, str(path))
    before = sorted(p.name for p in (mirror / "refs").rglob("*"))
    again = wheelops.build_wheels(spec, engine, ["vllm"], progress=progress)
    assert [o.built for o in again.wheels] == [False]
    assert again.wheels[0].record == record
    assert len(engine.jobs) == 1
    assert not any("fetching" in line for line in progress.lines)
    assert sorted(p.name for p in (mirror / "refs").rglob("*")) == before


def test_patches_are_applied_in_order_and_change_the_wheel(tmp_path: Path,
                                                           repo: tuple[Path, str]) -> None:
    path, commit = repo
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "1.patch").write_text(
        "--- a/pkg.py\n+++ b/pkg.py\n@@ -1 +1 @@\n-REVISION = 1\n+REVISION = 2\n")
    (tmp_path / "p" / "2.patch").write_text(
        "--- a/pkg.py\n+++ b/pkg.py\n@@ -1 +1 @@\n-REVISION = 2\n+REVISION = 3\n")
    plain = make_spec(tmp_path, path, commit)
    engine = engine_with(wheel_maker())
    unpatched = wheelops.build_wheels(plain, engine, ["vllm"], progress=Quiet()).wheels[0].record
    spec = make_spec(tmp_path, path, commit, patches=["p/1.patch", "p/2.patch"])
    assert wheel_plan(spec)[0].input_hash != wheel_plan(plain)[0].input_hash
    patched = wheelops.build_wheels(spec, engine, ["vllm"], progress=Quiet()).wheels[0].record
    assert patched.sha256 != unpatched.sha256
    blob = WheelStore(spec.wheel_store).blob(patched.sha256, patched.filename)
    with zipfile.ZipFile(blob) as zf:
        assert zf.read("vllm/pkg.py") == b"REVISION = 3\n"
    # the mirror was fetched once: the second derivation found the commit in it
    assert len(engine.jobs) == 2


def _nothing_recorded(spec: Spec) -> None:
    store = spec.wheel_store
    assert not list(store.glob("derivations/*.json"))
    assert not list(store.glob("sha256/*/*"))
    assert not list(store.glob("incoming/*"))
    assert wheelops.wheel_steps(spec, ["vllm"])[0].record is None


def test_a_failing_build_command_records_nothing(tmp_path: Path,
                                                 repo: tuple[Path, str]) -> None:
    path, commit = repo
    spec = make_spec(tmp_path, path, commit)

    def fails(job: Job, root: Path, on_line: Callable[[str], None]) -> int:
        for i in range(40):
            on_line(f"compiling unit {i}")
        on_line("kernels_0.c:3:9: error: unknown type name 'not'")
        return 1

    with pytest.raises(WheelBuildFailed) as info:
        wheelops.build_wheels(spec, engine_with(fails), ["vllm"], progress=Quiet())
    err = info.value
    assert err.exit_code == 5
    assert "the build command exited with 1" in err.message
    assert "kernels_0.c:3:9: error" in err.message
    assert "compiling unit 5\n" not in err.message  # only the last lines
    log = Path(err.message.split("full log: ")[1].split()[0])
    assert "compiling unit 0" in log.read_text() and "FAILED" in log.read_text()
    _nothing_recorded(spec)


@pytest.mark.parametrize("runner,says", [
    (wheel_maker(copies=2), "not exactly one wheel"),
    (wheel_maker(copies=0), "the build left no .whl file"),
    (wheel_maker(name="other"), "a wheel of other, not of vllm"),
    (wheel_maker(tag="cp311-cp311-linux_aarch64"), "none of them installs on CPython 3.11"),
])
def test_a_build_that_makes_the_wrong_output_records_nothing(
        tmp_path: Path, repo: tuple[Path, str],
        runner: Callable[[Job, Path, Callable[[str], None]], int], says: str) -> None:
    path, commit = repo
    spec = make_spec(tmp_path, path, commit)
    with pytest.raises(WheelBuildFailed) as info:
        wheelops.build_wheels(spec, engine_with(runner), ["vllm"], progress=Quiet())
    assert says in info.value.message
    _nothing_recorded(spec)


def test_an_unknown_commit_and_a_bad_patch_fail_before_any_job(
        tmp_path: Path, repo: tuple[Path, str]) -> None:
    path, commit = repo
    engine = engine_with(wheel_maker())
    spec = make_spec(tmp_path, path, "0" * 40)
    with pytest.raises(WheelBuildFailed) as info:
        wheelops.build_wheels(spec, engine, ["vllm"], progress=Quiet())
    assert f"commit {'0' * 40} is not in {path}" in info.value.message
    (tmp_path / "bad.patch").write_text(
        "--- a/pkg.py\n+++ b/pkg.py\n@@ -1 +1 @@\n-REVISION = 9\n+REVISION = 2\n")
    spec = make_spec(tmp_path, path, commit, patches=["bad.patch"])
    with pytest.raises(WheelBuildFailed) as info:
        wheelops.build_wheels(spec, engine, ["vllm"], progress=Quiet())
    assert f"patch {tmp_path / 'bad.patch'} does not apply to {commit[:12]}" in \
        info.value.message
    assert engine.jobs == []
    _nothing_recorded(spec)


def test_a_missing_builder_is_exit_6_and_records_nothing(tmp_path: Path,
                                                         repo: tuple[Path, str]) -> None:
    path, commit = repo
    spec = make_spec(tmp_path, path, commit)
    with pytest.raises(ImageNotFound) as info:
        wheelops.build_wheels(spec, FakeEngine(job_runner=wheel_maker()), ["vllm"],
                              progress=Quiet())
    assert info.value.exit_code == 6
    assert f"the builder image {BUILDER} is not present" in info.value.message
    _nothing_recorded(spec)


def test_a_retagged_builder_is_reported_when_the_wheel_is_reused(
        tmp_path: Path, repo: tuple[Path, str]) -> None:
    path, commit = repo
    spec = make_spec(tmp_path, path, commit)
    engine = engine_with(wheel_maker())
    wheelops.build_wheels(spec, engine, ["vllm"], progress=Quiet())
    engine.add_base(BUILDER, [b"another builder layer"])  # the tag now names another image
    progress = Quiet()
    again = wheelops.build_wheels(spec, engine, ["vllm"], progress=progress)
    assert [o.built for o in again.wheels] == [False]
    assert any("warning: example/builder:1 is now image" in line for line in progress.lines)


def test_check_rebuilds_without_the_cache_and_keeps_the_store(
        tmp_path: Path, repo: tuple[Path, str]) -> None:
    path, commit = repo
    spec = make_spec(tmp_path, path, commit)
    engine = engine_with(wheel_maker())
    stored = wheelops.build_wheels(spec, engine, ["vllm"], progress=Quiet()).wheels[0].record
    checked = wheelops.check_wheels(spec, engine, ["vllm"], progress=Quiet())
    assert checked.error() is None
    assert checked.pairs[0][0] == stored and checked.pairs[0][1].sha256 == stored.sha256
    assert dict(engine.jobs[-1].env)["CCACHE_DISABLE"] == "1"
    assert len(list(spec.wheel_store.glob("derivations/*.json"))) == 1
    # a builder that stamps the time: the check says so, exit 10, the store is kept
    stamps = iter(range(100))

    def stamped(job: Job, root: Path, on_line: Callable[[str], None]) -> int:
        src = root / BUILD_SRC.lstrip("/")
        (src / "pkg.py").write_text(f"STAMP = {next(stamps)}\n")
        return wheel_maker()(job, root, on_line)

    engine.job_runner = stamped
    checked = wheelops.check_wheels(spec, engine, ["vllm"], progress=Quiet())
    err = checked.error()
    assert err is not None and err.exit_code == 10 and checked.differ == ["vllm"]
    assert WheelStore(spec.wheel_store).lookup(stored.input_hash) == stored


def test_the_wheel_store_says_what_refers_to_each_wheel_and_prune_removes_the_rest(
        tmp_path: Path, repo: tuple[Path, str]) -> None:
    path, commit = repo
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "1.patch").write_text(
        "--- a/pkg.py\n+++ b/pkg.py\n@@ -1 +1 @@\n-REVISION = 1\n+REVISION = 2\n")
    engine = engine_with(wheel_maker())
    old = wheelops.build_wheels(make_spec(tmp_path, path, commit), engine, ["vllm"],
                                progress=Quiet()).wheels[0].record
    spec = make_spec(tmp_path, path, commit, patches=["p/1.patch"])
    new = wheelops.build_wheels(spec, engine, ["vllm"], progress=Quiet()).wheels[0].record
    store = WheelStore(spec.wheel_store)
    empty = Lock(spec.lock_path, ())
    uses = {w.sha256: w.use for w in store_state(spec, empty).wheels}
    assert uses == {old.sha256: "unreferenced", new.sha256: "built, not locked"}
    locked = Lock(spec.lock_path, (LockedWheel(new.name, new.version, new.filename,
                                               new.sha256, BUILT_PREFIX + new.input_hash),))
    state = store_state(spec, locked)
    assert [(w.sha256, w.use) for w in state.wheels if w.sha256 == new.sha256] == [
        (new.sha256, "locked")]
    assert state.size == sum(store.blob(r.sha256, r.filename).stat().st_size
                             for r in (old, new))
    # the old spec's wheel is what the lock left behind: status names it
    lines = output.wheel_store_lines(state)
    assert "1 locked, 0 built but not locked, 1 referred to by nothing" in lines[0]
    assert any(old.filename in ln and "unreferenced" in ln for ln in lines)
    # leftovers of builds that never finished: only those older than a day go
    stale = spec.wheel_store / "incoming" / "build-stale"
    young = spec.wheel_store / "incoming" / "build-running"
    stale.mkdir(parents=True)
    young.mkdir()
    os.utime(stale, (time.time() - 2 * LEFTOVER_AGE, time.time() - 2 * LEFTOVER_AGE))
    would = prune_store(spec, locked, dry_run=True)
    assert [w.sha256 for w in would.wheels] == [old.sha256]
    assert would.leftovers == (str(stale),)
    assert store.blob(old.sha256, old.filename).is_file() and stale.is_dir()  # dry run
    gone = prune_store(spec, locked, dry_run=False)
    assert [w.sha256 for w in gone.wheels] == [old.sha256]
    assert not store.blob(old.sha256, old.filename).exists()
    assert not store.blob(old.sha256, old.filename).parent.exists()
    assert store.lookup(old.input_hash) is None  # its record went with it
    assert not (spec.wheel_store / "derivations" / f"{old.input_hash}.json").exists()
    assert store.lookup(new.input_hash) == new and young.is_dir() and not stale.exists()
    assert prune_store(spec, locked, dry_run=False).wheels == ()  # nothing left to remove
    # a wheel built but not locked yet is kept: a build-wheels run waiting for 'lock'
    assert prune_store(spec, empty, dry_run=False).wheels == ()
    assert store.lookup(new.input_hash) == new


def _repo(path: Path, files: dict[str, str]) -> str:
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    for name, text in files.items():
        (path / name).write_text(text)
    git(path, "add", ".")
    git(path, "commit", "-q", "-m", "one")
    return git(path, "rev-parse", "HEAD")


def _add_submodule(repo: Path, url: str, where: str) -> str:
    git(repo, "-c", "protocol.file.allow=always", "submodule", "add", "-q", url, where)
    git(repo, "commit", "-q", "-m", f"add {where}")
    return git(repo, "rev-parse", "HEAD")


def test_submodules_are_checked_out_recursively_at_the_commits_the_source_pins(
        tmp_path: Path, repo: tuple[Path, str]) -> None:
    path, _ = repo
    # deep <- cutlass <- the source (flashinfer's 3rdparty/cutlass, with one of its own)
    _repo(tmp_path / "deep.git", {"deep.h": "deep 1\n"})
    _repo(tmp_path / "cutlass.git", {"cutlass.h": "cutlass 1\n"})
    _add_submodule(tmp_path / "cutlass.git", "../deep.git", "deep")  # relative, as git allows
    commit = _add_submodule(path, str(tmp_path / "cutlass.git"), "3rdparty/cutlass")
    # the submodule moves on afterwards: the source's commit still pins the old one
    (tmp_path / "cutlass.git" / "cutlass.h").write_text("cutlass 2\n")
    git(tmp_path / "cutlass.git", "commit", "-q", "-am", "two")
    seen: dict[str, str] = {}

    def run(job: Job, root: Path, on_line: Callable[[str], None]) -> int:
        src = root / BUILD_SRC.lstrip("/")
        for f in ("3rdparty/cutlass/cutlass.h", "3rdparty/cutlass/deep/deep.h"):
            seen[f] = (src / f).read_text() if (src / f).is_file() else "(missing)"
        return wheel_maker()(job, root, on_line)

    spec = make_spec(tmp_path, path, commit)
    progress = Quiet()
    outcome = wheelops.build_wheels(spec, engine_with(run), ["vllm"], progress=progress)
    assert seen == {"3rdparty/cutlass/cutlass.h": "cutlass 1\n",
                    "3rdparty/cutlass/deep/deep.h": "deep 1\n"}
    log = Path(outcome.wheels[0].record.log).read_text()
    assert "# submodule 3rdparty/cutlass " in log and "# submodule 3rdparty/cutlass/deep " in log
    fetched = [ln for ln in progress.lines if "fetching" in ln]
    assert len(fetched) == 3  # the source and each submodule, each into its own mirror
    # without them: another derivation, and the build sees the empty directories
    bare = make_spec(tmp_path, path, commit, submodules=False)
    assert wheel_plan(bare)[0].input_hash != wheel_plan(spec)[0].input_hash
    wheelops.build_wheels(bare, engine_with(run), ["vllm"], progress=Quiet())
    assert seen["3rdparty/cutlass/cutlass.h"] == "(missing)"


def test_a_submodule_that_cannot_be_fetched_fails_the_build_and_records_nothing(
        tmp_path: Path, repo: tuple[Path, str]) -> None:
    path, _ = repo
    _repo(tmp_path / "spdlog.git", {"spdlog.h": "1\n"})
    commit = _add_submodule(path, str(tmp_path / "spdlog.git"), "3rdparty/spdlog")
    (tmp_path / "spdlog.git").rename(tmp_path / "gone.git")
    spec = make_spec(tmp_path, path, commit)
    with pytest.raises(WheelBuildFailed) as info:
        wheelops.build_wheels(spec, engine_with(wheel_maker()), ["vllm"], progress=Quiet())
    assert info.value.exit_code == 5
    assert f"submodule 3rdparty/spdlog: fetching {tmp_path / 'spdlog.git'} failed" in (
        info.value.message)
    assert info.value.hint is not None and "submodules: false" in info.value.hint
    _nothing_recorded(spec)


@pytest.mark.parametrize("base, url, want", [
    ("https://github.com/flashinfer-ai/flashinfer.git", "../cutlass.git",
     "https://github.com/flashinfer-ai/cutlass.git"),
    ("https://github.com/flashinfer-ai/flashinfer.git", "../../NVIDIA/cutlass.git",
     "https://github.com/NVIDIA/cutlass.git"),
    ("https://example.com/a/b", "./c", "https://example.com/a/b/c"),
    ("git@github.com:org/repo.git", "../x.git", "git@github.com:org/x.git"),
    ("git@github.com:org/repo.git", "../../x.git", "git@github.com:x.git"),
    ("/srv/git/super.git", "../sub.git", "/srv/git/sub.git"),
    ("/srv/git/super.git", "https://github.com/gabime/spdlog.git",
     "https://github.com/gabime/spdlog.git"),
])
def test_a_relative_submodule_url_resolves_as_git_resolves_it(base: str, url: str,
                                                              want: str) -> None:
    assert submodule_url(base, url) == want


def test_a_relative_submodule_url_cannot_climb_out_of_its_host() -> None:
    with pytest.raises(Exception, match="goes above the root"):
        submodule_url("https://example.com/a.git", "../../../b.git")


RESOLVE_SPEC = """# a comment that stays
schema: 2
state: state
target: {{python: "3.11", platform: x86_64-manylinux_2_28}}
wheels:
  build:
    - name: vllm
      git: {repo}
      commit: <the full 40-digit id of v0.1>   # imagebuild build-wheels --resolve vllm=v0.1
      builder: {builder}
images:
  node: {{template: node.Dockerfile.j2, base: "example/base:1", wheels: [vllm]}}
"""


def test_resolve_pins_a_tag_or_a_branch_into_the_spec_and_nothing_else(
        tmp_path: Path, repo: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    path, first = repo
    git(path, "tag", "-a", "v0.1", "-m", "v0.1")
    spec_path = tmp_path / "imagebuild.yaml"
    text = RESOLVE_SPEC.format(repo=path, builder=BUILDER)
    spec_path.write_text(text)
    # the placeholder is what it is for: the real spec ships one
    done = wheelops.resolve_refs(str(spec_path), [("vllm", "v0.1")], Quiet())
    assert [(r.name, r.old, r.new, r.changed) for r in done] == [
        ("vllm", "<the full 40-digit id of v0.1>", first, True)]
    assert spec_path.read_text() == text.replace("<the full 40-digit id of v0.1>",
                                                 f'"{first}"')
    assert load_spec(spec_path).built["vllm"].commit == first
    # a branch moves: resolving it again moves the pin, and says from where
    (path / "pkg.py").write_text("REVISION = 2\n")
    git(path, "commit", "-q", "-am", "two")
    second = git(path, "rev-parse", "HEAD")
    again = wheelops.resolve_refs(str(spec_path), [("vllm", "main")], Quiet())
    assert (again[0].old, again[0].new) == (first, second)
    assert "# a comment that stays" in spec_path.read_text()
    assert "--resolve vllm=v0.1" in spec_path.read_text()  # the entry's own comment too
    lines = output.resolve_lines(again)
    assert lines[0] == f"vllm: main is {second} (was {first})"
    # the same again: nothing written
    before = spec_path.stat().st_mtime_ns
    same = wheelops.resolve_refs(str(spec_path), [("vllm", second[:10])], Quiet())
    assert not same[0].changed and spec_path.stat().st_mtime_ns == before
    assert output.resolve_lines(same) == [f"vllm: {second[:10]} is {second} (the spec has "
                                          f"it already)"]
    # through the command line
    code = cli_main(["-f", str(spec_path), "build-wheels", "--resolve", "vllm=v0.1"])
    assert code == 0 and load_spec(spec_path).built["vllm"].commit == first
    assert f"vllm: v0.1 is {first} (was {second})" in capsys.readouterr().out


@pytest.mark.parametrize("args, says", [
    (["--resolve", "vllm=nope"], "has no branch, tag or commit 'nope'"),
    (["--resolve", "flashinfer=main"], "'flashinfer' is not a wheel built from source"),
    (["--resolve", "vllm=-c"], "expected NAME=REF"),
    (["--resolve", "vllm=main..v0.1"], "expected NAME=REF"),
    (["--resolve", "vllm"], "expected NAME=REF"),
    (["--resolve", "vllm=main", "vllm"], "builds nothing"),
    (["--resolve", "vllm=main", "--check"], "builds nothing"),
])
def test_resolve_refuses_what_it_cannot_pin_and_writes_nothing(
        tmp_path: Path, repo: tuple[Path, str], capsys: pytest.CaptureFixture[str],
        args: list[str], says: str) -> None:
    path, _ = repo
    spec_path = tmp_path / "imagebuild.yaml"
    text = RESOLVE_SPEC.format(repo=path, builder=BUILDER)
    spec_path.write_text(text)
    code = cli_main(["-f", str(spec_path), "build-wheels", *args])
    assert code == 2
    assert says in capsys.readouterr().err
    assert spec_path.read_text() == text


def cli_main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        assert isinstance(exc.code, int)
        return exc.code


def test_resolve_against_a_repository_that_cannot_be_fetched_is_exit_5(
        tmp_path: Path, repo: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    spec_path = tmp_path / "imagebuild.yaml"
    text = RESOLVE_SPEC.format(repo=tmp_path / "gone.git", builder=BUILDER)
    spec_path.write_text(text)
    code = cli_main(["-f", str(spec_path), "build-wheels", "--resolve", "vllm=main"])
    err = capsys.readouterr().err
    assert code == 5 and f"fetching {tmp_path / 'gone.git'} failed" in err
    assert spec_path.read_text() == text


def test_a_submodule_with_no_url_or_outside_the_tree_fails_the_build(
        tmp_path: Path, repo: tuple[Path, str]) -> None:
    path, _ = repo
    commit = git(path, "rev-parse", "HEAD")
    # a gitlink the source records with no .gitmodules entry saying where it comes from
    git(path, "update-index", "--add", "--cacheinfo", f"160000,{commit},3rdparty/lost")
    git(path, "commit", "-q", "-m", "a gitlink with no URL")
    spec = make_spec(tmp_path, path, git(path, "rev-parse", "HEAD"))
    with pytest.raises(WheelBuildFailed) as info:
        wheelops.build_wheels(spec, engine_with(wheel_maker()), ["vllm"], progress=Quiet())
    assert info.value.exit_code == 5
    assert "submodule 3rdparty/lost: a submodule with no URL in .gitmodules" in (
        info.value.message)
    _nothing_recorded(spec)
    # a URL git could be made to run a command with (ext::) is refused before any fetch
    (path / ".gitmodules").write_text(
        '[submodule "lost"]\n\tpath = 3rdparty/lost\n\turl = ext::sh -c touch% /tmp/x\n')
    git(path, "add", ".gitmodules")
    git(path, "commit", "-q", "-m", "an ext:: URL")
    spec = make_spec(tmp_path, path, git(path, "rev-parse", "HEAD"))
    with pytest.raises(WheelBuildFailed) as info:
        wheelops.build_wheels(spec, engine_with(wheel_maker()), ["vllm"], progress=Quiet())
    assert "is not a URL git may fetch for a submodule" in info.value.message
    _nothing_recorded(spec)
