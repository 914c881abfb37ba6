"""The engine interface on real engines: the head's through the docker SDK, the workers'
over OpenSSH (a classic-store worker and the containerd-store one), answering alike."""

from __future__ import annotations

import io
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from imagebuild.engine import Engine
from imagebuild.engine_docker import DockerEngine
from imagebuild.engine_ssh import SshEngine
from imagebuild.errors import EngineError, ImageNotFound, RemoteError
from imagebuild.fsutil import PinnedFile
from imagebuild.remote import Target
from imagebuild.streams import FileRange

from .conftest import Bed, testbed

pytestmark = pytest.mark.bed


def _worker(bed: Bed, name: str) -> SshEngine:
    return SshEngine(Target(name=name, host=name, config=str(bed.ssh_config)))


def _labelled_image(head: DockerEngine, label: str) -> str:
    """A small image on the head: the bed's base plus a label and a file."""
    dockerfile = (f"FROM {testbed.BASE_IMAGE}\nLABEL org.imagebuild.test={label}\n"
                  f"RUN echo {label} > /marker\n").encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("Dockerfile")
        ti.size = len(dockerfile)
        tf.addfile(ti, io.BytesIO(dockerfile))
    events = list(head.build(iter([buf.getvalue()]), buildargs={}))
    [done] = [e for e in events if e.kind == "done"]
    return done.image_id


@pytest.fixture
def head(bed_env: Bed) -> DockerEngine:
    return DockerEngine()


@pytest.mark.parametrize("worker_name, store", [("w1", "classic"), ("c1", "containerd")])
def test_a_worker_engine_answers_like_the_heads(bed_env: Bed, head: DockerEngine,
                                                tmp_path: Path, worker_name: str,
                                                store: str) -> None:
    testbed.cmd_reset_workers()
    worker = _worker(bed_env, worker_name)
    assert worker.info().store == store and head.info().store == "classic"
    label = uuid.uuid4().hex[:12]
    image_id = _labelled_image(head, label)
    mine = head.require(image_id)
    head.tag(image_id, "imagebuild-engine-test", label)
    # load a saved archive given as byte ranges of a file (sendfile over ssh)
    tar = tmp_path / "image.tar"
    with tar.open("wb") as f:
        for chunk in head.save(f"imagebuild-engine-test:{label}"):
            f.write(chunk)
    size = tar.stat().st_size
    seen: list[int] = []
    with PinnedFile.open(tar) as pinned:
        sent = worker.load_archive([FileRange(pinned, 0, size // 2),
                                    FileRange(pinned, size // 2, size - size // 2)],
                                   seen.append)
    assert sent == size and seen[-1] == size
    theirs = worker.require(f"imagebuild-engine-test:{label}")
    assert theirs.fingerprint == mine.fingerprint
    assert (theirs.id == mine.id) == (store == "classic")  # the stores name content apart
    assert [i.id for i in worker.find_by_label("org.imagebuild.test", label)] == [theirs.id]
    assert worker.find_by_label("org.imagebuild.test", "no-such-value") == []
    assert theirs.id in {i.id for i in worker.snapshot().images}
    # tag, inspect, remove; absent is None, not an error
    worker.tag(theirs.id, "imagebuild-engine-test", "second")
    assert "imagebuild-engine-test:second" in worker.require(theirs.id).tags
    worker.remove_image("imagebuild-engine-test:second")
    assert worker.inspect("imagebuild-engine-test:second") is None
    worker.remove_image("imagebuild-engine-test:never-was")
    assert worker.inspect("imagebuild-engine-test:never-was") is None
    # checks run there as on the head: exec form, no network, killed at the timeout
    r = worker.run_check(theirs.id, ["cat", "/marker"], timeout=60)
    assert (r.exit_code, r.stdout.strip(), r.timed_out) == (0, label, False)
    r = worker.run_check(theirs.id, ["python3", "-c", "import sys; sys.exit(3)"], timeout=60)
    assert r.exit_code == 3 and not r.timed_out
    started = time.monotonic()
    r = worker.run_check(theirs.id, ["sleep", "300"], timeout=2)
    assert r.timed_out and r.exit_code is None and time.monotonic() - started < 60
    left = bed_env.ssh(worker_name, "docker", "ps", "-aq", "--filter",
                       "label=org.imagebuild.check")
    assert left.stdout.strip() == ""  # the killed check's container is gone
    with pytest.raises(ImageNotFound):
        worker.run_check("imagebuild-engine-test:never-was", ["true"], timeout=30)
    # save streams back; the stream loads on the head as the same content
    head.remove_image(f"imagebuild-engine-test:{label}")
    loaded = head.load(worker.save(f"imagebuild-engine-test:{label}"))
    assert loaded and head.require(f"imagebuild-engine-test:{label}").fingerprint == (
        mine.fingerprint)
    with pytest.raises(ImageNotFound):
        list(worker.save("imagebuild-engine-test:never-was"))
    with pytest.raises(EngineError, match="built on the head"):
        list(worker.build([b""], buildargs={}))
    head.remove_image(f"imagebuild-engine-test:{label}")


def test_an_unreachable_worker_is_a_remote_error_naming_it(bed_env: Bed) -> None:
    dead = SshEngine(Target(name="w9", host="127.0.0.99", port=2222,
                            config=str(bed_env.ssh_config)))
    engine: Engine = dead
    with pytest.raises(RemoteError, match=r"w9 \(127\.0\.0\.99\): unreachable over ssh"):
        engine.snapshot()
    with pytest.raises(RemoteError, match="unreachable"):
        engine.inspect("anything:1")
