"""The layer store on the bed (issue 18, first part): the three images of a cold build
saved into one store write each shared layer once, and a generation directory loads
with plain tools (tar | docker load) into an engine that does not have the image, on
either image store."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from imagebuild.engine_docker import DockerEngine
from imagebuild.layerstore import BlobStore, ingest_save
from imagebuild.naming import hash12, input_hash

from .conftest import HEAD_STORES, MiniStack

pytestmark = pytest.mark.bed

NAMES = ["vllm-node", "vllm-node-tf5", "vllm-node-mimo"]


@pytest.mark.parametrize("head_store", HEAD_STORES)
def test_shared_layers_are_written_once_and_a_generation_loads_with_plain_tools(
        mini: MiniStack, tmp_path: Path, head_store: str) -> None:
    r = mini.cli("build", "--no-backup")
    assert r.returncode == 0, r.stdout + r.stderr
    engine = DockerEngine(mini.bed.docker_host)
    store = BlobStore(tmp_path / "backups")
    written, read, gens = [], [], {}
    for name in NAMES:
        info = engine.require(f"{name}:latest")
        tag = f"{name}:{hash12(input_hash(info) or '')}"
        got = ingest_save(store, engine.save(tag), {tag: (name, tag.split(":")[1])})
        (gen,) = got.generations
        gens[name] = (gen, info)
        written.append(got.written)
        read.append(got.read)
        # every layer of the image is in the generation, linked to its blob
        assert len(gen.layers) == len(info.diff_ids)
        for path, digest, size in gen.layers:
            f = gen.path / path
            assert f.stat().st_size == size
            assert f.samefile(store.path(digest))
    # tf5 and mimo repeat node's layers: they are read again, never written again
    assert written[0] > 0.5 * read[0]  # the first image brings the base: mostly new
    assert written[1] < 0.05 * read[1] and written[2] < 0.5 * read[2], (written, read)
    blob_bytes = sum(p.stat().st_size for p in store.blobs.iterdir())
    assert blob_bytes < 0.5 * sum(read)  # the three saves hold the base three times
    assert not list(store.incoming_dir.glob("*"))
    # the same generation again: nothing written, the directory kept
    name = "vllm-node-mimo"
    gen, info = gens[name]
    tag = f"{name}:{gen.hash12}"
    again = ingest_save(store, engine.save(tag), {tag: (name, gen.hash12)})
    assert again.written == 0 and again.generations[0].path == gen.path

    # the documented one-liner, into the other head (it has never seen this stack)
    other = mini.on(next(s for s in HEAD_STORES if s != head_store)).bed
    target = DockerEngine(other.docker_host)
    assert target.inspect(tag) is None
    tar = subprocess.Popen(["tar", "-C", str(gen.path), "-cf", "-", "."],
                           stdout=subprocess.PIPE)
    load = subprocess.run(["docker", "-H", other.docker_host, "load"], stdin=tar.stdout,
                          capture_output=True, text=True, timeout=600)
    assert tar.stdout is not None
    tar.stdout.close()
    assert tar.wait() == 0
    assert load.returncode == 0, load.stderr
    assert f"Loaded image: {tag}" in load.stdout
    loaded = target.require(tag)
    try:
        assert loaded.fingerprint == info.fingerprint  # the same content on the other store
        assert loaded.labels == info.labels
    finally:
        target.remove_image(tag)
    # the generation's manifest names this image alone
    manifest = json.loads((gen.path / "manifest.json").read_text())
    assert [m["RepoTags"] for m in manifest] == [[tag]]
