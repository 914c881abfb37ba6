"""imagebuild build on the real head engine, with private copies of the test stack."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from imagebuild import context, ops
from imagebuild.build import decide, execute
from imagebuild.derivation import plan
from imagebuild.engine_docker import DockerEngine
from imagebuild.naming import HASH_LABEL, IMAGE_LABEL
from imagebuild.progress import Progress

from ..fake_engine import dockerfile_labels
from .conftest import HEAD_STORES, NODE_WHEELS, MiniStack, testbed

pytestmark = pytest.mark.bed

NAMES = ["vllm-node", "vllm-node-tf5", "vllm-node-mimo"]


class CountingEngine(DockerEngine):
    def __init__(self) -> None:
        super().__init__()
        self.builds: list[str] = []

    def build(self, context, *, buildargs, nocache=False):  # type: ignore[no-untyped-def]
        data, labels = _read_context(context)
        self.builds.append(labels[IMAGE_LABEL])
        return super().build(iter([data]), buildargs=buildargs, nocache=nocache)


def _read_context(context: object) -> tuple[bytes, dict[str, str]]:
    """A build context (a few small files) and the labels its Dockerfile carries."""
    data = b"".join(context)  # type: ignore[call-overload]
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        dockerfile = tf.extractfile("Dockerfile").read().decode()  # type: ignore[union-attr]
    return data, dockerfile_labels(dockerfile)


def _build(mini: MiniStack, names: list[str]) -> tuple[CountingEngine, dict[str, str]]:
    """The build workflow (gate included, no backups) through an engine that counts."""
    engine = CountingEngine()
    result = ops.build_images(context.load(str(mini.spec)), engine, names, backup=False,
                       progress=Progress())
    assert result.error() is None and result.report is not None
    return engine, {n: i.id for n, i in result.report.images.items()}


def _hashes(mini: MiniStack) -> dict[str, str]:
    r = mini.cli("plan", "--json")
    assert r.returncode == 0, r.stderr
    return {i["name"]: i["input_hash"] for i in json.loads(r.stdout)["images"]}


FREEZES: dict[str, set[str]] = {}  # head store -> pip freeze of a cold-built mimo


def _freeze(image: str) -> set[str]:
    """What is installed in an image, as canonical name==version."""
    out = _run(image, "import importlib.metadata as m, re; print('\\n'.join("
                      "re.sub(r'[-_.]+', '-', d.metadata['Name']).lower() + '==' + d.version "
                      "for d in m.distributions()))")
    return set(out.split())


def _containers_but_roots() -> list[str]:
    """Containers on the head other than imagebuild's GC-root holders."""
    out = subprocess.run(["docker", "ps", "-a", "--format",
                          '{{.ID}} {{.Label "org.imagebuild.root"}}'],
                         capture_output=True, text=True, check=True).stdout
    return [ln.split()[0] for ln in out.splitlines() if len(ln.split()) == 1]


def _run(image: str, code: str) -> str:
    r = subprocess.run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "python3",
                        image, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.parametrize("head_store", HEAD_STORES)
def test_cold_build_lineage_labels_and_the_real_torch(mini: MiniStack) -> None:
    hashes = _hashes(mini)
    r = mini.cli("build", "mimo")
    assert r.returncode == 0, r.stderr
    assert "built 3, restored 0, reused 0" in r.stdout
    engine = DockerEngine()
    infos = {n: engine.require(f"{n}:{hashes[n][:12]}") for n in NAMES}
    # lineage: each image is its parent's exact derivation plus layers
    node, tf5, mimo = (infos[n] for n in NAMES)
    assert tf5.diff_ids[: len(node.diff_ids)] == node.diff_ids
    assert mimo.diff_ids[: len(tf5.diff_ids)] == tf5.diff_ids
    # (>=: the containerd store records no layer for a RUN that changed no file)
    assert len(mimo.diff_ids) > len(tf5.diff_ids) >= len(node.diff_ids)
    assert len({node.fingerprint, tf5.fingerprint, mimo.fingerprint}) == 3
    lock = {w.name: w for w in context.load(str(mini.spec)).lock.wheels}
    for n in NAMES:
        labels = infos[n].labels
        assert labels[HASH_LABEL] == hashes[n]
        assert labels[IMAGE_LABEL] == n
        assert labels["org.imagebuild.version"]
        assert "org.imagebuild.git-commit" not in labels  # this copy is not in a git repo
        assert engine.require(f"{n}:latest").id == infos[n].id
    assert mimo.labels["org.imagebuild.wheel.vllm"] == (
        f"{lock['vllm'].version} sha256:{lock['vllm'].sha256}")
    assert mimo.labels["org.imagebuild.wheel.torch"].endswith(lock["torch"].sha256 or "?")
    # torch from its own group in vllm-node, never replaced by anything installed later
    assert _run(mimo.id, "import torch; print(torch.__version__, torch.version.cuda)") == (
        "2.11.0+cu130 13.0")
    assert _run(mimo.id, "import transformers; print(transformers.__version__)") == "5.0.0"
    assert _run(tf5.id, "import transformers; print(transformers.__version__)") == "4.57.1"
    # each image holds exactly its lock (the base's own distributions aside), so two cold
    # builds from the same lock install the same sets
    closures = context.load(str(mini.spec)).lock.closures
    for n in NAMES:
        locked = {f"{p.name}=={p.version}" for p in closures[n].packages}
        freeze = _freeze(infos[n].id)
        assert locked <= freeze, (n, locked - freeze)
        assert {f for f in freeze if f.split("==")[0] in {p.name for p in
                                                          closures[n].packages}} == locked
    FREEZES[mini.bed.head_store] = _freeze(mimo.id)
    if len(FREEZES) == 2:  # both heads built mimo cold from the same lock: the same set
        assert FREEZES["classic"] == FREEZES["containerd"]
    # a log per image and hash, whose path was printed
    for n in NAMES:
        log = mini.root / "state" / "logs" / f"{n}-{hashes[n][:12]}.log"
        assert log.is_file() and str(log) in r.stderr
    node_log = (mini.root / "state" / "logs" / f"vllm-node-{hashes['vllm-node'][:12]}.log"
                ).read_text()
    assert "Step" in node_log
    # the wheels came from imagebuild's loopback server, and no layer holds a wheel file:
    # every COPY of the lineage is a small generated file
    # (docker wraps each stderr write in colour codes: strip them, a line may be cut by one)
    assert "(from http://127.0.0.1:" in re.sub(r"\x1b\[[0-9;]*m", "", node_log)
    assert int(node_log.split("# wheel server: ")[1].split()[0]) > 0
    history = subprocess.run(["docker", "history", "--no-trunc", "--human=false", "--format",
                              "{{.Size}}\t{{.CreatedBy}}", mimo.id],
                             capture_output=True, text=True, check=True).stdout.splitlines()
    copies = [h for h in history if "COPY" in h]
    # uv, the five install groups' files and the node script (node), the five groups'
    # files (tf5, mimo)
    assert len(copies) == 17, history
    # bytes, not wheels (the containerd store counts the layer tar: a few blocks)
    assert all(int(h.split("\t")[0]) < 65536 for h in copies), copies
    # built once, then found by input hash: nothing is built again
    r = mini.cli("build", "mimo")
    assert r.returncode == 0 and "built 0, restored 0, reused 3" in r.stdout, r.stderr
    assert {n: engine.require(f"{n}:latest").id for n in NAMES} == {
        n: infos[n].id for n in NAMES}


def test_git_commit_label_source() -> None:
    from imagebuild.git import git_commit

    from .conftest import REPO

    commit = git_commit(REPO)
    assert commit is not None and len(commit.removesuffix("-dirty")) == 40


def test_second_build_makes_no_build_call_and_changes_nothing(mini: MiniStack) -> None:
    engine, first = _build(mini, ["mimo"])
    assert engine.builds == NAMES
    engine, second = _build(mini, ["mimo"])
    assert engine.builds == []
    assert second == first
    r = mini.cli("build", "mimo")
    assert r.returncode == 0 and "built 0, restored 0, reused 3" in r.stdout
    r = mini.cli("build", "--dry-run", "mimo")
    assert r.returncode == 0
    assert r.stdout.count("reuse") == 3


def test_a_removed_hash_tag_is_found_again_by_label(mini: MiniStack) -> None:
    _, first = _build(mini, ["tf5"])
    h = _hashes(mini)["vllm-node-tf5"][:12]
    subprocess.run(["docker", "rmi", f"vllm-node-tf5:{h}"], check=True, capture_output=True)
    engine, again = _build(mini, ["tf5"])
    assert engine.builds == []
    assert again == first


def _layer_paths(image: str) -> list[set[str]]:
    """The paths each layer of ``image`` holds, in order (from ``docker save``, streamed:
    no layer is held in memory)."""
    by_member: dict[str, set[str]] = {}
    manifest: list[dict[str, object]] = []
    save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
    assert save.stdout is not None
    with tarfile.open(fileobj=save.stdout, mode="r|") as outer:
        for member in outer:
            f = outer.extractfile(member) if member.isfile() else None
            if f is None:
                continue
            if member.name == "manifest.json":
                manifest = json.loads(f.read())
            elif member.name.endswith("layer.tar") or member.name.startswith("blobs/"):
                try:
                    with tarfile.open(fileobj=f, mode="r|*") as layer:
                        by_member[member.name] = {m.name for m in layer}
                except tarfile.ReadError:  # a config or manifest blob, not a layer
                    continue
    assert save.wait() == 0
    return [by_member[str(name)] for name in manifest[0]["Layers"]]  # type: ignore[union-attr]


def _holding(layers: list[set[str]], part: str) -> list[int]:
    return [i for i, paths in enumerate(layers) if any(part in p for p in paths)]


@pytest.mark.parametrize("head_store", HEAD_STORES)
def test_a_new_vllm_rebuilds_only_its_group_and_mimo_holds_one_torch(mini: MiniStack) -> None:
    _, first = _build(mini, ["mimo"])
    engine = DockerEngine()
    node, tf5, _ = (engine.require(first[n]) for n in NAMES)
    layers = _layer_paths(first["vllm-node-mimo"])
    # one torch: the layer of node's torch group, and no other layer writes torch/
    assert len(_holding(layers, "-packages/torch/")) == 1
    assert _holding(layers, "-packages/torch/")[0] < len(node.diff_ids)
    # the children install only their difference: tf5's lock is node's (nothing), mimo
    # adds transformers 5; vllm and flashinfer are never installed twice
    for part in ("-packages/vllm/", "-packages/flashinfer/", "-packages/flashinfer_cubin/"):
        assert len(_holding(layers, part)) == 1, part
        assert _holding(layers, part)[0] < len(node.diff_ids), part
    mimo_own = set().union(*layers[len(tf5.diff_ids):])
    tops = {p.split("-packages/", 1)[1].split("/")[0] for p in mimo_own if "-packages/" in p}
    # (a whiteout where transformers 4.57.1's files were)
    assert tops and all(t.removeprefix(".wh.").startswith("transformers") for t in tops), tops
    # a new vllm wheel: all three rebuild, and node keeps every layer below its vllm group
    testbed.make_wheel(mini.root / "wheels", "vllm", testbed.VLLM_VERSION,
                       {"vllm/__init__.py": testbed.VLLM_INIT.format(
                           version=testbed.VLLM_VERSION) + "# rebuilt\n"},
                       requires=["torch==2.10.0", "transformers<5,>=4.56.0"])
    r = mini.cli("lock")
    assert r.returncode == 0, r.stderr
    engine2, second = _build(mini, ["mimo"])
    assert engine2.builds == NAMES
    node2 = engine.require(second["vllm-node"])
    assert len(node2.diff_ids) == len(node.diff_ids)
    # the vllm group is the last install group: its COPY and RUN are new, and what
    # follows it (the declared node script's COPY); every layer below is the builder
    # cache's, byte for byte (the flashinfer group's too: the wheel server's URL, a
    # build arg, was the same)
    differ = [i for i, (a, b) in enumerate(zip(node.diff_ids, node2.diff_ids, strict=True))
              if a != b]
    assert differ == list(range(len(node.diff_ids) - len(differ), len(node.diff_ids)))
    assert 2 <= len(differ) <= 4, differ  # vllm's COPY and RUN, the script, a WORKDIR
    log = (mini.root / "state" / "logs" / f"vllm-node-{_hashes(mini)['vllm-node'][:12]}.log"
           ).read_text()
    assert log.count("Using cache") >= 10, log
    assert _run(second["vllm-node-mimo"],
                "import torch; print(torch.__version__, torch.version.cuda)") == (
        "2.11.0+cu130 13.0")


def test_touching_one_wheel_rebuilds_only_the_images_that_install_it(mini: MiniStack) -> None:
    # node installs three wheels; only mimo also installs flashinfer-jit-cache
    mini.edit_spec(NODE_WHEELS, NODE_WHEELS.replace(", flashinfer-jit-cache]", "]"))
    assert mini.cli("lock").returncode == 0
    _, first = _build(mini, ["mimo"])
    before = _hashes(mini)
    testbed.make_wheel(mini.root / "wheels", "flashinfer-jit-cache", "0.6.12",
                       {"flashinfer_jit_cache/__init__.py": '__version__ = "0.6.12"  # rebuilt\n'})
    r = mini.cli("lock")
    assert r.returncode == 0, r.stderr
    after = _hashes(mini)
    assert {n for n in NAMES if before[n] != after[n]} == {"vllm-node-mimo"}
    engine, second = _build(mini, ["mimo"])
    assert engine.builds == ["vllm-node-mimo"]
    assert second["vllm-node"] == first["vllm-node"]
    assert second["vllm-node-tf5"] == first["vllm-node-tf5"]
    assert second["vllm-node-mimo"] != first["vllm-node-mimo"]
    # and a wheel node installs rebuilds all three
    testbed.make_wheel(mini.root / "wheels", "flashinfer-cubin", "0.6.12",
                       {"flashinfer_cubin/__init__.py": '__version__ = "0.6.12"  # rebuilt\n'})
    assert mini.cli("lock").returncode == 0
    engine, _ = _build(mini, ["mimo"])
    assert engine.builds == NAMES


def test_a_corrupted_wheel_is_refused_before_the_engine_is_touched(mini: MiniStack) -> None:
    wheel = next((mini.root / "wheels").glob("flashinfer_cubin-*.whl"))
    data = bytearray(wheel.read_bytes())
    data[100] ^= 0xFF
    wheel.write_bytes(bytes(data))
    images_before = set(subprocess.run(["docker", "images", "-aq"], capture_output=True,
                                       text=True).stdout.split())
    r = mini.cli("build", "mimo")
    assert r.returncode == 3
    assert str(wheel) in r.stderr
    assert "expected sha256" in r.stderr and "actual   sha256" in r.stderr
    engine = CountingEngine()
    ctx = context.load(str(mini.spec))
    from imagebuild.errors import WheelHashMismatch

    with pytest.raises(WheelHashMismatch):
        execute(ctx.spec, engine, decide(engine, plan(ctx.spec, ctx.lock, ["mimo"]), set()),
                progress=Progress())
    assert engine.builds == []
    assert set(subprocess.run(["docker", "images", "-aq"], capture_output=True,
                              text=True).stdout.split()) == images_before


class SwappingEngine(DockerEngine):
    """Changes a wheel after imagebuild checked it and started serving it, just before
    the build: the moment a COPY-free build has to guard. ``how``: "rename" puts another
    file in its place; "in place" rewrites its bytes and puts its mtime back."""

    def __init__(self, wheel: Path, how: str) -> None:
        super().__init__()
        self.wheel, self.how = wheel, how

    def build(self, context, *, buildargs, nocache=False):  # type: ignore[no-untyped-def]
        context, labels = _read_context(context)
        if labels[IMAGE_LABEL] == "vllm-node":
            if self.how == "rename":
                new = self.wheel.with_suffix(".swapped")
                new.write_bytes(self.wheel.read_bytes() + b"appended after the check")
                os.replace(new, self.wheel)
            else:
                st = self.wheel.stat()
                with self.wheel.open("r+b") as f:
                    f.seek(st.st_size - 30)
                    f.write(b"X" * 10)
                os.utime(self.wheel, ns=(st.st_atime_ns, st.st_mtime_ns))
        return super().build(iter([context]), buildargs=buildargs, nocache=nocache)


def test_a_wheel_changed_after_the_check_is_never_what_is_served(mini: MiniStack) -> None:
    from imagebuild.errors import BuildFailed

    wheel = next((mini.root / "wheels").glob("flashinfer_cubin-*.whl"))
    checked = wheel.read_bytes()
    ctx = context.load(str(mini.spec))
    spec = ctx.spec
    derivations = plan(spec, ctx.lock, ["node"])
    # rewritten in place, mtime put back: refused, the build fails, nothing is tagged
    engine = SwappingEngine(wheel, "in place")
    with pytest.raises(BuildFailed) as info:
        execute(spec, engine, decide(engine, derivations, set()), progress=Progress())
    assert f"{wheel} changed after it was checked against wheels.lock" in str(info.value)
    assert engine.inspect(derivations[0].tag) is None
    # renamed over: the build is served the bytes that were checked, from the open file
    wheel.write_bytes(checked)
    engine = SwappingEngine(wheel, "rename")
    report = execute(spec, engine, decide(engine, derivations, set()), progress=Progress())
    assert report.built == ["vllm-node"] and wheel.read_bytes() != checked
    image = engine.require(derivations[0].tag)
    assert _run(image.id, "import flashinfer_cubin; print(flashinfer_cubin.__version__)") == (
        "0.6.12")


@pytest.mark.parametrize("head_store", HEAD_STORES)
def test_a_failing_run_leaves_no_tag_and_reports_the_step(mini: MiniStack) -> None:
    tpl = mini.root / "templates" / "vllm-node-tf5.Dockerfile.j2"
    tpl.write_text(tpl.read_text() + "\nRUN echo about to fail && exit 3\n")
    hashes = _hashes(mini)
    r = mini.cli("build", "mimo")
    assert r.returncode == 5, r.stderr
    assert "vllm-node-tf5: build failed at Step" in r.stderr
    assert "RUN echo about to fail && exit 3" in r.stderr
    assert "about to fail" in r.stderr  # the last lines of the step's output
    log = mini.root / "state" / "logs" / f"vllm-node-tf5-{hashes['vllm-node-tf5'][:12]}.log"
    assert f"full log: {log}" in r.stderr and log.is_file()
    engine = DockerEngine()
    assert engine.inspect(f"vllm-node-tf5:{hashes['vllm-node-tf5'][:12]}") is None
    assert engine.inspect(f"vllm-node-mimo:{hashes['vllm-node-mimo'][:12]}") is None
    node = engine.require(f"vllm-node:{hashes['vllm-node'][:12]}")
    assert not _containers_but_roots()
    # a rerun continues from there: node is reused
    r = mini.cli("build", "--dry-run", "mimo")
    assert f"reuse {node.id[7:19]}" in r.stdout


def test_ctrl_c_leaves_no_tag_and_no_container(mini: MiniStack) -> None:
    tpl = mini.root / "templates" / "vllm-node-tf5.Dockerfile.j2"
    tpl.write_text(tpl.read_text() + "\nRUN echo sleeping && sleep 60\n")
    hashes = _hashes(mini)
    env = dict(os.environ, DOCKER_HOST=mini.bed.docker_host, IMAGEBUILD_BED=str(mini.bed.root))
    # Ctrl-C as a terminal sends it. The child must not inherit an ignored SIGINT: a shell
    # without job control starts background commands (a CI runner's, `cmd &`) with SIGINT
    # ignored, and Python then keeps it ignored.
    proc = subprocess.Popen([sys.executable, "-m", "imagebuild", "-f", str(mini.spec), "build",
                             "mimo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log = mini.root / "state" / "logs" / f"vllm-node-tf5-{hashes['vllm-node-tf5'][:12]}.log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if log.is_file() and "sleeping" in log.read_text():
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the slow step never started")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "no tag was written" in err
    engine = DockerEngine()
    assert engine.inspect(f"vllm-node-tf5:{hashes['vllm-node-tf5'][:12]}") is None
    assert engine.inspect(f"vllm-node:{hashes['vllm-node'][:12]}") is not None
    deadline = time.monotonic() + 30
    while _containers_but_roots():
        assert time.monotonic() < deadline, "the build container was left behind"
        time.sleep(0.5)


def test_rebuild_forces_a_build_on_a_hash_match(mini: MiniStack) -> None:
    _build(mini, ["tf5"])
    r = mini.cli("build", "--rebuild", "tf5")
    assert r.returncode == 0, r.stderr
    assert "built 1, restored 0, reused 1" in r.stdout


def test_missing_base_image_is_a_clear_error(mini: MiniStack) -> None:
    mini.edit_spec("base: imagebuild-bed/bookworm-python:1", "base: imagebuild-bed/absent:1")
    r = mini.cli("build", "node")
    assert r.returncode == 6
    assert "imagebuild-bed/absent:1 is not present" in r.stderr and "docker pull" in r.stderr


def test_unresolved_hash_refuses_to_build(mini: MiniStack) -> None:
    lock = mini.root / "wheels.lock"
    text = lock.read_text()
    sha = context.load(str(mini.spec)).lock.get("flashinfer-cubin").sha256
    lock.write_text(text.replace(f'sha256 = "{sha}"', 'sha256 = "unresolved"'))
    r = mini.cli("build", "mimo")
    assert r.returncode == 2
    assert "unresolved" in r.stderr and "imagebuild lock" in r.stderr


def test_engine_down_is_a_clear_error(mini: MiniStack, tmp_path: Path) -> None:
    env = dict(os.environ, DOCKER_HOST=f"unix://{tmp_path}/nothing.sock")
    r = subprocess.run([sys.executable, "-m", "imagebuild", "-f", str(mini.spec), "build"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 4
    assert "cannot reach the Docker engine" in r.stderr
