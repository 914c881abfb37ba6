"""Build small tars shaped like ``docker save`` output, for the unit tier."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

from imagebuild.image import ImageInfo


@dataclass(frozen=True)
class Saved:
    path: Path
    diff_ids: list[str]
    config: bytes
    info: ImageInfo  # the image the archive holds, as an engine would inspect it


def save_like(path: Path, layers: list[bytes], *, tags: list[str] | None = None,
              repeat: str = "", manifest_first: bool = False, env: str = "A=1",
              pax_names: bool = False) -> Saved:
    """A classic-store ``docker save`` tar. ``repeat="link"``: a layer equal to an
    earlier one is written as a symlink to its file (Docker 20.10); ``"same"``: the
    manifest names the earlier file again (newer Dockers). ``pax_names``: every member's
    name (and a link's target) in a pax header before it, as a writer may put them."""
    diff_ids = ["sha256:" + hashlib.sha256(b).hexdigest() for b in layers]
    cfg = {"Env": [env], "Cmd": ["/bin/sh"], "Labels": {"x": "y"}}
    config = json.dumps({"architecture": "amd64", "config": cfg,
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    names: list[str] = []
    first: dict[str, str] = {}
    entries: list[tuple[str, bytes | str]] = []  # data, or a symlink target
    for i, (data, diff) in enumerate(zip(layers, diff_ids, strict=True)):
        name = f"{i:064x}/layer.tar"
        if diff in first and repeat == "same":
            names.append(first[diff])
            continue
        if diff in first and repeat == "link":
            entries.append((name, "../" + first[diff]))
        else:
            entries.append((name, data))
            first.setdefault(diff, name)
        names.append(name)
    manifest = json.dumps([{"Config": config_name, "RepoTags": tags if tags is not None
                            else ["img:abc"], "Layers": names}]).encode()
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        def add(name: str, data: bytes | str) -> None:
            ti = tarfile.TarInfo(name)
            if pax_names:
                ti.pax_headers = {"path": name}
            if isinstance(data, str):
                ti.type, ti.linkname = tarfile.SYMTYPE, data
                if pax_names:
                    ti.pax_headers["linkpath"] = data
                tf.addfile(ti)
                return
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        if manifest_first:
            add("manifest.json", manifest)
        add(config_name, config)
        for name, data in entries:
            add(name.replace("layer.tar", "json"), b"{}")
            add(name, data)
        if not manifest_first:
            add("manifest.json", manifest)
    info = ImageInfo(id="sha256:" + hashlib.sha256(config).hexdigest(), tags=tuple(tags or ()),
                     labels={"x": "y"}, diff_ids=tuple(diff_ids), size=sum(map(len, layers)),
                     created="", config=cfg)
    return Saved(path, diff_ids, config, info)


def oci_like(path: Path, layers: list[bytes], *, drop: int | None = None,
             gzip_members: int = 1, index: bool = False) -> tuple[bytes, tuple[str, ...]]:
    """A containerd-store ``docker save`` archive: an OCI layout plus manifest.json whose
    layers are gzip blobs named by their compressed digest (not the diff ID). ``drop``:
    leave that layer's blob out, as docker 26+ does for a blob missing from the content
    store (moby#49473). ``index``: also the image's manifest blob and an ``index.json``
    naming it, as a containerd-store save writes them."""
    import gzip

    diff_ids = tuple("sha256:" + hashlib.sha256(b).hexdigest() for b in layers)
    blobs = []
    for data in layers:
        cut = len(data) // gzip_members + 1
        blobs.append(b"".join(gzip.compress(data[i:i + cut], mtime=0)
                              for i in range(0, len(data), cut)) or gzip.compress(b"", mtime=0))
    names = [f"blobs/sha256/{hashlib.sha256(b).hexdigest()}" for b in blobs]
    config = json.dumps({"config": {"Env": ["A=1"]},
                         "rootfs": {"type": "layers", "diff_ids": list(diff_ids)}}).encode()
    cfg_name = f"blobs/sha256/{hashlib.sha256(config).hexdigest()}"
    manifest = json.dumps([{"Config": cfg_name, "RepoTags": ["img:abc"],
                            "Layers": names}]).encode()
    oci_manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": "sha256:" + cfg_name.rsplit("/", 1)[1], "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": "sha256:" + n.rsplit("/", 1)[1], "size": len(b)}
                   for n, b in zip(names, blobs, strict=True)]}).encode()
    oci_digest = hashlib.sha256(oci_manifest).hexdigest()
    oci_index = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": "sha256:" + oci_digest, "size": len(oci_manifest),
        "annotations": {"io.containerd.image.name": "docker.io/library/img:abc"}}]}).encode()
    with tarfile.open(path, "w") as tf:
        def add(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        add("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        add(cfg_name, config)
        for i, (name, blob) in enumerate(zip(names, blobs, strict=True)):
            if i != drop:
                add(name, blob)
        if index:
            add(f"blobs/sha256/{oci_digest}", oci_manifest)
            add("index.json", oci_index)
        add("manifest.json", manifest)
    return path.read_bytes(), diff_ids
