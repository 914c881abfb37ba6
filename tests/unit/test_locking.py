"""The closure lock step without uv: inputs, the metadata conflict check, --check and
--upgrade plumbing, the lock file reader. uv itself runs in tests/integration/test_lock.py."""

from __future__ import annotations

import pytest

from imagebuild import context, lockflow
from imagebuild import locking as imagebuild_locking
from imagebuild.closure import LockedDist, _seal, format_closure, read_closure
from imagebuild.errors import LockConflict, LockError, SpecError
from imagebuild.lock import parse_wheel, read_lock
from imagebuild.locking import image_inputs

from .conftest import CLOSURE, SPEC, Stack, _dist


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


def test_each_index_serves_only_the_packages_assigned_to_it(
        stack: Stack, offline_lock: dict[str, list[LockedDist]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # numpy resolved from the torch index (the pytorch index mirrors numpy, jinja2, ...):
    # PyPI, the index that serves numpy, does not list that file
    squatted = _dist("numpy", "9.9.9", "9" * 64)
    offline_lock["vllm-node"].append(squatted)
    real_page = imagebuild_locking.index_page

    def page(url: str) -> str:
        if url == "https://pypi.org/simple/numpy/":
            return '<a href="numpy-2.2.6-py3-none-any.whl#sha256=' + "8" * 64 + '">x</a>'
        return real_page(url)

    monkeypatch.setattr("imagebuild.locking.index_page", page)
    texts = {p: p.read_text() for p in (stack.root / "locks").iterdir()}
    with pytest.raises(LockError) as info:
        lockflow.lock(stack.load(), check=False, upgrade=False)
    assert info.value.exit_code == 2
    assert ("numpy 9.9.9 (numpy-9.9.9-py3-none-any.whl) is not a file "
            "https://pypi.org/simple lists: another index served it") in info.value.message
    assert "torch" not in info.value.message.split("\n", 1)[1]  # torch is its index's
    assert all(p.read_text() == t for p, t in texts.items())  # nothing written
    # assigned to the torch index (as torchvision is in the real spec): it may serve it
    monkeypatch.setattr("imagebuild.locking.index_page", lambda url: (
        '<a href="numpy-9.9.9-py3-none-any.whl#sha256=' + "9" * 64 + '">x</a>'
        if url == "http://127.0.0.1:9/simple/numpy/" else page(url)))
    stack.write_spec(SPEC.replace("      url: http://127.0.0.1:9/simple\n",
                                  "      url: http://127.0.0.1:9/simple\n"
                                  "      packages: [numpy]\n", 1))
    inputs = image_inputs(stack.load(), _wheels(stack), "vllm-node")
    assert inputs.assigned == {"torch": "http://127.0.0.1:9/simple",
                               "numpy": "http://127.0.0.1:9/simple",
                               "uv": "http://127.0.0.1:9/simple"}
    asked: list[str] = []
    assigned_page = imagebuild_locking.index_page
    monkeypatch.setattr("imagebuild.locking.index_page",
                        lambda url: asked.append(url) or assigned_page(url))
    lockflow.lock(stack.load(), check=False, upgrade=False)
    node = read_closure(stack.load().closure_lock_path("vllm-node"), "vllm-node")
    assert node.by_name()["numpy"].version == "9.9.9"
    # each index page read once for the three images, whose closures share it
    assert asked and len(asked) == len(set(asked))


def test_an_index_that_cannot_be_read_or_a_package_on_two_is_refused(
        stack: Stack, offline_lock: object, monkeypatch: pytest.MonkeyPatch) -> None:
    def down(url: str) -> str:
        raise ConnectionError(url)

    monkeypatch.setattr("imagebuild.locking.index_page", down)
    with pytest.raises(LockError, match=r"cannot read https://pypi\.org/simple/"):
        lockflow.lock(stack.load(), check=False, upgrade=False)
    stack.write_spec(SPEC.replace(
        "    - file: uv-0.9.7-py3-none-any.whl\n      url: http://127.0.0.1:9/simple\n",
        "    - file: uv-0.9.7-py3-none-any.whl\n      url: http://127.0.0.1:8/simple\n"
        "      packages: [torch]\n", 1))
    with pytest.raises(SpecError, match="torch is assigned to two indexes"):
        image_inputs(stack.load(), _wheels(stack), "vllm-node")
