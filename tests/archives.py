"""Build small tars shaped like ``docker save`` output, for the unit tier."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

from imagebuild.engine import ImageInfo


@dataclass(frozen=True)
class Saved:
    path: Path
    diff_ids: list[str]
    config: bytes
    info: ImageInfo  # the image the archive holds, as an engine would inspect it


def save_like(path: Path, layers: list[bytes], *, tags: list[str] | None = None,
              repeat: str = "", manifest_first: bool = False, env: str = "A=1",
              long_names: bool = False) -> Saved:
    """A classic-store ``docker save`` tar. ``repeat="link"``: a layer equal to an
    earlier one is written as a symlink to its file (Docker 20.10); ``"same"``: the
    manifest names the earlier file again (newer Dockers)."""
    diff_ids = ["sha256:" + hashlib.sha256(b).hexdigest() for b in layers]
    cfg = {"Env": [env], "Cmd": ["/bin/sh"], "Labels": {"x": "y"}}
    config = json.dumps({"architecture": "amd64", "config": cfg,
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    prefix = "d" * 120 + "/" if long_names else ""
    names: list[str] = []
    first: dict[str, str] = {}
    entries: list[tuple[str, bytes | str]] = []  # data, or a symlink target
    for i, (data, diff) in enumerate(zip(layers, diff_ids, strict=True)):
        name = f"{prefix}{i:064x}/layer.tar"
        if diff in first and repeat == "same":
            names.append(first[diff])
            continue
        if diff in first and repeat == "link":
            entries.append((name, "../" + first[diff].removeprefix(prefix)))
        else:
            entries.append((name, data))
            first.setdefault(diff, name)
        names.append(name)
    manifest = json.dumps([{"Config": config_name, "RepoTags": tags if tags is not None
                            else ["img:abc"], "Layers": names}]).encode()
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        def add(name: str, data: bytes | str) -> None:
            ti = tarfile.TarInfo(name)
            if isinstance(data, str):
                ti.type, ti.linkname = tarfile.SYMTYPE, data
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
