"""The layer store without a daemon: a save stream becomes a generation whose files are
hard links into blobs written only when the store lacks them; generations are pruned
without touching a shared blob; a generation streams back as a checked archive."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagebuild import layerstore
from imagebuild.archive import docker_pieces
from imagebuild.backup import Backup, generation_archive
from imagebuild.errors import BackupError
from imagebuild.image import ImageInfo
from imagebuild.layerstore import (
    BLOBS,
    GenSidecar,
    Meta,
    Wanted,
    check_store,
    clean_leftovers,
    ingest,
    ingest_many,
    list_generations,
    prune,
)
from imagebuild.store import LocalDir, writing
from imagebuild.streams import DamagedBytes, StoredFile, archive_chunks

from ..archives import Saved, save_like
from ..fake_engine import FakeEngine

HASH = "ab" * 32  # an input hash; the generation is named by its first 12 digits


class ElsewhereDir(LocalDir):
    """A local store that says it is not on this host: read only through ``read``, as an
    ``ssh://`` store is."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.reads: list[str] = []

    def local_path(self, name: str) -> Path | None:
        return None

    def read(self, name: str, meter: object = None) -> Iterator[bytes]:
        self.reads.append(name)
        return super().read(name)


def stream(store: LocalDir, sc: GenSidecar) -> Iterator[bytes]:
    """A generation as the checked ``docker save`` stream restore and distribute send."""
    with generation_archive(store, Backup.of_gen(sc)) as archive:
        yield from archive_chunks(docker_pieces(archive))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def chunks(path: Path, size: int = 7000) -> Iterator[bytes]:
    data = path.read_bytes()
    for i in range(0, len(data), size):
        yield data[i:i + size]


def labelled(saved: Saved, input_hash: str = HASH) -> ImageInfo:
    info = saved.info
    return ImageInfo(info.id, info.tags, {**info.labels, "imagebuild.input-hash": input_hash},
                     info.diff_ids, info.size, info.created, info.config)


def put(store: LocalDir, saved: Saved, h12: str, *, tags: list[str] | None = None
        ) -> layerstore.Written:
    info = saved.info
    meta = Meta(info.id, info.fingerprint, h12 + "0" * 52, tags or ["img:latest", f"img:{h12}"],
                info.size, info.diff_ids)
    return ingest(store, lambda: chunks(saved.path), "img", h12, meta, f"test/{h12}")


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalDir:
    monkeypatch.setattr(layerstore, "CHUNK", 4096)  # many chunks from small test files
    return LocalDir(tmp_path / "backups")


def test_shared_layers_are_written_once_and_a_generation_links_them(
        store: LocalDir, tmp_path: Path) -> None:
    base, mid = os.urandom(200_000), os.urandom(90_000)
    one = save_like(tmp_path / "one.tar", [base, mid, base], tags=["img:aaaaaaaaaaaa"],
                    repeat="link")
    two = save_like(tmp_path / "two.tar", [base, os.urandom(80_000)],
                    tags=["img:bbbbbbbbbbbb"], env="A=2")
    first = put(store, one, "aaaaaaaaaaaa")
    assert first.written >= len(base) + len(mid)  # new: the layers (the repeat is a link)
    assert first.written < len(base) + len(mid) + 4096  # and a few small files
    gen = store.directory / "images" / "img" / "aaaaaaaaaaaa"
    sc = first.sidecar
    assert sc.layers == one.diff_ids and len(sc.layer_files) == 3
    assert (gen / sc.layer_files[2]).is_symlink()  # a repeated layer stays a link, as saved
    layer0 = gen / sc.layer_files[0]
    assert layer0.samefile(store.directory / BLOBS / sha(base))
    assert layer0.stat().st_nlink == 2  # the blob and this generation
    assert GenSidecar.from_json((gen.parent / "aaaaaaaaaaaa.json").read_text()) == sc
    assert (gen.parent / "current").read_text().strip() == "aaaaaaaaaaaa"
    second = put(store, two, "bbbbbbbbbbbb")
    assert 80_000 <= second.written < 80_000 + 4096  # the base is hashed, not written
    assert layer0.stat().st_nlink == 3
    assert put(store, one, "aaaaaaaaaaaa").written == 0  # the same generation again
    assert [g.hash12 for g in list_generations(store, "img")] == ["aaaaaaaaaaaa",
                                                                  "bbbbbbbbbbbb"]
    assert not os.listdir(store.directory / "blobs" / ".incoming")
    assert not [p for p in os.listdir(gen.parent) if p.endswith(".partial")]


def test_a_layer_of_the_same_size_as_a_stored_one_is_read_again_and_written(
        store: LocalDir, tmp_path: Path) -> None:
    a, b = os.urandom(100_000), os.urandom(100_000)  # larger than a file read whole
    put(store, save_like(tmp_path / "a.tar", [a], tags=["img:aaaaaaaaaaaa"]), "aaaaaaaaaaaa")
    # b has a's size; the new image holds both, so a's blob is a candidate for b's file
    # (small files are read whole and never guessed: only layers above 64 KiB are)
    both = save_like(tmp_path / "ab.tar", [b, a], tags=["img:bbbbbbbbbbbb"])
    got = put(store, both, "bbbbbbbbbbbb")
    assert got.passes == 2
    assert (store.directory / BLOBS / sha(b)).read_bytes() == b
    assert 100_000 <= got.written < 100_000 + 4096


def test_a_stream_cut_short_leaves_no_generation_and_no_blob_half_written(
        store: LocalDir, tmp_path: Path) -> None:
    saved = save_like(tmp_path / "a.tar", [os.urandom(100_000)], tags=["img:aaaaaaaaaaaa"])
    data = saved.path.read_bytes()
    meta = Meta(saved.info.id, saved.info.fingerprint, None, ["img:aaaaaaaaaaaa"], 0,
                saved.info.diff_ids)
    with pytest.raises(BackupError, match=r"ended|incomplete|not a readable tar"):
        ingest(store, lambda: iter([data[:60_000]]), "img", "aaaaaaaaaaaa", meta, "cut")
    assert not (store.directory / "images" / "img" / "aaaaaaaaaaaa").exists()
    assert not (store.directory / "images" / "img" / "aaaaaaaaaaaa.json").exists()
    assert not os.listdir(store.directory / "blobs" / ".incoming")
    assert all(p.stat().st_size != 100_000 for p in (store.directory / BLOBS).iterdir())


def test_an_archive_of_another_image_or_with_extra_tags_is_not_kept(
        store: LocalDir, tmp_path: Path) -> None:
    saved = save_like(tmp_path / "a.tar", [os.urandom(1000)], tags=["img:latest"])
    other = save_like(tmp_path / "b.tar", [os.urandom(1000)])
    with pytest.raises(BackupError, match="would tag img:latest"):
        put(store, saved, "aaaaaaaaaaaa", tags=["img:aaaaaaaaaaaa"])
    meta = Meta(saved.info.id, other.info.fingerprint, None, ["img:latest"], 0,
                saved.info.diff_ids)
    with pytest.raises(BackupError, match="content fingerprint differs"):
        ingest(store, lambda: chunks(saved.path), "img", "aaaaaaaaaaaa", meta, "x")
    assert list_generations(store, "img") == []


def _oci_save(path: Path, layer: bytes, *, lie: bool = False) -> tuple[Saved, str]:
    """A containerd-store save: blobs named by their digest (``lie``: a wrong name)."""
    diff = "sha256:" + sha(layer)
    cfg = {"Env": ["A=1"], "Cmd": ["/bin/sh"], "Labels": {"x": "y"}}
    config = json.dumps({"config": cfg, "rootfs": {"type": "layers",
                                                   "diff_ids": [diff]}}).encode()
    layer_name = "0" * 64 if lie else sha(layer)
    manifest = json.dumps([{"Config": f"blobs/sha256/{sha(config)}",
                            "RepoTags": ["img:aaaaaaaaaaaa"],
                            "Layers": [f"blobs/sha256/{layer_name}"]}]).encode()
    with tarfile.open(path, "w") as tf:
        for name, data in ((f"blobs/sha256/{layer_name}", layer),
                           (f"blobs/sha256/{sha(config)}", config),
                           ("index.json", b'{"manifests": []}'),
                           ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
                           ("manifest.json", manifest)):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    info = ImageInfo("sha256:" + sha(config), (), {"x": "y"}, (diff,), len(layer), "", cfg)
    return Saved(path, [diff], config, info), layer_name


def test_a_blob_named_by_its_digest_is_checked_against_its_name(
        store: LocalDir, tmp_path: Path) -> None:
    layer = os.urandom(70_000)
    good, name = _oci_save(tmp_path / "good.tar", layer)
    first = put(store, good, "aaaaaaaaaaaa", tags=["img:aaaaaaaaaaaa"])
    assert (store.directory / BLOBS / name).read_bytes() == layer
    assert put(store, good, "aaaaaaaaaaaa", tags=["img:aaaaaaaaaaaa"]).written == 0
    assert first.sidecar.files["index.json"][1] == len(b'{"manifests": []}')
    bad, _ = _oci_save(tmp_path / "bad.tar", os.urandom(70_000), lie=True)
    with pytest.raises(BackupError, match="corrupt blob"):
        put(store, bad, "bbbbbbbbbbbb", tags=["img:aaaaaaaaaaaa"])
    assert not (store.directory / BLOBS / ("0" * 64)).exists()


def test_prune_keeps_shared_blobs_and_removes_the_rest(store: LocalDir, tmp_path: Path
                                                       ) -> None:
    base = os.urandom(100_000)
    only_old, only_new = os.urandom(30_000), os.urandom(40_000)
    put(store, save_like(tmp_path / "1.tar", [base, only_old], tags=["img:aaaaaaaaaaaa"]),
        "aaaaaaaaaaaa")
    put(store, save_like(tmp_path / "2.tar", [base, only_new], tags=["img:bbbbbbbbbbbb"],
                         env="A=2"), "bbbbbbbbbbbb")
    dropped = prune(store, "img", keep=1)
    assert [d.hash12 for d in dropped] == ["aaaaaaaaaaaa"]
    blobs = store.directory / BLOBS
    assert (blobs / sha(base)).is_file() and (blobs / sha(only_new)).is_file()
    assert not (blobs / sha(only_old)).exists()
    assert [g.hash12 for g in list_generations(store, "img")] == ["bbbbbbbbbbbb"]
    assert not (store.directory / "images" / "img" / "aaaaaaaaaaaa").exists()
    # every blob left is linked by the generation kept
    assert all(p.stat().st_nlink >= 2 for p in blobs.iterdir())


def test_a_generation_streams_back_as_the_archive_and_a_damaged_file_stops_it(
        store: LocalDir, tmp_path: Path) -> None:
    base, top = os.urandom(100_000), os.urandom(20_000)
    saved = save_like(tmp_path / "1.tar", [base, top, base], tags=["img:aaaaaaaaaaaa"],
                      repeat="link")
    sc = put(store, saved, "aaaaaaaaaaaa", tags=["img:aaaaaaaaaaaa"]).sidecar
    data = b"".join(stream(store, sc))
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        names = tf.getnames()
        assert names[-1] == "manifest.json"
        layer0 = tf.extractfile(sc.layer_files[0])
        assert layer0 is not None and layer0.read() == base
        repeated = tf.getmember(sc.layer_files[2])  # a copy, not a link (containerd
        assert repeated.isfile()  # does not follow links between layer files)
        again = tf.extractfile(repeated)
        assert again is not None and again.read() == base
    # one byte of the base flipped in the store: both the stream and the check name it
    blob = store.directory / BLOBS / sha(base)
    os.chmod(blob, 0o644)
    raw = bytearray(blob.read_bytes())
    raw[5000] ^= 1
    blob.write_bytes(bytes(raw))
    got = b""
    with pytest.raises(DamagedBytes, match=r"layer.tar .*damaged.*nothing was loaded") as err:
        for chunk in stream(store, sc):
            got += chunk
    assert "img aaaaaaaaaaaa" in layerstore.damaged(store, sc, err.value.label,
                                                   err.value.got).message
    assert b"manifest.json" not in got  # cut before its end: docker load loads nothing
    result = check_store(store, lambda p: sha((store.directory / p).read_bytes()))
    assert list(result.damaged) == [sha(base)] and result.damaged[sha(base)] == [
        "img aaaaaaaaaaaa"]
    assert not result.ok and result.error() is not None
    # the way out the error gives: delete the blob, back the image up again
    blob.unlink()
    again = put(store, saved, "aaaaaaaaaaaa", tags=["img:aaaaaaaaaaaa"])
    assert again.written >= len(base) and blob.read_bytes() == base
    assert b"".join(stream(store, again.sidecar)) == data
    assert check_store(store, lambda p: sha((store.directory / p).read_bytes())).ok


def test_a_generation_on_another_host_streams_the_same_archive_checked_as_it_reads(
        store: LocalDir, tmp_path: Path) -> None:
    """Read through the store alone (no local path, as over ssh), a generation is the same
    archive, each file read once when sent; a damaged file cuts it short as locally."""
    base, top = os.urandom(100_000), os.urandom(20_000)
    saved = save_like(tmp_path / "1.tar", [base, top, base], tags=["img:aaaaaaaaaaaa"],
                      repeat="link")
    sc = put(store, saved, "aaaaaaaaaaaa", tags=["img:aaaaaaaaaaaa"]).sidecar
    local = b"".join(stream(store, sc))
    far = ElsewhereDir(store.directory)
    with generation_archive(far, Backup.of_gen(sc)) as archive:
        pieces = docker_pieces(archive)
        assert all(isinstance(p, (bytes, StoredFile)) for p in pieces)
        far.reads.clear()
        assert b"".join(archive_chunks(pieces)) == local
        assert len(far.reads) == len(sc.files) + len(sc.links)  # a link is sent as a copy
        # the compression sniff reads the head of a layer only
        assert archive.layer_blob(0)[0].endswith(".tar")
    blob = store.directory / BLOBS / sha(top)
    os.chmod(blob, 0o644)
    blob.write_bytes(top[:-1])  # truncated
    got = b""
    with pytest.raises(DamagedBytes, match=r"ssh|damaged \(19999 bytes, not 20000\)"):
        for chunk in stream(far, sc):
            got += chunk
    assert b"manifest.json" not in got
    # a record whose tags or content differ from the files is refused before sending
    manifest = store.directory / sc.key / "manifest.json"
    text = manifest.read_text()
    assert "img:aaaaaaaaaaaa" in text
    os.chmod(manifest, 0o644)
    manifest.write_text(text.replace("img:aaaaaaaaaaaa", "img:latest"))
    with pytest.raises(BackupError, match="damaged"):
        list(stream(far, sc))  # its bytes no longer match its digest


def test_a_sidecar_that_names_paths_outside_a_save_archive_is_refused(
        store: LocalDir, tmp_path: Path) -> None:
    saved = save_like(tmp_path / "1.tar", [os.urandom(1000)], tags=["img:aaaaaaaaaaaa"],
                      repeat="link")
    sc = put(store, saved, "aaaaaaaaaaaa", tags=["img:aaaaaaaaaaaa"]).sidecar
    data = json.loads(sc.to_json())
    for bad in ({"files": {**data["files"], "../../etc/passwd": ["a" * 64, 1]}},
                {"links": {f"{'1' * 64}/layer.tar": "/etc/passwd"}},
                {"hash12": "../x"}, {"image": "Bad Name"}, {"layers": ["sha256:x"]},
                {"surprise": 1}):
        with pytest.raises((ValueError, TypeError)):
            GenSidecar.from_json(json.dumps({**data, **bad}))


def test_leftovers_of_a_dead_run_are_removed_and_a_live_ones_spared(
        store: LocalDir, tmp_path: Path) -> None:
    incoming = store.directory / "blobs" / ".incoming"
    incoming.mkdir(parents=True)
    host = os.uname().nodename
    dead = incoming / f"{host}-999999999-1"
    live = incoming / f"{host}-{os.getppid()}-1"
    dead.write_bytes(b"x")
    live.write_bytes(b"y")
    partial = store.directory / "images" / "img" / f".aaaaaaaaaaaa.{host}-999999999.partial"
    partial.mkdir(parents=True)
    clean_leftovers(store)
    assert not dead.exists() and live.exists() and not partial.exists()


def _two_images() -> tuple[bytes, bytes, bytes, FakeEngine, ImageInfo, ImageInfo,
                           list[Wanted]]:
    """Two images on a head that share their first layer, and a backup's wish for each
    (saved together, by their hash tags)."""
    shared, a_top, b_top = os.urandom(60_000), os.urandom(20_000), os.urandom(30_000)
    e = FakeEngine(name="head")
    a = e.add_base("img-a:aaaaaaaaaaaa", [shared, a_top])
    b = e.add_base("img-b:bbbbbbbbbbbb", [shared, b_top])
    wanted = [Wanted(n, h12, Meta(i.id, i.fingerprint, h12[0] * 64, [f"{n}:{h12}"], i.size,
                                  i.diff_ids), f"{n}:{h12}")
              for n, h12, i in (("img-a", "aaaaaaaaaaaa", a), ("img-b", "bbbbbbbbbbbb", b))]
    return shared, a_top, b_top, e, a, b, wanted


def test_several_images_saved_in_one_call_become_one_generation_each(store: LocalDir) -> None:
    shared, a_top, b_top, e, a, b, wanted = _two_images()
    got = ingest_many(store, lambda: e.save("img-a:aaaaaaaaaaaa", "img-b:bbbbbbbbbbbb"),
                      wanted, "test")
    assert [w.sidecar.image for w in got] == ["img-a", "img-b"]
    # the shared layer came once, was written once, and both generations link it
    blob = store.directory / BLOBS / sha(shared)
    assert blob.stat().st_nlink == 3
    assert got[0].written >= len(shared) + len(a_top) and got[1].written < 2 * len(b_top)
    for w, info, tag in ((got[0], a, "img-a:aaaaaaaaaaaa"), (got[1], b, "img-b:bbbbbbbbbbbb")):
        gen = store.directory / "images" / w.sidecar.image / w.sidecar.hash12
        manifest = json.loads((gen / "manifest.json").read_text())
        assert [m["RepoTags"] for m in manifest] == [[tag]]  # this image alone
        assert w.sidecar.layers == list(info.diff_ids)
        target = FakeEngine(name="other")  # each generation loads on its own
        target.load(stream(store, w.sidecar))
        assert target.require(tag).fingerprint == info.fingerprint
    # an archive without an image asked for is refused, and nothing of it kept
    before = sorted(os.listdir(store.directory / BLOBS))
    missing = [*wanted, Wanted("img-c", "cccccccccccc", wanted[0].meta, "img-c:cccccccccccc")]
    with pytest.raises(BackupError, match="img-c:cccccccccccc is not in it"):
        ingest_many(store, lambda: e.save("img-a:aaaaaaaaaaaa", "img-b:bbbbbbbbbbbb"),
                    missing, "test")
    assert sorted(os.listdir(store.directory / BLOBS)) == before
    assert not (store.directory / "images" / "img-c" / "cccccccccccc").exists()


def test_an_image_saved_alone_or_with_others_is_one_generation_of_the_same_files(
        tmp_path: Path) -> None:
    """'backup mimo' saves mimo alone, 'backup' saves every image in one archive; run at
    once they write the same generation. Its files (and so the blobs its sidecar names)
    must not depend on which save it came in, or the directory one run renames into
    place and the sidecar the other writes name different blobs, and pruning removes
    the one only the sidecar names (seen as a MISSING blob after concurrent backups)."""
    *_, e, _a, _b, wanted = _two_images()

    def as_docker_writes_it() -> Iterator[bytes]:
        """The save of img-a alone as docker writes one: its own manifest.json bytes
        (one line, its own key order) and a repositories file."""
        with tarfile.open(fileobj=io.BytesIO(b"".join(e.save("img-a:aaaaaaaaaaaa")))) as tf:
            members = [(m, tf.extractfile(m).read() if m.isfile() else None)  # type: ignore[union-attr]
                       for m in tf]
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as tf:
            for m, data in members:
                if m.name == "manifest.json" and data is not None:
                    data = json.dumps(json.loads(data), indent=1).encode() + b"\n"
                    m.size = len(data)
                tf.addfile(m, io.BytesIO(data) if data is not None else None)
            repos = b'{"img-a":{"aaaaaaaaaaaa":"x"}}\n'
            info = tarfile.TarInfo("repositories")
            info.size = len(repos)
            tf.addfile(info, io.BytesIO(repos))
        yield out.getvalue()

    alone = ingest_many(LocalDir(tmp_path / "one"), as_docker_writes_it,
                        [dataclasses.replace(wanted[0], tag=None)], "test")[0].sidecar
    together = ingest_many(LocalDir(tmp_path / "two"),
                           lambda: e.save("img-a:aaaaaaaaaaaa", "img-b:bbbbbbbbbbbb"),
                           wanted, "test")[0].sidecar
    assert alone.files == together.files and alone.links == together.links


def test_a_classic_save_missing_a_layer_file_is_refused_and_nothing_kept(
        store: LocalDir, tmp_path: Path) -> None:
    saved = save_like(tmp_path / "a.tar", [os.urandom(30_000), os.urandom(20_000)],
                      tags=["img:aaaaaaaaaaaa"])
    cut = tmp_path / "cut.tar"
    with tarfile.open(saved.path) as src, tarfile.open(cut, "w") as out:
        layers = [m for m in src.getmembers() if m.name.endswith("/layer.tar")]
        for m in src.getmembers():
            if m is not layers[-1]:
                out.addfile(m, src.extractfile(m) if m.isfile() else None)
    meta = Meta(saved.info.id, saved.info.fingerprint, None, ["img:aaaaaaaaaaaa"], 0,
                saved.info.diff_ids)
    with pytest.raises(BackupError, match=r"incomplete.*layer 2 of 2.*is not in it"):
        ingest(store, lambda: chunks(cut), "img", "aaaaaaaaaaaa", meta, "cut")
    assert list_generations(store, "img") == []
    assert not os.listdir(store.directory / BLOBS)  # the blobs of the failed run went


def test_a_blob_another_backup_put_in_place_first_is_never_replaced(
        store: LocalDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two backups at once whose generations share a new layer: each listed the store
    before either wrote, so each writes that blob. The second must keep the first's file:
    replacing it would leave the first's generation linked to an inode the store no
    longer names, and the next garbage collection would take the blob it needs."""
    base = os.urandom(150_000)
    one = save_like(tmp_path / "one.tar", [base], tags=["img:aaaaaaaaaaaa"])
    two = save_like(tmp_path / "two.tar", [base, os.urandom(50_000)],
                    tags=["img:bbbbbbbbbbbb"], env="A=2")
    first = put(store, one, "aaaaaaaaaaaa")
    blob = store.directory / BLOBS / sha(base)
    linked = store.directory / "images" / "img" / "aaaaaaaaaaaa" / first.sidecar.layer_files[0]
    assert blob.stat().st_nlink == 2 and linked.samefile(blob)
    # the second run's listing, taken before the first run's blob was there
    listing = store.files
    monkeypatch.setattr(store, "files", lambda sub="": {
        k: v for k, v in listing(sub).items() if k != sha(base)} if sub == BLOBS
        else listing(sub))
    second = put(store, two, "bbbbbbbbbbbb")
    assert linked.samefile(blob) and blob.stat().st_nlink == 3  # one file, both linked
    assert 50_000 <= second.written < 50_000 + 4096  # the shared layer not counted again
    assert not os.listdir(store.directory / "blobs" / ".incoming")
    monkeypatch.undo()
    assert check_store(store, store.sha256).ok
    prune(store, "img", 2)
    assert blob.is_file() and check_store(store, store.sha256).ok


def test_place_moves_a_file_only_where_there_is_none(store: LocalDir) -> None:
    store.prepare()
    store.mkdirs("d")
    for name, text in (("d/a", "first"), ("d/tmp1", "second"), ("d/tmp2", "third")):
        with writing(store, name) as w:
            w.write(text.encode())
            w.commit()
    assert store.place("d/tmp1", "d/b") is True and store.read_text("d/b") == "second"
    assert store.place("d/tmp2", "d/a") is False and store.read_text("d/a") == "first"
    assert sorted(store.files("d")) == ["a", "b"]  # both temporary names gone
