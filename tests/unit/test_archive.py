"""Archives are checked before anything is sent or loaded: the index against the image,
the stream against the sidecar as it passes."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from imagebuild import archive
from imagebuild.archive import ArchiveIndex, TarGuard, allowed_tags_error, manifest_tags
from imagebuild.distribute import docker_pieces
from imagebuild.errors import BackupError
from imagebuild.fsutil import PinnedFile

from ..archives import save_like

LAYERS = [b"base" * 3000, b"middle" * 500, b"top" * 100]


def _read(path: Path) -> ArchiveIndex:
    return ArchiveIndex.read(PinnedFile.open(path))


def _compose(index: ArchiveIndex, skip: int) -> tarfile.TarFile:
    raw = index.file.path.read_bytes()
    data = b"".join(p if isinstance(p, bytes) else raw[p[0]:p[0] + p[1]]
                    for p in docker_pieces(index, skip))
    return tarfile.open(fileobj=io.BytesIO(data))


def test_an_archive_is_checked_against_the_image_it_claims_to_hold(tmp_path: Path) -> None:
    saved = save_like(tmp_path / "a.tar", LAYERS, tags=["vllm-node:abc123abc123"])
    index = _read(saved.path)
    assert index.fingerprint == saved.info.fingerprint and index.diff_ids == tuple(
        saved.diff_ids)
    index.check(saved.info.fingerprint, {"vllm-node:abc123abc123"})
    other = save_like(tmp_path / "b.tar", LAYERS, env="A=2")
    with pytest.raises(BackupError, match="content fingerprint differs"):
        index.check(other.info.fingerprint, {"vllm-node:abc123abc123"})


@pytest.mark.parametrize("tags", [["vllm-node-mimo:latest"], ["nvidia/cuda:13.2.0"],
                                  ["vllm-node:abc123abc123", "vllm-node:latest"]])
def test_an_archive_that_would_move_other_tags_is_refused(tmp_path: Path,
                                                          tags: list[str]) -> None:
    saved = save_like(tmp_path / "a.tar", LAYERS, tags=tags)
    with pytest.raises(BackupError, match=r"would tag .* refusing it"):
        _read(saved.path).check(saved.info.fingerprint, {"vllm-node:abc123abc123"})


@pytest.mark.parametrize("damage", ["no manifest", "two images", "config missing",
                                    "layers differ", "not json", "truncated"])
def test_a_malformed_archive_is_refused_when_indexed(tmp_path: Path, damage: str) -> None:
    saved = save_like(tmp_path / "a.tar", LAYERS)
    data = saved.path.read_bytes()
    with tarfile.open(saved.path) as tf:
        files = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}  # type: ignore[union-attr]
    manifest = json.loads(files["manifest.json"])
    if damage == "truncated":
        saved.path.write_bytes(data[:len(data) // 2])
    else:
        if damage == "no manifest":
            del files["manifest.json"]
        elif damage == "two images":
            files["manifest.json"] = json.dumps(manifest * 2).encode()
        elif damage == "config missing":
            del files[manifest[0]["Config"]]
        elif damage == "layers differ":
            manifest[0]["Layers"] = manifest[0]["Layers"][:2]
            files["manifest.json"] = json.dumps(manifest).encode()
        elif damage == "not json":
            files["manifest.json"] = b"{not json"
        with tarfile.open(saved.path, "w") as tf:
            for name, content in files.items():
                ti = tarfile.TarInfo(name)
                ti.size = len(content)
                tf.addfile(ti, io.BytesIO(content))
    with pytest.raises(BackupError):
        _read(saved.path)


@pytest.mark.parametrize("repeat", ["link", "same"])
def test_a_repeated_layer_keeps_the_file_a_later_layer_needs(tmp_path: Path,
                                                             repeat: str) -> None:
    """Layers 0 and 3 are the same: skipping the first two layers must not drop the
    file layer 3 is (a link to it, or the same blob named twice)."""
    layers = [b"same" * 1000, b"two" * 1000, b"three" * 1000, b"same" * 1000]
    saved = save_like(tmp_path / "a.tar", layers, repeat=repeat)
    index = _read(saved.path)
    with _compose(index, 2) as tf:
        names = tf.getnames()
        for layer in index.layers[2:]:
            data = tf.extractfile(index.member(layer).name)
            assert data is not None and hashlib.sha256(data.read()).hexdigest() in "".join(
                saved.diff_ids)
        assert index.layers[1] not in names  # a layer nothing needs any more is left out
    with _compose(index, 4) as tf:  # everything present: no layer file at all
        assert not [n for n in tf.getnames() if n.endswith("layer.tar")]


# -- the stream guard ------------------------------------------------------------------------


def _guard(saved_path: Path, *, sha: str | None = None, size: int | None = None,
           allowed: set[str] | None = None) -> TarGuard:
    data = saved_path.read_bytes()
    where = str(saved_path)

    def check_meta(name: str, blob: bytes) -> None:
        err = allowed_tags_error(manifest_tags(name, blob, where),
                                 allowed if allowed is not None else {"img:abc"}, where)
        if err:
            raise err

    return TarGuard(where, len(data) if size is None else size,
                    hashlib.sha256(data).hexdigest() if sha is None else sha,
                    check_meta, lambda metas: None)


def _chunks(data: bytes, n: int) -> list[bytes]:
    return [data[i:i + n] for i in range(0, len(data), n)]


@pytest.mark.parametrize("chunk", [1, 7, 511, 512, 4096, 1 << 20])
def test_a_good_stream_passes_through_unchanged(tmp_path: Path, chunk: int,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive, "HOLD", 2048)
    saved = save_like(tmp_path / "a.tar", LAYERS * 3, long_names=True)
    data = saved.path.read_bytes()
    out = b"".join(_guard(saved.path).feed(_chunks(data, chunk)))
    assert out == data


def _released_before_failing(guard: TarGuard, data: bytes, chunk: int = 512
                             ) -> tuple[bytes, BackupError]:
    out = bytearray()
    with pytest.raises(BackupError) as info:
        for piece in guard.feed(_chunks(data, chunk)):
            out += piece
    return bytes(out), info.value


def test_an_altered_stream_is_cut_before_its_tail(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive, "HOLD", 2048)
    saved = save_like(tmp_path / "a.tar", LAYERS * 3)
    data = saved.path.read_bytes()
    good_sha = hashlib.sha256(data).hexdigest()
    bad = bytearray(data)
    bad[len(bad) // 3] ^= 1
    guard = _guard(saved.path, sha=good_sha)
    out, err = _released_before_failing(guard, bytes(bad))
    assert "does not match its sidecar" in err.message and "nothing was loaded" in err.message
    assert len(out) <= len(data) - 2048  # docker load never sees the end of the archive


def test_a_stream_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    saved = save_like(tmp_path / "a.tar", LAYERS)
    data = saved.path.read_bytes()
    _, err = _released_before_failing(_guard(saved.path, size=len(data) + 1), data)
    assert "truncated or altered" in err.message
    _, err = _released_before_failing(_guard(saved.path, size=len(data) - 512), data)
    assert "longer than its sidecar says" in err.message


@pytest.mark.parametrize("first", [False, True])
def test_a_manifest_that_would_move_latest_is_never_released(
        tmp_path: Path, first: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Wherever manifest.json sits, its bytes are held until its tags were checked."""
    monkeypatch.setattr(archive, "HOLD", 1024)
    saved = save_like(tmp_path / "a.tar", LAYERS * 4, tags=["vllm-node-mimo:latest"],
                      manifest_first=first)
    data = saved.path.read_bytes()
    out, err = _released_before_failing(_guard(saved.path), data)
    assert "would tag vllm-node-mimo:latest" in err.message
    assert b"RepoTags" not in out
    if first:
        assert len(out) == 0  # nothing before it was released either


def test_an_oci_index_naming_another_image_is_refused() -> None:
    index = {"manifests": [{"annotations": {"io.containerd.image.name":
                                            "docker.io/library/vllm-node:latest"}}]}
    tags = manifest_tags("index.json", json.dumps(index).encode(), "x.tar")
    assert tags == ["docker.io/library/vllm-node:latest"]
    assert allowed_tags_error(tags, {"vllm-node:abc"}, "x.tar") is not None
    with pytest.raises(BackupError, match=r"index\.json is malformed"):
        manifest_tags("index.json", b"[1, 2]", "x.tar")
