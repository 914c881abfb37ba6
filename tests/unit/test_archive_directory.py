"""A backup generation directory as an archive: indexed against the list of its files
and their sha256, composed into the tar stream ``docker load`` reads, and checked as it
streams (a damaged file cuts the stream short before its end)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from imagebuild import engine, streams
from imagebuild.archive import TRAILER, ArchiveIndex, docker_pieces
from imagebuild.distribute import archive_bytes, oci_pieces
from imagebuild.errors import BackupError
from imagebuild.fsutil import PinnedFile
from imagebuild.streams import FileRange, Piece, archive_chunks

from ..archives import oci_like, save_like

LAYERS = [b"base" * 3000, b"middle" * 500, b"top" * 100, b"base" * 3000]


def _extract(tar: Path, dest: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Unpack a save-like tar into ``dest`` as a generation directory is laid out: the
    regular files with their sha256, the symbolic links with their targets."""
    files: dict[str, str] = {}
    links: dict[str, str] = {}
    with tarfile.open(tar) as tf:
        for m in tf:
            path = dest / m.name
            if m.isdir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            if m.issym():
                os.symlink(m.linkname, path)
                links[m.name] = m.linkname
                continue
            f = tf.extractfile(m)
            assert f is not None
            data = f.read()
            path.write_bytes(data)
            files[m.name] = hashlib.sha256(data).hexdigest()
    return files, links


def _contents(data: bytes) -> tuple[list[str], dict[str, bytes | str]]:
    """The member names of a tar stream in order, and each one's bytes (or link target)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = tf.getmembers()
        out: dict[str, bytes | str] = {}
        for m in members:
            if m.issym():
                out[m.name] = m.linkname
            elif m.isfile():
                f = tf.extractfile(m)
                assert f is not None
                out[m.name] = f.read()
    return [m.name for m in members], out


def _generation(tmp_path: Path, kind: str) -> tuple[Path, Path, dict[str, str],
                                                    dict[str, str], tuple[str, ...]]:
    """(tar, directory, files, links, diff IDs) of a classic-store save (``kind`` is its
    repeat mode: a layer saved twice as a symlink, named twice, or not repeated) or of
    a containerd-store save (``oci``)."""
    tar = tmp_path / "save.tar"
    if kind == "oci":
        _, diff_ids = oci_like(tar, [b"base" * 999, b"mid" * 99, b"top" * 9], index=True)
    else:
        saved = save_like(tar, LAYERS if kind else LAYERS[:3], repeat=kind)
        diff_ids = tuple(saved.diff_ids)
    gen = tmp_path / "gen"
    gen.mkdir()
    files, links = _extract(tar, gen)
    return tar, gen, files, links, diff_ids


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("kind", ["", "link", "same", "oci"])
def test_a_generation_directory_composes_the_archive_it_was_saved_as(
        tmp_path: Path, kind: str) -> None:
    tar, gen, files, links, diff_ids = _generation(tmp_path, kind)
    assert (kind == "link") == bool(links)
    with PinnedFile.open(tar) as pinned:
        from_tar = ArchiveIndex.read(pinned)
        with ArchiveIndex.from_directory(gen, files, links) as index:
            assert index.where == str(gen)
            assert (index.fingerprint, index.diff_ids) == (from_tar.fingerprint, diff_ids)
            assert index.layers == from_tar.layers and index.config == from_tar.config
            index.check(from_tar.fingerprint, {"img:abc"})
            pieces = docker_pieces(index, 0)
            data = b"".join(archive_chunks(pieces))
            assert archive_bytes(pieces) == len(data) and data.endswith(TRAILER)
            # every regular file is sent whole, and checked against its sha256 as it goes;
            # a link goes as a copy of its file (the containerd store's load follows none)
            ranges = [p for p in pieces if isinstance(p, FileRange)]
            copies = {n: os.path.normpath(os.path.join(os.path.dirname(n), t))
                      for n, t in links.items()}
            assert sorted((r.label, r.sha256, r.offset, r.length) for r in ranges) == sorted(
                (n, files[copies.get(n, n)], 0, (gen / copies.get(n, n)).stat().st_size)
                for n in [*files, *links])
            assert not index.changed()
            opened = index.files
            assert len(opened) == len(files)
    assert all(f.fd == -1 for f in opened)  # closed with the index
    names, got = _contents(data)
    _, want = _contents(tar.read_bytes())
    for n, target in copies.items():
        assert want[n] == links[n] and got[n] == want[target]
        want[n] = want[target]
    assert got == want  # the same files, the same bytes (a link's as a copy)
    assert names[-1] == "manifest.json"  # a stream cut short never holds the manifest
    if kind == "oci":
        assert names[-2] == "index.json"
    assert names[:-2] == sorted(names[:-2])
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf:
            assert (m.mtime, m.uid, m.gid) == (0, 0, 0)
            assert m.isfile() and m.mode == 0o644


@pytest.mark.parametrize("kind", ["", "link", "same"])
def test_the_skipped_layer_files_are_left_out(tmp_path: Path, kind: str) -> None:
    """Layer 3 of the repeating kinds is layer 0 again: its file (or the file its link
    points to) stays when the first two layers are skipped."""
    _, gen, files, links, diff_ids = _generation(tmp_path, kind)
    with ArchiveIndex.from_directory(gen, files, links) as index:
        data = b"".join(archive_chunks(docker_pieces(index, 2)))
        names, got = _contents(data)
        needed = {n for layer in index.layers[2:]
                  for n in (layer, index.member(layer).name)}
        for layer in index.layers[:2]:
            assert (layer in names) == (layer in needed)
        for layer in index.layers[2:]:
            blob = got[index.member(layer).name]
            assert isinstance(blob, bytes)
            assert "sha256:" + hashlib.sha256(blob).hexdigest() in diff_ids
        assert index.layers[1] not in names
        assert names[-1] == "manifest.json"
        assert f"{1:064x}/json" in names  # only the layer files are left out
        bare = b"".join(archive_chunks(docker_pieces(index, len(index.layers))))
        _, none = _contents(bare)  # the worker has every layer
        assert not [n for n in none if n.endswith("layer.tar")] and len(bare) < len(data)


def _until_error(pieces: list[Piece]) -> tuple[bytes, BackupError]:
    out = bytearray()
    with pytest.raises(BackupError) as info:
        for chunk in archive_chunks(pieces):
            out += chunk
    return bytes(out), info.value


@pytest.mark.parametrize("where", [0, -1])
def test_a_file_that_does_not_match_its_sha256_cuts_the_stream_before_its_end(
        tmp_path: Path, where: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streams, "CHUNK", 1024)
    _, gen, files, links, _ = _generation(tmp_path, "")
    layer = f"{0:064x}/layer.tar"
    good = bytearray((gen / layer).read_bytes())
    good[where] ^= 1
    (gen / layer).write_bytes(bytes(good))  # the same size, other bytes
    with ArchiveIndex.from_directory(gen, files, links) as index:
        pieces = docker_pieces(index, 0)
        out, err = _until_error(pieces)
    assert f"{layer} ({gen / layer}) is damaged" in err.message
    assert "nothing was loaded" in err.message
    assert f"expected sha256 {files[layer]}" in err.message
    assert f"actual   sha256 {hashlib.sha256(good).hexdigest()}" in err.message
    assert err.hint is not None and "imagebuild backup --check" in err.hint
    # the stream stopped inside that file: its last chunk, the files after it and the
    # end of the archive were never released
    start = 0
    for p in pieces:
        if isinstance(p, FileRange) and p.label == layer:
            break
        start += len(p) if isinstance(p, bytes) else p.length
    last = len(good) % 1024 or 1024
    assert len(out) == start + len(good) - last
    assert b"manifest.json" not in out and not out.endswith(TRAILER)


def test_a_file_that_shrinks_after_it_was_opened_is_refused_as_it_streams(
        tmp_path: Path) -> None:
    _, gen, files, links, _ = _generation(tmp_path, "")
    layer = f"{1:064x}/layer.tar"
    with ArchiveIndex.from_directory(gen, files, links) as index:
        os.truncate(gen / layer, 10)
        assert index.changed()
        out, err = _until_error(docker_pieces(index, 0))
    assert f"{layer} ({gen / layer}) ended" in err.message and "truncated" in err.message
    assert b"manifest.json" not in out


def test_a_damaged_manifest_or_config_is_refused_when_indexed(tmp_path: Path) -> None:
    _, gen, files, links, _ = _generation(tmp_path, "")
    manifest = json.loads((gen / "manifest.json").read_bytes())
    config = manifest[0]["Config"]
    before = _open_fds()
    for name in ("manifest.json", config):
        saved = (gen / name).read_bytes()
        (gen / name).write_bytes(saved.replace(b"]", b" ]", 1))
        with pytest.raises(BackupError, match=rf"{name} .* is damaged"):
            ArchiveIndex.from_directory(gen, files, links)
        (gen / name).write_bytes(saved)
    assert _open_fds() == before  # what it opened before refusing is closed again


@pytest.mark.parametrize("damage", ["extra file", "extra link", "missing file",
                                    "missing link", "a file where a link was", "escaping link",
                                    "absolute link", "link to nothing", "other target",
                                    "a path outside", "not a digest", "a fifo"])
def test_a_directory_that_is_not_what_its_record_lists_is_refused(
        tmp_path: Path, damage: str) -> None:
    _, gen, files, links, _ = _generation(tmp_path, "link")
    [(link, target)] = links.items()
    if damage == "extra file":
        (gen / "stray.tar").write_bytes(b"x")
    elif damage == "extra link":
        os.symlink("manifest.json", gen / "another")
    elif damage == "missing file":
        (gen / f"{1:064x}" / "layer.tar").unlink()
    elif damage == "missing link":
        (gen / link).unlink()
    elif damage == "a file where a link was":
        (gen / link).unlink()
        (gen / link).write_bytes(LAYERS[0])
    elif damage == "escaping link":
        (gen / link).unlink()
        os.symlink("../../outside/layer.tar", gen / link)
        links[link] = "../../outside/layer.tar"
    elif damage == "absolute link":
        (gen / link).unlink()
        os.symlink(str(gen / target), gen / link)
        links[link] = str(gen / target)
    elif damage == "link to nothing":
        (gen / link).unlink()
        os.symlink("../nothing/layer.tar", gen / link)
        links[link] = "../nothing/layer.tar"
    elif damage == "other target":
        (gen / link).unlink()
        os.symlink(f"../{1:064x}/layer.tar", gen / link)
    elif damage == "a path outside":
        files["../save.tar"] = files.pop("manifest.json")
    elif damage == "not a digest":
        files["manifest.json"] = "sha256:" + files["manifest.json"]
    elif damage == "a fifo":
        os.mkfifo(gen / "pipe")
    before = _open_fds()
    with pytest.raises(BackupError, match="refusing") as err:
        ArchiveIndex.from_directory(gen, files, links)
    assert err.value.exit_code == 8
    assert _open_fds() == before


def test_a_tar_index_leaves_the_tar_to_its_caller(tmp_path: Path) -> None:
    saved = save_like(tmp_path / "a.tar", LAYERS[:2])
    with PinnedFile.open(saved.path) as pinned:
        index = ArchiveIndex.read(pinned)
        assert index.where == str(saved.path) and index.files == (pinned,)
        assert all(m.file is pinned and m.header is None for m in index.members)
        index.close()
        assert pinned.fd >= 0  # still the caller's, still open
        with saved.path.open("ab") as f:
            f.write(b"\0" * 512)
        assert index.changed()


@pytest.mark.parametrize("kind", ["", "oci"])
@pytest.mark.parametrize("skip", [0, 1, 2])
def test_an_oci_layout_is_composed_from_a_generation_directory(
        tmp_path: Path, kind: str, skip: int) -> None:
    tar, gen, files, links, diff_ids = _generation(tmp_path, kind)
    with PinnedFile.open(tar) as pinned, \
            ArchiveIndex.from_directory(gen, files, links) as index:
        from_tar = oci_pieces(ArchiveIndex.read(pinned), diff_ids, skip, "img:abc")
        pieces = oci_pieces(index, diff_ids, skip, "img:abc")
        data = b"".join(archive_chunks(pieces))
        # the same layout, byte for byte, as from the tar it was saved as
        assert data == b"".join(archive_chunks(from_tar))
        ranges = [p for p in pieces if isinstance(p, FileRange)]
        assert len(ranges) == len(diff_ids) - skip
        assert all(r.sha256 == files[r.label] for r in ranges)
    _, got = _contents(data)
    idx = json.loads(got["index.json"])
    manifest = json.loads(got["blobs/sha256/" + idx["manifests"][0]["digest"][7:]])
    media = "tar+gzip" if kind == "oci" else "tar"
    assert [d["mediaType"].rsplit(".", 1)[1] for d in manifest["layers"]] == [media] * 3
    for i, d in enumerate(manifest["layers"]):
        blob = got.get("blobs/sha256/" + d["digest"][7:])
        assert (blob is not None) == (i >= skip)
        if isinstance(blob, bytes):
            assert "sha256:" + hashlib.sha256(blob).hexdigest() == d["digest"]
    if kind == "oci":  # a compressed blob is named by the digest its record gives
        assert [d["digest"][7:] for d in manifest["layers"]] == [
            files[n] for n in index.layers]


def test_an_oci_layout_with_a_damaged_layer_blob_stops_before_its_index(
        tmp_path: Path) -> None:
    _, gen, files, links, diff_ids = _generation(tmp_path, "oci")
    manifest = json.loads((gen / "manifest.json").read_bytes())
    top = gen / manifest[0]["Layers"][2]
    blob = bytearray(top.read_bytes())
    blob[len(blob) // 2] ^= 1
    top.write_bytes(bytes(blob))
    with ArchiveIndex.from_directory(gen, files, links) as index:
        out, err = _until_error(oci_pieces(index, diff_ids, 1, "img:abc"))
    assert "is damaged" in err.message and b"index.json" not in out


# -- the same pieces over ssh: sendfile for ranges of a tar, hashed for a generation's files --


class _Load:
    """What ``ssh worker docker load`` is to ``SshEngine``: a process whose stdin is a
    file here (so the test sees exactly the bytes that were written)."""

    def __init__(self, path: Path) -> None:
        self.stdin = path.open("wb")
        self.returncode: int | None = None
        self.killed = False

    def kill(self) -> None:
        self.killed = True
        self.stdin.close()

    def wait(self) -> int | None:
        return self.returncode

    def communicate(self) -> tuple[bytes, bytes]:
        self.stdin.close()
        self.returncode = 0
        return b"", b""


def _ssh_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                ) -> tuple[engine.Engine, Path, list[_Load]]:
    """An ``SshEngine`` whose ``docker load`` writes what it is sent to a file."""
    from imagebuild import engine_ssh
    from imagebuild.remote import Target

    received = tmp_path / "received.tar"
    started: list[_Load] = []

    def start(target: Target, remote: list[str], *, read: bool = False) -> _Load:
        assert remote == ["docker", "load"]
        started.append(_Load(received))
        return started[-1]

    monkeypatch.setattr(engine_ssh, "start", start)
    return engine_ssh.SshEngine(Target(name="w1", host="10.0.0.1")), received, started


def test_an_ssh_load_sends_the_pieces_of_a_tar_and_of_a_directory_alike(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    worker, received, started = _ssh_engine(tmp_path, monkeypatch)
    tar, gen, files, links, _ = _generation(tmp_path, "link")
    with PinnedFile.open(tar) as pinned, \
            ArchiveIndex.from_directory(gen, files, links) as index:
        for archive in (ArchiveIndex.read(pinned), index):
            pieces = docker_pieces(archive, 1)
            seen: list[int] = []
            sent = worker.load_archive(pieces, seen.append)
            assert received.read_bytes() == b"".join(archive_chunks(pieces))
            assert sent == seen[-1] == archive_bytes(pieces)
    assert [s.killed for s in started] == [False, False]


def test_an_ssh_load_of_a_damaged_file_is_killed_before_the_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streams, "CHUNK", 1024)
    worker, received, started = _ssh_engine(tmp_path, monkeypatch)
    _, gen, files, links, _ = _generation(tmp_path, "")
    layer = gen / f"{0:064x}" / "layer.tar"
    data = layer.read_bytes()
    with ArchiveIndex.from_directory(gen, files, links) as index:
        good = b"".join(archive_chunks(docker_pieces(index, 0)))
        layer.write_bytes(data[:-1] + b"!")
        with pytest.raises(BackupError, match="is damaged"):
            worker.load_archive(docker_pieces(index, 0))
    got = received.read_bytes()
    assert started[0].killed  # docker load sees a truncated archive
    # everything up to the damaged file's last chunk went, and nothing after it
    end = good.index(data) + len(data)
    assert got == good[:end - (len(data) % 1024 or 1024)]


def test_a_new_hard_link_to_a_blob_is_not_a_change(tmp_path: Path) -> None:
    """Another generation linking the same blob moves its ctime, not its bytes (which
    are checked against their sha256 as they stream anyway); a write is a change."""
    _, gen, files, links, _ = _generation(tmp_path, "")
    layer = gen / f"{0:064x}" / "layer.tar"
    with ArchiveIndex.from_directory(gen, files, links) as index:
        os.link(layer, tmp_path / "another-generation.tar")
        assert not index.changed()
        with layer.open("r+b") as f:
            f.write(b"X")
        os.utime(layer, ns=(0, 12345))
        assert index.changed()
