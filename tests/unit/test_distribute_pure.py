from __future__ import annotations

import hashlib
import io
import json
import stat
import tarfile
from pathlib import Path

import pytest

from imagebuild.archive import ArchiveIndex
from imagebuild.distribute import (
    Item,
    WorkerState,
    archive_bytes,
    chain_ids,
    containerd_name,
    docker_pieces,
    oci_image,
    oci_pieces,
    plan_item,
)
from imagebuild.engine import parse_info
from imagebuild.errors import ImagebuildError
from imagebuild.fsutil import PinnedFile
from imagebuild.image import BadReply, ImageInfo, parse_images
from imagebuild.remote import MUX_OFF, MUX_PERSIST, Target, explain
from imagebuild.streams import FileRange, Piece, archive_chunks

from ..archives import oci_like, save_like


def _save_like(path: Path, layers: list[bytes]) -> list[str]:
    return save_like(path, layers).diff_ids


def _read(path: Path) -> ArchiveIndex:
    return ArchiveIndex.read(PinnedFile.open(path))


def _join(pieces: list[Piece]) -> bytes:
    return b"".join(archive_chunks(pieces))


def _compose(index: ArchiveIndex, skip: int) -> bytes:
    return _join(docker_pieces(index, skip))


def test_chain_ids() -> None:
    assert chain_ids(["sha256:a"]) == ["sha256:a"]
    two = chain_ids(["sha256:a", "sha256:b"])
    assert two[1] == "sha256:" + hashlib.sha256(b"sha256:a sha256:b").hexdigest()
    assert chain_ids(["sha256:b", "sha256:a"])[1] != two[1]  # order matters


def test_ranges_omit_exactly_the_skipped_layer_files(tmp_path: Path) -> None:
    layers = [b"base" * 3000, b"middle" * 500, b"top"]
    _save_like(tmp_path / "a.tar", layers)
    index = _read(tmp_path / "a.tar")
    assert index.repo_tags == ("img:abc",)
    whole = _compose(index, 0)
    with tarfile.open(fileobj=io.BytesIO(whole)) as tf:
        assert len([n for n in tf.getnames() if n.endswith("layer.tar")]) == 3
    part = _compose(index, 2)
    assert archive_bytes(docker_pieces(index, 2)) == len(part)
    assert len(part) < len(whole) - 12000
    with tarfile.open(fileobj=io.BytesIO(part)) as tf:
        names = tf.getnames()
        assert [n for n in names if n.endswith("layer.tar")] == [index.layers[2]]
        assert "manifest.json" in names and index.manifest.config in names
        assert f"{0:064x}/json" in names  # only the layer.tar files are left out
        top = tf.extractfile(index.layers[2])
        assert top is not None and top.read() == b"top"


def _info(diff_ids: list[str], labels: dict[str, str] | None = None) -> ImageInfo:
    return ImageInfo(id="sha256:" + "1" * 64, tags=(), labels=labels or {},
                     diff_ids=tuple(diff_ids), size=1, created="",
                     config={"Labels": labels or {}})


def test_plan_item_counts_only_whole_chains(tmp_path: Path) -> None:
    diff = _save_like(tmp_path / "a.tar", [b"a", b"b", b"c"])
    item = Item(name="img", info=_info(diff), hash_tag="img:abc",
                archive=_read(tmp_path / "a.tar"))
    def planned(state: WorkerState) -> tuple[str, int]:
        d = plan_item(state, item)
        return d.action, d.layers_skipped

    empty = WorkerState(store="classic")
    assert planned(empty) == ("whole archive", 0)
    has_two = WorkerState(store="classic")
    has_two.add(_info(diff[:2]))
    assert planned(has_two) == ("partial", 2)
    # the same top layer on a different base is not a usable chain
    other = WorkerState(store="classic")
    other.add(_info(["sha256:" + "9" * 64, diff[1]]))
    assert planned(other) == ("whole archive", 0)
    same = WorkerState(store="classic")
    same.add(_info(diff))
    assert planned(same)[0] == "up to date" and plan_item(same, item).pieces == []
    # the containerd store gets an OCI layout without the present layers' blobs
    ctrd = WorkerState(store="containerd")
    ctrd.add(_info(diff[:2]))
    d = plan_item(ctrd, item)
    assert (d.action, d.layers_skipped) == ("partial", 2) and "OCI layout" in d.note
    assert d.pieces == oci_pieces(item.archive, item.info.diff_ids, 2, "img:abc")
    assert planned(WorkerState(store="containerd")) == ("whole archive", 0)


def test_the_oci_layout_names_every_layer_and_carries_only_the_missing_blobs(
        tmp_path: Path) -> None:
    layers = [b"base" * 3000, b"middle" * 500, b"top"]
    diff = _save_like(tmp_path / "a.tar", layers)
    index = _read(tmp_path / "a.tar")
    assert json.loads(index.config)["rootfs"]["diff_ids"] == diff
    pieces = oci_pieces(index, tuple(diff), 2, "vllm-node-mimo:0123456789ab")
    data = _join(pieces)
    assert archive_bytes(pieces) == len(data) and len(data) % 512 == 0
    # the layer bytes travel as ranges of the backup tar, not through Python
    ranges = [p for p in pieces if isinstance(p, FileRange)]
    assert [(r.file, r.length, r.sha256) for r in ranges] == [(index.files[0], 3, None)]
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        files = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}  # type: ignore[union-attr]
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    idx = json.loads(files["index.json"])
    [entry] = idx["manifests"]
    assert entry["annotations"]["io.containerd.image.name"] == (
        "docker.io/library/vllm-node-mimo:0123456789ab")
    manifest_blob = files["blobs/sha256/" + entry["digest"].removeprefix("sha256:")]
    assert "sha256:" + hashlib.sha256(manifest_blob).hexdigest() == entry["digest"]
    manifest = json.loads(manifest_blob)
    assert [d["digest"] for d in manifest["layers"]] == diff
    assert [d["size"] for d in manifest["layers"]] == [len(b) for b in layers]
    config = files["blobs/sha256/" + manifest["config"]["digest"].removeprefix("sha256:")]
    assert config == index.config
    blobs = {n for n in files if n.startswith("blobs/")}
    assert "blobs/sha256/" + diff[2].removeprefix("sha256:") in blobs
    assert not any("blobs/sha256/" + d.removeprefix("sha256:") in blobs for d in diff[:2])
    assert files["blobs/sha256/" + diff[2].removeprefix("sha256:")] == b"top"


def test_an_archive_that_is_not_one_docker_save_image_is_refused(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "other.tar", "w") as tf:
        ti = tarfile.TarInfo("hello.txt")
        ti.size = 2
        tf.addfile(ti, io.BytesIO(b"hi"))
    with pytest.raises(ImagebuildError, match="not a single-image docker save archive"):
        _read(tmp_path / "other.tar")
    # a backup tar that does not belong to the image's layers is not recomposed
    diff = _save_like(tmp_path / "a.tar", [b"a", b"b"])
    with pytest.raises(ImagebuildError, match="manifest and the image's layers differ"):
        oci_pieces(_read(tmp_path / "a.tar"), (*diff, diff[0]), 1, "img:abc")


def test_containerd_names() -> None:
    assert containerd_name("vllm-node:latest") == "docker.io/library/vllm-node:latest"
    assert containerd_name("team/vllm-node:1") == "docker.io/team/vllm-node:1"
    assert containerd_name("head:5000/vllm-node:1") == "head:5000/vllm-node:1"
    assert containerd_name("registry.lan/x/y:1") == "registry.lan/x/y:1"


def test_engine_replies_tell_the_stores_apart_and_read_every_image() -> None:
    image = {"Id": "sha256:" + "1" * 64, "RepoTags": ["vllm-node:latest"],
             "RootFS": {"Layers": ["sha256:" + "a" * 64, "sha256:" + "b" * 64]},
             "Config": {"Env": ["A=1"], "Labels": {"x": "y"}}}
    classic = {"Driver": "overlay2", "ServerVersion": "20.10.24",
               "DriverStatus": [["Backing Filesystem", "extfs"]]}
    assert parse_info(classic).store == "classic"
    [info] = parse_images(json.dumps([image]) + "\n")
    assert info.id == image["Id"] and info.tags == ("vllm-node:latest",)
    assert info.labels == {"x": "y"} and len(info.diff_ids) == 2
    # Docker 24+ with the containerd image store
    ctrd = {"Driver": "overlayfs", "ServerVersion": "26.1.5",
            "DriverStatus": [["driver-type", "io.containerd.snapshotter.v1"]]}
    assert parse_info(ctrd).store == "containerd" and parse_info(ctrd).version == "26.1.5"
    assert parse_images("") == []  # an engine with no images at all


@pytest.mark.parametrize("reply", [
    "Welcome to spark-2!\n[]",  # a login banner on stdout
    '{"Id": "sha256:' + "1" * 64 + '"}',  # an object, not an array
    '[{"RepoTags": []}]',  # an entry without Id
    '[{"Id": "abc"}]',  # an Id that is not a digest
    '[{"Id": "sha256:' + "1" * 64 + '", "RootFS": {"Layers": ["x"]}}]',
    '[{"Id": "sha256:' + "1" * 64 + '", "Config": {"Labels": {"a": 1}}}]',
    '[{"Id": "sha256:' + "1" * 64 + '", "Size": "big"}]',
    '[{"Id": "sha256:' + "1" * 64 + '", "RepoTags": "x:1"}]',
    '[5]',
])
def test_an_engine_reply_of_the_wrong_shape_is_refused(reply: str) -> None:
    with pytest.raises(BadReply):
        parse_images(reply)


def test_a_docker_info_of_the_wrong_shape_is_refused() -> None:
    for bad in ([], "text", {"DriverStatus": "x"}):
        with pytest.raises(BadReply):
            parse_info(bad)


def test_ssh_argv_never_weakens_host_key_checking_and_quotes_the_command() -> None:
    t = Target(name="w1", host="10.0.0.2", user="spark", port=2200, identity="/k",
               config="/c")
    argv = t.argv(["docker", "image", "inspect", "a b", "$(reboot)"])
    assert argv[:3] == ["ssh", "-F", "/c"]
    assert "StrictHostKeyChecking=no" not in " ".join(argv)
    assert argv[-2:] == ["10.0.0.2", "docker image inspect 'a b' '$(reboot)'"]
    assert ["-l", "spark"] == argv[argv.index("-l"):argv.index("-l") + 2]
    assert "host key does not match" in explain(
        t, 255, "@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@")
    assert "unreachable" in explain(t, 255, "ssh: connect to host 10.0.0.2: No route to host")


def test_ssh_commands_of_one_run_share_a_connection_through_a_private_socket(
        monkeypatch: pytest.MonkeyPatch) -> None:
    t = Target(name="w1", host="10.0.0.2")
    argv = t.argv(["true"])
    opts = [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]
    assert "ControlMaster=auto" in opts and f"ControlPersist={MUX_PERSIST}" in opts
    path = next(o for o in opts if o.startswith("ControlPath=")).removeprefix("ControlPath=")
    control = Path(path).parent
    assert path.endswith("/%C") and control.is_dir()
    assert stat.S_IMODE(control.stat().st_mode) == 0o700  # nobody else's to use
    assert Target(name="w2", host="10.0.0.3").argv(["true"]).count(f"ControlPath={path}") == 1
    monkeypatch.setenv(MUX_OFF, "0")
    assert not any("Control" in a for a in t.argv(["true"]))


def test_a_containerd_heads_own_manifest_is_kept_so_the_image_id_stays(
        tmp_path: Path) -> None:
    """A containerd-store save names its image's manifest in index.json: the OCI image
    sent (a layout over ssh, a push to a registry) is that manifest byte for byte, so a
    containerd worker gets the head's image ID (its manifest digest). A manifest naming
    anything else is not trusted: the manifest is composed as for a classic save."""
    path = tmp_path / "oci.tar"
    _data, diff_ids = oci_like(path, [b"base" * 999, b"top" * 9], index=True)
    with tarfile.open(path) as tf:
        index = json.loads(tf.extractfile("index.json").read())  # type: ignore[union-attr]
        digest = index["manifests"][0]["digest"]
        own = tf.extractfile(f"blobs/sha256/{digest[7:]}").read()  # type: ignore[union-attr]
    image = oci_image(_read(path), diff_ids)
    assert (image.manifest, image.digest) == (own, digest)
    layout = _join(oci_pieces(_read(path), diff_ids, 1, "img:abc"))
    with tarfile.open(fileobj=io.BytesIO(layout)) as tf:
        sent = json.loads(tf.extractfile("index.json").read())  # type: ignore[union-attr]
        assert sent["manifests"][0]["digest"] == digest
        assert tf.extractfile(f"blobs/sha256/{digest[7:]}").read() == own  # type: ignore[union-attr]
    # the same layers without index.json (or naming another config): composed here
    oci_like(path, [b"base" * 999, b"top" * 9], index=False)
    composed = oci_image(_read(path), diff_ids)
    assert composed.digest != digest and composed.config_digest == image.config_digest
    assert [d for _m, d, _x in composed.layers] == [d for _m, d, _x in image.layers]
    bent = json.loads(own)
    bent["config"]["digest"] = "sha256:" + "0" * 64
    other = json.dumps(bent).encode()
    with tarfile.open(path, "a") as tf:
        for name, data in ((f"blobs/sha256/{hashlib.sha256(other).hexdigest()}", other),
                           ("index.json", json.dumps({"manifests": [{
                               "mediaType": bent["mediaType"], "size": len(other),
                               "digest": "sha256:" + hashlib.sha256(other).hexdigest()}]})
                            .encode())):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    assert oci_image(_read(path), diff_ids).digest == composed.digest
