"""The image model: what imagebuild knows of an image (``ImageInfo``), its content
fingerprint (the same on every store and every node, where image IDs are not), and the
parsers that turn an engine's ``docker inspect`` reply into it, refusing a reply of an
unexpected shape with ``BadReply`` at the edge. Pure: no engine, no I/O.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .untrusted import loads_json

T = TypeVar("T")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}\Z")


class BadReply(ValueError):
    """An engine answered with something of an unexpected shape."""


@dataclass(frozen=True)
class ImageInfo:
    """A typed view of ``docker image inspect``."""

    id: str
    tags: tuple[str, ...]
    labels: dict[str, str]
    diff_ids: tuple[str, ...]
    size: int
    created: str
    config: dict[str, Any] = field(repr=False, default_factory=dict)
    parent: str = ""  # the image it was built on, on the classic store (else "")

    @property
    def fingerprint(self) -> str:
        """Content fingerprint, equal across image stores for the same content.

        sha256 over the RootFS diff IDs and the image config (env, cmd, entrypoint,
        labels, workdir, user...). Image IDs differ between the overlay2 and containerd
        stores for the same image; this does not.
        """
        return fingerprint_of(self.diff_ids, self.config)


CONFIG_KEYS = ("Env", "Cmd", "Entrypoint", "Labels", "WorkingDir", "User", "ExposedPorts",
               "Volumes")


_STRING_KEYS = ("WorkingDir", "User")


def _plain(key: str, value: object) -> object:
    """One spelling per empty value. ``docker inspect`` shows an unset WorkingDir or User
    as "" on both stores, and so does a classic-store config; a containerd-store config
    (OCI, fields omitted when empty) leaves them out. Empty lists and maps count as unset.
    (Classic-store fingerprints are unchanged by this: they already read "".)"""
    if key in _STRING_KEYS:
        return "" if value is None else value
    return None if value in ([], {}) else value


def fingerprint_of(diff_ids: tuple[str, ...], config: dict[str, Any]) -> str:
    """The content fingerprint of an image: its layers' diff IDs and the parts of its
    config that ``CONFIG_KEYS`` names (from ``docker inspect``'s Config or from the image
    config JSON's "config": the same values)."""
    try:
        material = {"diff_ids": list(diff_ids),
                    "config": {k: _plain(k, config.get(k)) for k in CONFIG_KEYS}}
        blob = json.dumps(material, sort_keys=True, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise BadReply(f"an image config cannot be fingerprinted: {exc}") from None
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def _str_list(value: object, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise BadReply(f"{what} is not a list of strings")
    return tuple(value)


def parse_image(data: object) -> ImageInfo:
    """One entry of ``docker image inspect``'s array, checked."""
    if not isinstance(data, dict):
        raise BadReply(f"an inspect entry is a {type(data).__name__}, not an object")
    image_id = data.get("Id")
    if not isinstance(image_id, str) or not _DIGEST.match(image_id):
        raise BadReply(f"an inspect entry has no valid Id ({image_id!r})")
    cfg = data.get("Config") or {}
    if not isinstance(cfg, dict):
        raise BadReply(f"{image_id[:19]}: Config is not an object")
    labels = cfg.get("Labels") or {}
    if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise BadReply(f"{image_id[:19]}: Config.Labels is not a string mapping")
    rootfs = data.get("RootFS") or {}
    if not isinstance(rootfs, dict):
        raise BadReply(f"{image_id[:19]}: RootFS is not an object")
    layers = _str_list(rootfs.get("Layers"), f"{image_id[:19]}: RootFS.Layers")
    if not all(_DIGEST.match(x) for x in layers):
        raise BadReply(f"{image_id[:19]}: RootFS.Layers holds a value that is not a digest")
    size = data.get("Size") or 0
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise BadReply(f"{image_id[:19]}: Size is not a byte count")
    return ImageInfo(
        id=image_id,
        tags=_str_list(data.get("RepoTags"), f"{image_id[:19]}: RepoTags"),
        labels=dict(labels),
        diff_ids=layers,
        size=size,
        created=str(data.get("Created") or ""),
        config={k: cfg.get(k) for k in CONFIG_KEYS},
        parent=str(data.get("Parent") or ""),
    )


def parse_array(text: str, parse: Callable[[object], T]) -> list[T]:
    """The JSON array ``docker ... inspect`` prints (empty text: none), each entry
    parsed with ``parse``."""
    if not text.strip():
        return []
    try:
        data = loads_json(text)
    except ValueError as exc:
        raise BadReply(f"docker inspect did not print JSON ({exc})") from None
    if not isinstance(data, list):
        raise BadReply("docker inspect did not print a JSON array")
    return [parse(entry) for entry in data]


def parse_images(text: str) -> list[ImageInfo]:
    """The JSON array ``docker image inspect`` prints (empty text: no images)."""
    return parse_array(text, parse_image)


