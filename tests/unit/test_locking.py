"""The closure lock step without uv: inputs, the metadata conflict check, --check and
--upgrade plumbing, the lock file reader. uv itself runs in tests/integration/test_lock.py."""

from __future__ import annotations

from dataclasses import replace

import pytest

from imagebuild import context, lockflow
from imagebuild import locking as imagebuild_locking
from imagebuild.closure import LockedDist, _seal, format_closure, read_closure
from imagebuild.errors import LockConflict, LockError, SpecError
from imagebuild.lock import parse_wheel, read_lock
from imagebuild.locking import exact_version, image_inputs, pinned_version
from imagebuild.wheelplan import pick_wheel, tags_best_first

from .conftest import CLOSURE, SPEC, TORCH_SHA, Stack, _dist


def _wheels(stack: Stack):  # type: ignore[no-untyped-def]
    return {w.name: w for w in read_lock(stack.root / "wheels.lock").wheels}


def test_inputs_follow_the_lineage_with_the_overrides_in_force(stack: Stack) -> None:
    spec = stack.load()
    mimo = image_inputs(spec, _wheels(stack), "mimo")
    assert mimo.requirements == (
        "vllm==0.22.1rc1.dev124+gace95c9cf.d20260603.cu132", "flashinfer-python==0.6.12",
        "torch==2.11.0+cu130", "transformers>=4.57,<5", "extra-mimo==1.0")
    assert mimo.overrides == ("torch==2.11.0+cu130", "transformers>=5.0.0")
    assert image_inputs(spec, _wheels(stack), "tf5").overrides == ("torch==2.11.0+cu130",)
    assert mimo.indexes == ("https://pypi.org/simple", "http://127.0.0.1:9/simple")


def test_lock_writes_every_closure_and_a_second_run_changes_nothing(
        stack: Stack, offline_lock: object) -> None:
    first = lockflow.lock(stack.load(), check=False, upgrade=False)
    assert [(c.image, c.packages) for c in first.closures] == [
        ("vllm-node", 5), ("vllm-node-tf5", 5), ("vllm-node-mimo", 6)]
    again = lockflow.lock(stack.load(), check=False, upgrade=False)
    assert {c.state for c in again.closures} == {"unchanged"}
    assert lockflow.lock(stack.load(), check=True, upgrade=False).closures[0].state == "up to date"
    lock = read_closure(stack.load().closure_lock_path("vllm-node-mimo"), "vllm-node-mimo")
    assert lock.by_name()["transformers"].version == "5.0.0"


def test_the_locks_a_lock_step_returns_are_the_locks_it_wrote_as_a_reader_sees_them(
        stack: Stack, offline_lock: object) -> None:
    # a build goes on with the lock step's own locks instead of reading the files again:
    # they must be what reading the files gives, field for field
    (stack.root / "wheels.lock").unlink()  # a first lock: every file written anew
    done = lockflow.lock(stack.load(), check=False, upgrade=False)
    assert {c.state for c in done.closures} == {"written"}
    assert done.locks == context.load(str(stack.spec_path)).lock
    assert set(done.locks.closures) == set(stack.load().images)


def test_the_lock_step_regenerates_damaged_locks_and_says_so(
        stack: Stack, offline_lock: object) -> None:
    """A closure lock or a wheels.lock that does not parse is no starting point: the lock
    step locks from the spec and writes it again (saying it ignored the wheels.lock),
    and a build then reads them as it would any lock."""
    spec = stack.load()
    lockflow.lock(spec, check=False, upgrade=False)
    closure = spec.closure_lock_path("vllm-node")
    good = closure.read_text()
    closure.write_bytes(b"\xff\xfe not a lock")
    with pytest.raises(LockError):
        context.load(str(stack.spec_path))
    done = lockflow.lock(stack.load(), check=False, upgrade=False)
    assert done.warnings == () and closure.read_text() == good

    before = read_lock(spec.lock_path)
    spec.lock_path.write_text("version = [\n")
    done = lockflow.lock(stack.load(), check=False, upgrade=False)
    assert len(done.warnings) == 1 and "ignoring the existing lock" in done.warnings[0]
    again = read_lock(spec.lock_path)
    # the local wheels hashed again; the index wheels' hashes came from the old lock,
    # and this machine cannot reach their index: unresolved, not guessed
    assert {w.filename: w.sha256 for w in again.wheels if w.is_local} == {
        w.filename: w.sha256 for w in before.wheels if w.is_local}
    assert all(w.sha256 is None for w in again.wheels if not w.is_local)
    assert context.load(str(stack.spec_path)).lock == done.locks


def test_a_conflict_no_override_covers_is_refused_naming_its_cause(
        stack: Stack, offline_lock: object) -> None:
    before = sorted(p.name for p in (stack.root / "locks").iterdir())
    texts = {p: p.read_text() for p in (stack.root / "locks").iterdir()}
    override = ("    overrides:\n"
                "      - {requirement: torch==2.11.0+cu130, reason: vllm pins torch==2.10.0, "
                "covers: [vllm]}\n")
    assert override in SPEC
    stack.write_spec(SPEC.replace(override, ""))
    with pytest.raises(LockConflict) as info:
        lockflow.lock(stack.load(), check=False, upgrade=False)
    err = info.value
    assert err.exit_code == 2
    assert ("vllm-0.22.1rc1.dev124+gace95c9cf.d20260603.cu132-py3-none-any.whl requires "
            "'torch==2.10.0'; the closure has torch 2.11.0+cu130") in err.message
    assert err.hint is not None and "images.vllm-node.overrides" in err.hint
    assert 'requirement: "torch==2.11.0+cu130"' in err.hint
    # nothing written
    assert sorted(p.name for p in (stack.root / "locks").iterdir()) == before
    assert all(p.read_text() == t for p, t in texts.items())


def test_a_conflict_found_after_resolution_is_refused_too(
        stack: Stack, offline_lock: dict[str, list[object]]) -> None:
    # the resolver took a tokenizers that transformers' metadata excludes
    stack.wheel("extra_mimo-1.0-py3-none-any.whl", b"extra bytes",
                requires=("tokenizers<0.22",))
    with pytest.raises(LockConflict, match=r"extra_mimo-1\.0-py3-none-any\.whl requires "
                                           r"'tokenizers<0\.22'; the closure has tokenizers"):
        lockflow.lock(stack.load(), check=False, upgrade=False)


def test_a_lock_edited_by_hand_is_refused_before_anything_runs(stack: Stack) -> None:
    spec = stack.load()
    path = spec.closure_lock_path("vllm-node-mimo")
    text = path.read_text()
    sha = read_closure(path, "vllm-node-mimo").by_name()["transformers"].sha256
    path.write_text(text.replace(sha, "0" * 64))
    with pytest.raises(LockError, match=r"pylock\.vllm-node-mimo\.toml: the lock was "
                                        r"changed by hand") as info:
        context.load(str(stack.spec_path))
    assert info.value.exit_code == 2
    # the reader checks every field even under a valid seal (a lock written by another tool)
    for bad, why in ((text.replace('version = "5.0.0"', 'version = "5.0.1"'), "does not match"),
                     (text.replace("sha256 = ", "md5 = "), "hashes"),
                     (text.replace('"vllm-node-mimo"', '"vllm-node"'), "locks image"),
                     (text.replace("[tool.imagebuild]", "evil = 1\n[tool.imagebuild]"),
                      "unknown keys"),
                     (text.replace("http://127.0.0.1:9/simple/", "file:///etc/"), "url must"),
                     (text.replace('path = "wheels/', 'path = "../../'), "path must")):
        body = bad[:bad.index("content-hash")]
        path.write_text(body + f'content-hash = "sha256:{_seal(body)}"\n')
        with pytest.raises(LockError, match=why):
            context.load(str(stack.spec_path))


def test_a_stale_closure_is_refused_with_the_reason(stack: Stack) -> None:
    stack.write_spec(SPEC.replace('requires: ["transformers>=4.57,<5"]',
                                  'requires: ["transformers>=4.58,<5"]'))
    with pytest.raises(LockError, match=r"pylock\.vllm-node-tf5\.toml is out of date: the "
                                        r"image's requirements changed"):
        context.load(str(stack.spec_path))


def test_formatting_is_deterministic_and_reads_back(stack: Stack) -> None:
    spec = stack.load()
    for name in spec.images:
        path = spec.closure_lock_path(name)
        lock = read_closure(path, name)
        assert format_closure(lock, "imagebuild.yaml") == path.read_text()


def test_upgrade_names_reach_the_resolver(stack: Stack, monkeypatch: pytest.MonkeyPatch,
                                          offline_lock: object) -> None:
    import imagebuild.locking as locking

    seen: list[object] = []
    real = locking.resolve

    def spy(**kw: object):  # type: ignore[no-untyped-def]
        seen.append((kw["image"], kw["upgrade"], kw["previous"] is not None))
        return real(**kw)

    monkeypatch.setattr(locking, "resolve", spy)
    lockflow.lock(stack.load(), check=False, upgrade=["tokenizers"])
    assert seen == [(n, ["tokenizers"], True)
                    for n in ("vllm-node", "vllm-node-tf5", "vllm-node-mimo")]


def test_the_unit_closure_has_what_the_tests_assume() -> None:
    assert _dist("tokenizers", "0.22.1", "c" * 64).filename == "tokenizers-0.22.1-py3-none-any.whl"


def test_plan_says_which_images_a_lock_change_rebuilds(stack: Stack,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    import subprocess

    from .test_render_plan import _run

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(stack.root), *args], check=True, capture_output=True,
                       env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
                            "PATH": "/usr/bin:/bin"})

    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "locked")
    code, out, _ = _run(["-f", str(stack.spec_path), "plan"], capsys)
    assert code == 0 and "rebuilds" not in out  # nothing changed since the commit
    newer = _dist("tokenizers", "0.22.2", "f" * 64)
    stack.lock({**CLOSURE, "vllm-node-tf5": [*CLOSURE["vllm-node-tf5"], newer],
                "vllm-node-mimo": [*CLOSURE["vllm-node-mimo"], newer]})
    code, out, _ = _run(["-f", str(stack.spec_path), "plan"], capsys)
    lines = out.splitlines()
    rebuilds = [ln.strip() for ln in lines if "rebuilds" in ln]
    assert rebuilds == [
        "rebuilds (lock changed since the last commit): + tokenizers 0.22.2",
        "rebuilds (lock changed since the last commit): its parent vllm-node-tf5 changes"]
    # right under tf5's line (and what it installs)
    tf5 = lines.index(next(ln for ln in lines if ln.strip().startswith("2. vllm-node-tf5")))
    assert lines[tf5 + 1].strip().startswith("installs: ")
    assert lines.index(next(ln for ln in lines if "rebuilds" in ln)) == tf5 + 2


def test_upgrading_a_package_no_image_has_is_refused(stack: Stack, offline_lock: object) -> None:
    texts = {p: p.read_text() for p in (stack.root / "locks").iterdir()}
    with pytest.raises(LockError, match=r"--upgrade tokenisers: no image's closure has it"):
        lockflow.lock(stack.load(), check=False, upgrade=["tokenisers"])
    assert all(p.read_text() == t for p, t in texts.items())


def test_an_undeclared_wheel_in_the_wheels_directory_is_never_locked(
        stack: Stack, offline_lock: dict[str, list[object]]) -> None:
    from imagebuild.closure import LockedDist

    stray = stack.wheel("helper-1.0-py3-none-any.whl", b"helper")
    offline_lock["vllm-node"].append(LockedDist("helper", "1.0", stray.name, "1" * 64, None))
    with pytest.raises(LockError, match=r"took helper-1\.0-py3-none-any\.whl from the wheels "
                                        r"directory, which the spec does not declare"):
        lockflow.lock(stack.load(), check=False, upgrade=False)


def test_an_override_records_what_it_covers_and_refuses_what_it_does_not_list(
        stack: Stack, offline_lock: dict[str, list[LockedDist]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the lock records, per image, each requirement an override silenced
    lockflow.lock(stack.load(), check=False, upgrade=False)
    spec = stack.load()
    node = read_closure(spec.closure_lock_path("vllm-node"), "vllm-node")
    assert node.covered == ("vllm requires torch==2.10.0 (override torch==2.11.0+cu130)",)
    mimo = read_closure(spec.closure_lock_path("vllm-node-mimo"), "vllm-node-mimo")
    assert mimo.covered == (
        "vllm requires torch==2.10.0 (override torch==2.11.0+cu130)",
        "vllm requires transformers<5,>=4.56.0 (override transformers>=5.0.0)")
    texts = {p: p.read_text() for p in (stack.root / "locks").iterdir()}

    # a torchvision of the torch 2.10 line, pulled in beside torch 2.11: the torch override
    # would silence its requirement, so the lock refuses it by name
    vision = _dist("torchvision", "0.25.0", "f" * 64)
    offline_lock["vllm-node"].append(vision)

    def metadata(url: str) -> bytes:
        parsed = parse_wheel(url.removesuffix(".metadata").rsplit("/", 1)[-1])
        requires = "Requires-Dist: torch==2.10.0\n" if parsed.name == "torchvision" else ""
        return (f"Metadata-Version: 2.1\nName: {parsed.name}\nVersion: {parsed.version}\n"
                f"{requires}").encode()

    monkeypatch.setattr("imagebuild.web.get_bytes", metadata)
    with pytest.raises(LockConflict) as info:
        lockflow.lock(stack.load(), check=False, upgrade=False)
    err = info.value
    assert err.exit_code == 2
    assert ("torchvision-0.25.0-py3-none-any.whl requires 'torch==2.10.0'; the closure has "
            "torch 2.11.0+cu130 (the override torch==2.11.0+cu130 would silence it; its "
            "covers: does not list torchvision)") in err.message
    assert "vllm requires" not in err.message  # listed under covers: not a conflict
    assert err.hint is not None and "covers: [torchvision]" in err.hint
    assert all(p.read_text() == t for p, t in texts.items())  # nothing written

    # listing it is the operator's word that its requirement is wrong: recorded in the lock
    stack.write_spec(SPEC.replace("covers: [vllm]}", "covers: [vllm, torchvision]}", 1))
    lockflow.lock(stack.load(), check=False, upgrade=False)
    node = read_closure(spec.closure_lock_path("vllm-node"), "vllm-node")
    assert node.covered == (
        "torchvision requires torch==2.10.0 (override torch==2.11.0+cu130)",
        "vllm requires torch==2.10.0 (override torch==2.11.0+cu130)")
    # a torchvision of the torch 2.11 line needs no word at all
    offline_lock["vllm-node"][-1] = _dist("torchvision", "0.26.0", "f" * 64)
    monkeypatch.setattr("imagebuild.web.get_bytes", lambda url: metadata(url).replace(
        b"torch==2.10.0", b"torch==2.11.0"))
    stack.write_spec(SPEC)
    lockflow.lock(stack.load(), check=False, upgrade=False)
    node = read_closure(spec.closure_lock_path("vllm-node"), "vllm-node")
    assert node.covered == ("vllm requires torch==2.10.0 (override torch==2.11.0+cu130)",)


def test_a_hand_edited_covered_list_is_refused(stack: Stack, offline_lock: object) -> None:
    lockflow.lock(stack.load(), check=False, upgrade=False)
    path = stack.load().closure_lock_path("vllm-node")
    lock = read_closure(path, "vllm-node")
    text = format_closure(lock, "imagebuild.yaml")
    body = text[:text.index("content-hash")].replace(
        'covered = ["vllm requires', 'covered = [3, "vllm requires')
    path.write_text(body + f'content-hash = "sha256:{_seal(body)}"\n')
    with pytest.raises(LockError, match="'covered' must be lines of text"):
        read_closure(path, "vllm-node")


SECOND = "http://127.0.0.1:9/simple"  # the stack's torch index
NUMPY_FILES = {  # what the torch index lists of numpy (it mirrors PyPI's packages)
    "numpy-9.9.9-cp312-cp312-manylinux_2_17_x86_64.whl": "1" * 64,
    "numpy-9.9.9-cp312-cp312-manylinux_2_17_aarch64.whl": "2" * 64,
    "numpy-9.9.9-cp312-cp312-manylinux_2_28_aarch64.whl": "3" * 64,
    "numpy-9.9.9-cp312-cp312-manylinux_2_34_aarch64.whl": "4" * 64,
    "numpy-9.9.9-cp311-cp311-manylinux_2_28_aarch64.whl": "5" * 64,
    "numpy-9.9.8-cp312-cp312-manylinux_2_28_aarch64.whl": "6" * 64,
}


def _resolutions(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """What each uv run is given (the unit tier's resolver stands in for uv)."""
    seen: list[dict[str, object]] = []
    fake = imagebuild_locking.resolve

    def resolve(**kw: object):  # type: ignore[no-untyped-def]
        seen.append(kw)
        return fake(**kw)

    monkeypatch.setattr("imagebuild.locking.resolve", resolve)
    return seen


def test_another_index_serves_its_packages_to_uv_as_its_files_by_url(
        stack: Stack, offline_lock: dict[str, list[LockedDist]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _resolutions(monkeypatch)
    lockflow.lock(stack.load(), check=False, upgrade=False)
    # uv is given the primary index alone, and torch as the one file of its own index
    # (in place of the override torch==2.11.0+cu130, which silences vllm's torch pin)
    torch_url = f"{SECOND}/torch/torch-2.11.0+cu130-py3-none-any.whl"
    node = next(kw for kw in seen if kw["image"] == "vllm-node")
    assert node["index"] == "https://pypi.org/simple"
    assert node["overrides"] == [f"torch @ {torch_url}#sha256={TORCH_SHA}"]
    mimo = next(kw for kw in seen if kw["image"] == "vllm-node-mimo")
    assert mimo["overrides"] == ["transformers>=5.0.0", f"torch @ {torch_url}#sha256={TORCH_SHA}"]
    locked = read_closure(stack.load().closure_lock_path("vllm-node"), "vllm-node")
    assert locked.by_name()["torch"].url == torch_url
    assert locked.overrides == ("torch==2.11.0+cu130",)  # the spec's, as it wrote them


def test_a_package_listed_under_an_index_is_its_file_for_the_pinned_version_and_target(
        stack: Stack, offline_lock: dict[str, list[LockedDist]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # numpy in the closure, listed under the torch index's packages:
    offline_lock["vllm-node"].append(_dist("numpy", "9.9.9", "9" * 64))
    real_page = imagebuild_locking.index_page
    asked: list[str] = []

    def page(url: str) -> str:
        asked.append(url)
        if url == f"{SECOND}/numpy/":
            return "".join(f'<a href="../../files/{f}#sha256={h}">{f}</a>'
                           for f, h in NUMPY_FILES.items())
        return real_page(url)

    monkeypatch.setattr("imagebuild.locking.index_page", page)
    stack.write_spec(SPEC.replace(f"      url: {SECOND}\n", f"      url: {SECOND}\n"
                                  "      packages: [numpy]\n", 1))
    assert image_inputs(stack.load(), _wheels(stack), "vllm-node").assigned == {
        "torch": SECOND, "numpy": SECOND, "uv": SECOND}
    texts = {p: p.read_text() for p in (stack.root / "locks").iterdir()}
    # not pinned to one version: the lock cannot take a file of it from that index
    with pytest.raises(LockError) as info:
        lockflow.lock(stack.load(), check=False, upgrade=False)
    assert info.value.exit_code == 2
    assert (f"numpy 9.9.9 came from the primary index, but {SECOND} serves it, at the one "
            "version the spec pins: none is pinned") in info.value.message
    assert "torch" not in info.value.message.split("\n", 1)[1]  # torch is its index's
    assert info.value.hint is not None and "override" in info.value.hint
    assert all(p.read_text() == t for p, t in texts.items())  # nothing written
    # pinned by an override: the file of that version the target (CPython 3.12,
    # aarch64, glibc 2.28) installs, best tag first
    pinned = SPEC.replace(f"      url: {SECOND}\n", f"      url: {SECOND}\n"
                          "      packages: [numpy]\n", 1).replace(
        "covers: [vllm]}\n    checks: [torch-gate]",
        "covers: [vllm]}\n      - {requirement: numpy==9.9.9, reason: the index's build}\n"
        "    checks: [torch-gate]", 1)
    stack.write_spec(pinned)
    asked.clear()
    lockflow.lock(stack.load(), check=False, upgrade=False)
    numpy = read_closure(stack.load().closure_lock_path("vllm-node"), "vllm-node"
                         ).by_name()["numpy"]
    assert (numpy.filename, numpy.sha256) == (
        "numpy-9.9.9-cp312-cp312-manylinux_2_28_aarch64.whl", "3" * 64)
    assert numpy.url == ("http://127.0.0.1:9/files/"
                         "numpy-9.9.9-cp312-cp312-manylinux_2_28_aarch64.whl")
    # each index page read once for the three images, whose closures share it
    assert f"{SECOND}/numpy/" in asked and len(asked) == len(set(asked))
    # a version the index has no file of for this target: refused, naming both
    stack.write_spec(pinned.replace("numpy==9.9.9", "numpy==9.9.7"))
    with pytest.raises(LockError, match=rf"{SECOND} lists no wheel of numpy 9\.9\.7 for "
                                        r"CPython 3\.12 on aarch64-manylinux_2_28"):
        lockflow.lock(stack.load(), check=False, upgrade=False)
    # a target that is not Linux installs pure wheels only: numpy has none
    stack.write_spec(pinned.replace("platform: aarch64-manylinux_2_28", "platform: aarch64-x"))
    with pytest.raises(LockError, match=rf"{SECOND} lists no wheel of numpy 9\.9\.9"):
        lockflow.lock(stack.load(), check=False, upgrade=False)


def test_an_index_that_publishes_other_bytes_for_a_declared_file_is_refused(
        stack: Stack, offline_lock: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("imagebuild.locking.index_page", lambda url: (
        '<a href="torch-2.11.0+cu130-py3-none-any.whl#sha256=' + "f" * 64 + '">t</a>'
        if url == f"{SECOND}/torch/" else '<a href="uv-0.9.7-py3-none-any.whl">u</a>'))
    with pytest.raises(LockError) as info:
        lockflow.lock(stack.load(), check=False, upgrade=False)
    assert f"publishes sha256 {'f' * 64} for torch-2.11.0+cu130" in info.value.message
    assert info.value.hint is not None and "lock --upgrade torch" in info.value.hint
    monkeypatch.setattr("imagebuild.locking.index_page", lambda url: "")
    with pytest.raises(LockError, match=rf"{SECOND} does not list torch-2\.11\.0"):
        lockflow.lock(stack.load(), check=False, upgrade=False)


def test_an_index_that_cannot_be_read_or_a_package_on_two_is_refused(
        stack: Stack, offline_lock: object, monkeypatch: pytest.MonkeyPatch) -> None:
    def down(url: str) -> str:
        raise ConnectionError(url)

    monkeypatch.setattr("imagebuild.locking.index_page", down)
    with pytest.raises(LockError, match=r"cannot read http://127\.0\.0\.1:9/simple/torch/, "
                                        "the index that serves torch"):
        lockflow.lock(stack.load(), check=False, upgrade=False)
    stack.write_spec(SPEC.replace(
        "    - file: uv-0.9.7-py3-none-any.whl\n      url: http://127.0.0.1:9/simple\n",
        "    - file: uv-0.9.7-py3-none-any.whl\n      url: http://127.0.0.1:8/simple\n"
        "      packages: [torch]\n", 1))
    with pytest.raises(SpecError, match="torch is assigned to two indexes"):
        image_inputs(stack.load(), _wheels(stack), "vllm-node")


def test_the_wheel_a_target_installs_is_chosen_by_its_tags() -> None:
    files = list(NUMPY_FILES)
    # a GB10 head (aarch64, glibc 2.28, CPython 3.12): the newest glibc tag it can load
    assert pick_wheel(files, "numpy", "9.9.9", "3.12", "aarch64-manylinux_2_28") == (
        "numpy-9.9.9-cp312-cp312-manylinux_2_28_aarch64.whl")
    assert pick_wheel(files, "numpy", "9.9.9", "3.12", "aarch64-manylinux_2_34") == (
        "numpy-9.9.9-cp312-cp312-manylinux_2_34_aarch64.whl")
    assert pick_wheel(files, "numpy", "9.9.9", "3.12", "aarch64-manylinux_2_17") == (
        "numpy-9.9.9-cp312-cp312-manylinux_2_17_aarch64.whl")
    assert pick_wheel(files, "numpy", "9.9.9", "3.12", "x86_64-manylinux_2_28") == (
        "numpy-9.9.9-cp312-cp312-manylinux_2_17_x86_64.whl")
    assert pick_wheel(files, "numpy", "9.9.9", "3.11", "aarch64-unknown-linux-gnu") == (
        "numpy-9.9.9-cp311-cp311-manylinux_2_28_aarch64.whl")
    # nothing for that interpreter, glibc or version: None, never a near miss
    assert pick_wheel(files, "numpy", "9.9.9", "3.13", "aarch64-manylinux_2_28") is None
    assert pick_wheel(files, "numpy", "9.9.9", "3.12", "aarch64-manylinux_2_12") is None
    assert pick_wheel(files, "numpy", "9.9", "3.12", "aarch64-manylinux_2_28") is None
    # a pure wheel, an abi3 one and a local version: each where an installer ranks it
    mixed = ["torchvision-0.26.0+cu130-cp312-cp312-manylinux_2_28_aarch64.whl",
             "torchvision-0.26.0-cp312-cp312-manylinux_2_28_aarch64.whl",
             "torchvision-0.26.0+cu130-py3-none-any.whl",
             "torchvision-0.26.0+cu130-cp39-abi3-manylinux_2_28_aarch64.whl",
             "not a wheel.whl"]
    assert pick_wheel(mixed, "torchvision", "0.26.0+cu130", "3.12",
                      "aarch64-manylinux_2_28") == mixed[0]
    assert pick_wheel(mixed[2:], "torchvision", "0.26.0+cu130", "3.12",
                      "aarch64-manylinux_2_28") == mixed[3]
    assert pick_wheel(mixed[2:3], "torchvision", "0.26.0+cu130", "3.12",
                      "x86_64-manylinux_2_28") == mixed[2]
    assert pick_wheel(files, "numpy", "9.9.9", "3.12", "aarch64-darwin") is None
    assert tags_best_first("3.12", "aarch64-manylinux2014") == tags_best_first(
        "3.12", "aarch64-manylinux_2_17")


def test_an_override_decides_the_pinned_version_even_where_a_parent_pins_another(
        stack: Stack) -> None:
    inputs = image_inputs(stack.load(), _wheels(stack), "mimo")
    exact = replace(inputs, requirements=(*inputs.requirements, "transformers==4.57.2"))
    # mimo's override (transformers>=5.0.0) replaces tf5's pin: no one version
    assert pinned_version("transformers", exact) is None
    assert pinned_version("torch", exact) == "2.11.0+cu130"  # its override's
    tf5 = image_inputs(stack.load(), _wheels(stack), "tf5")
    assert pinned_version("transformers", tf5) is None  # >=4.57,<5: a range
    assert pinned_version("transformers", replace(
        tf5, requirements=(*tf5.requirements, "transformers==4.57.2"))) == "4.57.2"
    assert exact_version("numpy===1.0") == "1.0" and exact_version("numpy==1.*") is None
