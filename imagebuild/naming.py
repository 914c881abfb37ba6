"""How imagebuild names and labels images: one place for the hash tag, the short ID and
the provenance labels, so every command agrees on them.

An image imagebuild built carries its full input hash as the label
``org.imagebuild.input-hash`` and is tagged ``NAME:<hash12>`` (the first 12 hex digits).
``NAME:latest`` is the GC root and only ever points at a verified image.
"""

from __future__ import annotations

from .image import ImageInfo

HASH_LABEL = "org.imagebuild.input-hash"
IMAGE_LABEL = "org.imagebuild.image"
VERSION_LABEL = "org.imagebuild.version"
GIT_LABEL = "org.imagebuild.git-commit"
WHEEL_LABEL_PREFIX = "org.imagebuild.wheel."
ADOPTED_LABEL = "org.imagebuild.adopted"  # an adopted image: the content it was adopted as
CHECK_LABEL = "org.imagebuild.check"  # on the throwaway containers that run checks
ROOT_LABEL = "org.imagebuild.root"  # on GC-root holder containers: the image name
ROOT_TAG_LABEL = "org.imagebuild.root.tag"  # the tag a holder keeps: latest or <hash12>
LATEST = "latest"
HASH12 = 12


def short_id(image_id: str) -> str:
    """The 12 hex digits Docker shows for an image ID (``sha256:`` dropped)."""
    return image_id.removeprefix("sha256:")[:HASH12]


def input_hash(info: ImageInfo) -> str | None:
    """The input hash an image was built from, from its label (None: not built by us)."""
    return info.labels.get(HASH_LABEL) or None


def hash12(input_hash: str) -> str:
    return input_hash[:HASH12]


def hash_tag(name: str, info: ImageInfo) -> str | None:
    """``NAME:<hash12>`` of an image built by imagebuild; None for an unlabelled image."""
    h = input_hash(info)
    return f"{name}:{hash12(h)}" if h else None


def latest_tag(name: str) -> str:
    return f"{name}:{LATEST}"


def split_ref(ref: str) -> tuple[str, str]:
    """``repo:tag`` -> (repo, tag); a registry port (``host:5000/x``) is not a tag."""
    repo, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        return ref, LATEST
    return repo, tag
