"""The layer store's blobs: a file of a save stream is written only when the store lacks
its bytes (named by digest, or matched against the stored blobs of its size)."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pytest

from imagebuild import layerstore
from imagebuild.errors import BackupError
from imagebuild.layerstore import BlobStore, ingest_save

from ..archives import save_like


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put(store: BlobStore, data: bytes, named: str | None = None,
        sizes: dict[int, list[str]] | None = None) -> layerstore.Ingested:
    return store.ingest(io.BytesIO(data).read, len(data), named=named, sizes=sizes)


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> BlobStore:
    monkeypatch.setattr(layerstore, "CHUNK", 16)  # many chunks from small test files
    return BlobStore(tmp_path / "backups")


def test_a_new_unnamed_layer_is_written_once_and_named_by_its_digest(store: BlobStore
                                                                     ) -> None:
    data = os.urandom(100)
    got = put(store, data)
    assert (got.digest, got.size, got.written) == (sha(data), 100, 100)
    assert store.path(sha(data)).read_bytes() == data
    again = put(store, data)
    assert (again.digest, again.written) == (sha(data), 0)
    assert not list(store.incoming_dir.glob("*"))


def test_a_layer_that_diverges_from_a_same_size_blob_late_is_written_whole(
        store: BlobStore) -> None:
    old = os.urandom(100)
    put(store, old)
    new = old[:70] + bytes(b ^ 1 for b in old[70:])  # diverges in the 5th chunk
    got = put(store, new)
    assert got.digest == sha(new) and got.written == 100
    assert store.path(sha(new)).read_bytes() == new  # the prefix copied, the rest streamed
    assert store.path(sha(old)).read_bytes() == old


@pytest.mark.parametrize("where", [0, 15, 16, 99])
def test_divergence_at_any_offset_gives_the_right_bytes(store: BlobStore, where: int) -> None:
    old = os.urandom(100)
    put(store, old)
    new = bytearray(old)
    new[where] ^= 0xFF
    got = put(store, bytes(new))
    assert store.path(got.digest).read_bytes() == bytes(new)
    assert got.digest == sha(bytes(new))


def test_of_two_same_size_candidates_the_matching_one_is_found(store: BlobStore) -> None:
    a, b = os.urandom(64), os.urandom(64)
    put(store, a)
    put(store, b)
    sizes = store.by_size()
    assert sorted(sizes[64]) == sorted([sha(a), sha(b)])
    assert put(store, b, sizes=sizes).written == 0
    c = a[:40] + b[40:]  # follows a, then b: neither
    got = put(store, c, sizes=sizes)
    assert got.written == 64 and store.path(sha(c)).read_bytes() == c
    assert sha(c) in sizes[64]  # the table learns what was added


def test_a_named_blob_present_is_verified_and_not_written(store: BlobStore) -> None:
    data = os.urandom(50)
    put(store, data)
    before = store.path(sha(data)).stat().st_mtime_ns
    assert put(store, data, named=sha(data)).written == 0
    assert store.path(sha(data)).stat().st_mtime_ns == before
    with pytest.raises(BackupError) as info:  # the engine sends other bytes under the name
        put(store, os.urandom(50), named=sha(data))
    assert "corrupt blob" in info.value.message


def test_a_named_blob_absent_is_written_and_checked_against_its_name(store: BlobStore
                                                                     ) -> None:
    data = os.urandom(50)
    assert put(store, data, named=sha(data)).written == 50
    other = os.urandom(50)
    with pytest.raises(BackupError):
        put(store, other, named="0" * 64)
    assert not store.path("0" * 64).exists()
    assert not (store.blobs / sha(other)).exists()  # nothing kept of a corrupt blob
    assert not list(store.incoming_dir.glob("*"))


def test_a_stream_cut_short_leaves_no_blob_and_no_incoming_file(store: BlobStore) -> None:
    data = os.urandom(100)
    with pytest.raises(BackupError) as info:
        store.ingest(io.BytesIO(data[:60]).read, 100)
    assert "ended 40 bytes before the end" in info.value.message
    assert not list(store.blobs.glob("*"))
    assert not list(store.incoming_dir.glob("*"))
    put(store, data)
    with pytest.raises(BackupError):  # cut short while matching a candidate
        store.ingest(io.BytesIO(data[:60]).read, 100)
    assert sorted(p.name for p in store.blobs.iterdir()) == [sha(data)]


def test_a_damaged_stored_blob_is_not_taken_for_the_layer(store: BlobStore) -> None:
    data = os.urandom(32)
    path = store.path(sha(b"x" * 32))  # a blob whose bytes are not its name
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    with pytest.raises(BackupError) as info:
        put(store, data)
    assert "damaged" in info.value.message


def test_empty_files_and_leftovers(store: BlobStore) -> None:
    assert put(store, b"").digest == sha(b"")
    assert put(store, b"").written == 0
    store.incoming_dir.mkdir(parents=True, exist_ok=True)
    (store.incoming_dir / "tmpabc").write_bytes(b"half a layer")
    store.clean_incoming()
    assert not store.incoming_dir.exists()
    with pytest.raises(BackupError):
        store.path("../../etc/passwd")


def _chunks(path: Path) -> list[bytes]:
    data = path.read_bytes()
    return [data[i:i + 7000] for i in range(0, len(data), 7000)]


def test_a_classic_save_becomes_a_generation_and_its_shared_layers_are_kept_once(
        tmp_path: Path) -> None:
    base, mid = os.urandom(200_000), os.urandom(90_000)
    one = save_like(tmp_path / "one.tar", [base, mid, base], tags=["img:aaa"], repeat="link")
    two = save_like(tmp_path / "two.tar", [base, os.urandom(80_000)], tags=["img:bbb"],
                    env="A=2")
    store = BlobStore(tmp_path / "backups")
    first = ingest_save(store, _chunks(one.path), {"img:aaa": ("img", "aaa")})
    assert first.written == len(base) + len(mid)  # the repeated layer is a link, once
    (gen,) = first.generations
    assert gen.path == store.root / "images" / "img" / "aaa"
    assert [(d, s) for _p, d, s in gen.layers] == [
        (sha(base), len(base)), (sha(mid), len(mid)), (sha(base), len(base))]
    assert (gen.path / gen.layers[2][0]).is_symlink()  # kept as saved
    assert (gen.path / gen.layers[0][0]).samefile(store.path(sha(base)))
    assert json.loads((gen.path / "manifest.json").read_text())[0]["RepoTags"] == ["img:aaa"]
    second = ingest_save(store, _chunks(two.path), {"img:bbb": ("img", "bbb")})
    assert second.written == 80_000  # the base is there: compared, not written
    assert ingest_save(store, _chunks(one.path), {"img:aaa": ("img", "aaa")}).written == 0
    # an image the caller did not ask for gets no generation
    assert ingest_save(store, _chunks(two.path), {}).generations == ()
    assert not list((store.root / "images" / "img").glob(".*partial*"))
