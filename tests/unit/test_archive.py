"""Archives are checked before anything is sent or loaded: the index against the image,
the stream against the sidecar as it passes."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from imagebuild import archive, tarbackup
from imagebuild.archive import ArchiveIndex, allowed_tags_error, docker_pieces
from imagebuild.errors import BackupError
from imagebuild.fsutil import PinnedFile
from imagebuild.streams import archive_chunks
from imagebuild.tarbackup import TarGuard, manifest_tags

from ..archives import oci_like as _oci_like
from ..archives import save_like

LAYERS = [b"base" * 3000, b"middle" * 500, b"top" * 100]


def _read(path: Path) -> ArchiveIndex:
    return ArchiveIndex.read(PinnedFile.open(path))


def _compose(index: ArchiveIndex, skip: int) -> tarfile.TarFile:
    data = b"".join(archive_chunks(docker_pieces(index, skip)))
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
    monkeypatch.setattr(tarbackup, "HOLD", 2048)
    saved = save_like(tmp_path / "a.tar", LAYERS * 3, pax_names=True, repeat="link")
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
    monkeypatch.setattr(tarbackup, "HOLD", 2048)
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
    monkeypatch.setattr(tarbackup, "HOLD", 1024)
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


# -- SaveCheck: a backup is kept only when docker saved every layer ---------------------------


def _save_check(data: bytes, diff_ids: tuple[str, ...], chunk: int = 65536) -> None:
    check = archive.SaveCheck("backups/img.tar", diff_ids)
    try:
        for piece in _chunks(data, chunk):
            check.write(piece)
        check.finish()
    finally:
        check.close()


@pytest.mark.parametrize("chunk", [1, 511, 65536])
def test_a_complete_save_passes_on_either_store(tmp_path: Path, chunk: int) -> None:
    layers = [b"a" * 3000, b"b" * 70000, b""]
    saved = save_like(tmp_path / "classic.tar", layers, repeat="link")
    _save_check(saved.path.read_bytes(), tuple(saved.diff_ids), chunk)
    big = [bytes(range(256)) * 20000, b"x" * 10]  # 5 MB: several output pieces
    data, diff_ids = _oci_like(tmp_path / "oci.tar", big, gzip_members=3)
    _save_check(data, diff_ids, chunk if chunk > 1 else 4096)


def test_a_save_that_left_a_blob_out_is_refused_naming_the_layer(tmp_path: Path) -> None:
    data, diff_ids = _oci_like(tmp_path / "oci.tar", [b"base" * 100, b"top" * 100], drop=1)
    with pytest.raises(BackupError, match=r"incomplete.*layer 2 of 2 .*is not in it.*previous "
                                          r"backup is still in place") as err:
        _save_check(data, diff_ids)
    assert err.value.exit_code == 8 and "moby#49473" in (err.value.hint or "")


def test_a_layer_with_other_content_or_bad_gzip_is_refused(tmp_path: Path) -> None:
    data, diff_ids = _oci_like(tmp_path / "oci.tar", [b"one" * 50, b"two" * 50])
    wrong = (diff_ids[0], "sha256:" + "0" * 64)
    with pytest.raises(BackupError, match="does not describe the image"):
        _save_check(data, wrong)
    saved = save_like(tmp_path / "c.tar", [b"\x1f\x8bnot gzip at all" * 10])
    with pytest.raises(BackupError, match=r"layer 1 .*holds other content"):
        _save_check(saved.path.read_bytes(), tuple(saved.diff_ids))


@pytest.mark.parametrize("stream", [b"", b"not a tar" * 1000, b"\0" * 1024])
def test_a_save_that_is_not_an_archive_is_refused(stream: bytes) -> None:
    with pytest.raises(BackupError, match=r"not a readable tar|manifest.json is not in it"):
        _save_check(stream, ("sha256:" + "1" * 64,))


def test_a_reader_that_gave_up_never_blocks_the_writer(tmp_path: Path) -> None:
    """After the tar reader fails early, the rest of a long stream still goes through
    (the pipe is drained), and finish reports the first failure."""
    check = archive.SaveCheck("x.tar", ("sha256:" + "1" * 64,))
    for _ in range(64):  # 64 MiB, far past any pipe buffer
        check.write(b"garbage!" * (1 << 17))
    with pytest.raises(BackupError, match="not a readable tar"):
        check.finish()


@pytest.mark.parametrize("chunk", [1, 333, 1 << 20])
def test_a_containerd_store_archive_is_indexed_and_guarded_by_its_blob_config(
        tmp_path: Path, chunk: int) -> None:
    """An OCI layout names its config ``blobs/sha256/<hex>`` (no .json): the index and
    the stream guard still find it, and still check the fingerprint from it."""
    data, diff_ids = _oci_like(tmp_path / "oci.tar", [b"base" * 999, b"top" * 99])
    index = _read(tmp_path / "oci.tar")
    assert index.diff_ids == diff_ids and index.config.startswith(b"{")
    assert index.manifest.config.startswith("blobs/sha256/")
    seen: dict[str, bytes] = {}
    guard = TarGuard("oci.tar", len(data), hashlib.sha256(data).hexdigest(),
                     lambda name, blob: None, seen.update)
    assert b"".join(guard.feed(_chunks(data, chunk))) == data
    assert seen[index.manifest.config] == index.config
    assert not any(name in seen for name in index.layers)  # gzip layers are not kept


def test_the_long_form_of_a_name_is_the_same_tag() -> None:
    """The containerd store names images docker.io/library/x:t in index.json."""
    assert archive.familiar("docker.io/library/vllm-node:abc") == "vllm-node:abc"
    assert archive.familiar("docker.io/nvidia/cuda:13") == "nvidia/cuda:13"
    assert archive.familiar("registry.example/vllm-node:abc") == "registry.example/vllm-node:abc"
    assert allowed_tags_error(["docker.io/library/vllm-node:abc"], {"vllm-node:abc"}, "t") is None
    err = allowed_tags_error(["docker.io/library/vllm-node:latest"], {"vllm-node:abc"}, "t")
    assert err is not None and "vllm-node:latest" in err.message


def test_an_oci_config_and_docker_inspect_give_the_same_fingerprint() -> None:
    """A containerd-store archive's config omits empty fields; docker inspect shows them
    as "" (WorkingDir, User) or null: the fingerprint is the same."""
    from imagebuild.image import fingerprint_of

    diff_ids = ("sha256:" + "a" * 64,)
    inspect = {"Env": ["A=1"], "Cmd": ["/bin/bash"], "Entrypoint": None, "Labels": {"x": "y"},
               "WorkingDir": "", "User": "", "ExposedPorts": None, "Volumes": None}
    oci = {"Env": ["A=1"], "Cmd": ["/bin/bash"], "Labels": {"x": "y"}}
    assert fingerprint_of(diff_ids, inspect) == fingerprint_of(diff_ids, oci)
    assert fingerprint_of(diff_ids, {**oci, "Volumes": {}}) == fingerprint_of(diff_ids, oci)
    assert fingerprint_of(diff_ids, {**oci, "User": "root"}) != fingerprint_of(diff_ids, oci)
    assert fingerprint_of(diff_ids, {**oci, "WorkingDir": "/w"}) != fingerprint_of(diff_ids,
                                                                                   oci)


@pytest.mark.parametrize("skip", [0, 1, 2])
def test_an_oci_layout_for_a_containerd_worker_names_compressed_blobs_by_their_digest(
        tmp_path: Path, skip: int) -> None:
    """From a containerd-store head the layers are gzip blobs: the layout sent to a
    containerd-store worker must describe them as such (media type, the blob's own
    digest), or the worker cannot find them in its content store."""
    from imagebuild.distribute import oci_pieces

    _, diff_ids = _oci_like(tmp_path / "oci.tar", [b"base" * 999, b"mid" * 99, b"top" * 9])
    index = _read(tmp_path / "oci.tar")
    data = b"".join(archive_chunks(oci_pieces(index, diff_ids, skip, "vllm-node:abc")))
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        files = {m.name: tf.extractfile(m).read() for m in tf.getmembers()  # type: ignore[union-attr]
                 if m.isfile()}
    idx = json.loads(files["index.json"])
    manifest = json.loads(files["blobs/sha256/" + idx["manifests"][0]["digest"][7:]])
    layers = manifest["layers"]
    assert [d["mediaType"] for d in layers] == ["application/vnd.oci.image.layer.v1.tar+gzip"] * 3
    assert [d["digest"] for d in layers] == ["sha256:" + n.rsplit("/", 1)[1] for n in index.layers]
    for i, d in enumerate(layers):
        name = "blobs/sha256/" + d["digest"][7:]
        assert (name in files) == (i >= skip)
        if name in files:
            assert "sha256:" + hashlib.sha256(files[name]).hexdigest() == d["digest"]
            assert len(files[name]) == d["size"]
    saved = save_like(tmp_path / "c.tar", [b"a" * 700, b"b" * 70])  # classic: by diff ID
    cindex = _read(saved.path)
    assert [cindex.layer_blob(i) for i in range(2)] == [
        ("application/vnd.oci.image.layer.v1.tar", d) for d in saved.diff_ids]


# -- the tar a restore loads is read by the strict reader's rules -----------------------------


BAD_TAGS = json.dumps([{"Config": "x.json", "RepoTags": ["vllm-node:latest", "nvidia/cuda:13"],
                        "Layers": []}]).encode()


def _members(path: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(path) as tf:
        return [(m, tf.extractfile(m).read() if m.isfile() else None)  # type: ignore[union-attr]
                for m in tf]


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]], fmt: int = tarfile.PAX_FORMAT
         ) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    return ti, data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = kind, target
    return ti, None


def _gnu_manifest_with_atime(data: bytes) -> bytes:
    """A GNU-format member manifest.json whose atime field (where a ustar header keeps
    its name prefix) is set, as GNU tar writes with --atime-preserve."""
    ti = tarfile.TarInfo("manifest.json")
    ti.size = len(data)
    header = bytearray(ti.tobuf(tarfile.GNU_FORMAT))
    assert header[257:265] == b"ustar  \0"
    header[345:357] = b"14734236340\0"  # atime, octal
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + data + b"\0" * (-len(data) % 512)


@pytest.mark.parametrize("variant", [
    "./manifest.json", "dir/../manifest.json", "gnu atime", "hard link", "symlink",
    "large", "large alone"])
def test_a_tar_with_a_second_way_to_name_its_manifest_is_refused(
        tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each way a tar could give docker load a manifest (with other tags) the guard never
    checked: refused before that member is released, exit 8."""
    monkeypatch.setattr(tarbackup, "HOLD", 1024)
    monkeypatch.setattr(tarbackup, "SMALL", 64 << 10)
    saved = save_like(tmp_path / "a.tar", LAYERS)
    members = _members(saved.path)
    if variant in ("./manifest.json", "dir/../manifest.json"):
        data = _tar([*members, _file(variant, BAD_TAGS)])
    elif variant == "gnu atime":
        good = _tar(members, tarfile.GNU_FORMAT)
        end = len(good.rstrip(b"\0"))
        end += -end % 512
        data = good[:end] + _gnu_manifest_with_atime(BAD_TAGS) + b"\0" * 1024
    elif variant == "hard link":
        others = [(m, d) for m, d in members if m.name != "manifest.json"]
        layer = next(m.name for m, _ in members if m.name.endswith("/json"))
        data = _tar([*others, _file(layer.replace("/json", "/VERSION"), BAD_TAGS),
                     _link("manifest.json", layer.replace("/json", "/VERSION"),
                           tarfile.LNKTYPE)])
    elif variant == "symlink":
        others = [(m, d) for m, d in members if m.name != "manifest.json"]
        data = _tar([*others, _file("0" * 64 + "/VERSION", BAD_TAGS),
                     _link("manifest.json", "0" * 64 + "/VERSION")])
    elif variant == "large":
        data = _tar([*members, _file("manifest.json", BAD_TAGS + b" " * (64 << 10))])
    else:
        others = [(m, d) for m, d in members if m.name != "manifest.json"]
        big = next(d for m, d in members if m.name == "manifest.json")
        assert big is not None
        data = _tar([*others, _file("manifest.json", big + b" " * (64 << 10))])
    guard = TarGuard(str(saved.path), len(data), hashlib.sha256(data).hexdigest(),
                     lambda name, blob: None if not manifest_tags(name, blob, "t") or
                     manifest_tags(name, blob, "t") == ["img:abc"] else (_ for _ in ()).throw(
                         BackupError("would tag other names")), lambda metas: None)
    out, err = _released_before_failing(guard, data)
    assert err.exit_code == 8 and "nothing was loaded" in err.message
    assert "would tag" not in err.message  # refused by the reader's rules, not by chance
    assert b"vllm-node:latest" not in out and len(out) < len(data)
    expected = {"./manifest.json": "a second member named manifest.json",
                "dir/../manifest.json": "a second member named manifest.json",
                "gnu atime": "a second member named manifest.json",
                "hard link": "is a hard link",
                "symlink": "is a link to",
                "large": "a second member named manifest.json",
                "large alone": "more than imagebuild reads to check it"}[variant]
    assert expected in err.message, err.message


@pytest.mark.parametrize(("name", "why"), [
    ("etc/passwd", "is not a file docker save writes"),
    ("/manifest.json", "is not a name inside the archive"),
    ("../" + "0" * 64 + ".json", "is not a name inside the archive"),
    ("fifo", "is a FIFO"),
    ("usr", "is not a directory docker save writes"),
    ("0" * 64 + "/layer.tar", "a second member named"),
])
def test_a_member_docker_save_never_writes_is_refused(tmp_path: Path, name: str,
                                                      why: str) -> None:
    saved = save_like(tmp_path / "a.tar", LAYERS)
    extra: tuple[tarfile.TarInfo, bytes | None]
    if name == "fifo":
        ti = tarfile.TarInfo("0" * 64 + "/VERSION")
        ti.type = tarfile.FIFOTYPE
        extra = (ti, None)
    elif name == "usr":
        ti = tarfile.TarInfo("usr")
        ti.type = tarfile.DIRTYPE
        extra = (ti, None)
    else:
        extra = _file(name, b"{}")
    data = _tar([extra, *_members(saved.path)])
    _, err = _released_before_failing(_guard(saved.path, sha=hashlib.sha256(data).hexdigest(),
                                             size=len(data)), data)
    assert why in err.message and err.exit_code == 8


def test_a_relative_name_and_a_linked_layer_docker_wrote_pass(tmp_path: Path) -> None:
    saved = save_like(tmp_path / "a.tar", [b"same" * 100, b"other" * 100, b"same" * 100],
                      repeat="link")
    members = [(m, d) for m, d in _members(saved.path)]
    for ti, _ in members:
        ti.name = "./" + ti.name  # tar -C dir -cf x.tar . writes names this way
    top = tarfile.TarInfo(".")
    top.type = tarfile.DIRTYPE
    data = _tar([(top, None), *members])
    guard = _guard(saved.path, sha=hashlib.sha256(data).hexdigest(), size=len(data))
    assert b"".join(guard.feed(_chunks(data, 4096))) == data


@pytest.mark.parametrize("record", [b"0 ", b"3 a=\n", b"99 path=x\n", b"12 pathx\n"])
def test_a_corrupt_pax_record_is_refused_and_never_spins(tmp_path: Path, record: bytes) -> None:
    saved = save_like(tmp_path / "a.tar", LAYERS)
    good = saved.path.read_bytes()
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, len(record)
    data = (header.tobuf(tarfile.USTAR_FORMAT) + record + b"\0" * (-len(record) % 512)
            + good)
    _, err = _released_before_failing(_guard(saved.path, sha=hashlib.sha256(data).hexdigest(),
                                             size=len(data)), data)
    assert "a pax header is corrupt" in err.message


@pytest.mark.parametrize("size", [0, 1, (8 ** 11 - 1), (8 ** 11 - 1) + 1,
                                  40 << 30])
def test_a_header_holds_a_layer_of_any_real_size_in_one_block(size: int) -> None:
    """A CUDA layer of the real images can pass 8 GiB, past what a USTAR header holds:
    that header is GNU's base-256 one, one block all the same, and every reader here
    (and docker's) reads the size back."""
    header = archive.tar_header("blobs/sha256/" + "a" * 64, size)
    assert len(header) == 512
    info = tarfile.TarInfo.frombuf(header, "utf-8", "strict")
    assert info.size == size and info.name == "blobs/sha256/" + "a" * 64
    assert tarbackup._octal(header[124:136]) == size


def test_a_record_with_an_absurd_size_is_refused_when_read() -> None:
    from imagebuild.layerstore import GenSidecar
    from imagebuild.tarbackup import Sidecar

    good = {"image": "vllm-node", "image_id": "sha256:" + "a" * 64,
            "fingerprint": "sha256:" + "b" * 64, "input_hash": None, "tags": [],
            "size": 10 ** 30, "sha256": "c" * 64, "created": "", "mtime_ns": 0}
    with pytest.raises(ValueError, match="below 2\\*\\*64"):
        Sidecar.from_json(json.dumps(good))
    gen = {"image": "vllm-node", "hash12": "a" * 12, "image_id": "sha256:" + "a" * 64,
           "fingerprint": "sha256:" + "b" * 64, "input_hash": None, "tags": [],
           "created": "", "tool_version": "x", "files": {"manifest.json": ["d" * 64, 10 ** 30]},
           "links": {}, "layers": [], "layer_files": []}
    with pytest.raises(ValueError, match=r"files: bad entry 'manifest\.json'"):
        GenSidecar.from_json(json.dumps(gen))
    gen["files"] = {"manifest.json": ["d" * 64, 10]}
    assert GenSidecar.from_json(json.dumps(gen)).files["manifest.json"] == ["d" * 64, 10]


def test_a_file_tar_wrote_again_as_a_hard_link_passes_and_no_other_does(tmp_path: Path) -> None:
    """tar of a directory whose files share an inode (a generation's files are links to
    the store's blobs) writes the second as a hard link to the first: that passes; a hard
    link to nothing before it, or one named as metadata, does not."""
    saved = save_like(tmp_path / "a.tar", LAYERS)
    members = _members(saved.path)
    first = next(m.name for m, _ in members if m.name.endswith("/json"))
    other = first.replace("0" * 63 + "0/", "f" * 64 + "/")
    ok = _tar([*members, _link(other, first, tarfile.LNKTYPE)])
    guard = _guard(saved.path, sha=hashlib.sha256(ok).hexdigest(), size=len(ok))
    assert b"".join(guard.feed(_chunks(ok, 4096))) == ok
    for name, target, says in ((other, "e" * 64 + "/json", "is a hard link to"),
                               ("repositories", first, "is a hard link to")):
        bad = _tar([*members, _link(name, target, tarfile.LNKTYPE)])
        _, err = _released_before_failing(
            _guard(saved.path, sha=hashlib.sha256(bad).hexdigest(), size=len(bad)), bad)
        assert says in err.message and err.exit_code == 8
