"""GC roots in the engines: the images an engine must keep, held by containers.

`docker image prune -a` removes every image no container uses, and `docker system prune
-a` first removes every stopped container. A root is therefore held by a *running*
container that does nothing (``sleep infinity``, no network, read-only, restarted with
the engine), one per root tag, named for what it keeps:

    imagebuild-root-vllm-node-mimo-latest          keeps vllm-node-mimo:latest
    imagebuild-root-vllm-node-mimo-1dfb5194cb7f    keeps vllm-node-mimo:1dfb5194cb7f

The roots of an image are its ``latest`` and the hash tags of its newest ``keep``
generations (the current one always among them; a generation counts from when it was
last promoted). ``root`` brings an engine's holders in line with that after each
promotion; ``plan_roots`` is the pure part.

What a blind prune leaves: both prunes leave every held image, and its ``latest``. On the
containerd image store every held tag survives. On the classic store, Docker removes all
but one tag of an image in use (moby#36295): the lexically last, ``latest``, stays, the
``NAME:<hash12>`` tag of the current image goes. ``root`` puts stripped tags back from
the holders' labels; every promotion runs it, and so does ``imagebuild prune``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .engine import ContainerInfo, Engine
from .image import ImageInfo
from .naming import LATEST, ROOT_LABEL, ROOT_TAG_LABEL, hash_tag, split_ref

PREFIX = "imagebuild-root"
BASE = "base"  # the tag label of the holder of a root image's base
PURPOSE_LABEL = "org.imagebuild.root.purpose"


def holder_name(image: str, tag: str) -> str:
    return f"{PREFIX}-{image}-{tag}"


def holder_labels(image: str, tag: str) -> dict[str, str]:
    return {ROOT_LABEL: image, ROOT_TAG_LABEL: tag,
            PURPOSE_LABEL: f"imagebuild GC root: keeps {image}:{tag} through docker image "
                           f"prune -a and docker system prune -a; see imagebuild status"}


@dataclass
class RootPlan:
    """What to do to an engine's holders of one image."""

    start: list[tuple[str, str]] = field(default_factory=list)  # (holder name, ref)
    remove: list[ContainerInfo] = field(default_factory=list)
    retag: list[tuple[str, str]] = field(default_factory=list)  # (image ID, NAME:TAG)

    @property
    def empty(self) -> bool:
        return not (self.start or self.remove or self.retag)


def plan_roots(name: str, image: ImageInfo, holders: list[ContainerInfo], keep: int,
               tags: dict[str, tuple[str, ...]], refresh: bool) -> RootPlan:
    """The holders of ``name`` once ``image`` is its ``latest``. Pure.

    ``holders``: the engine's holders (any image); ``tags``: the tags each image ID has
    now; ``refresh``: latest just moved here, so this generation becomes the newest.
    """
    plan = RootPlan()
    mine = {h.name: h for h in holders if h.labels.get(ROOT_LABEL) == name}
    current = hash_tag(name, image)
    wanted: dict[str, str] = {holder_name(name, LATEST): f"{name}:{LATEST}"}
    if current is not None:
        wanted[holder_name(name, split_ref(current)[1])] = current
    for hname, ref in wanted.items():
        h = mine.get(hname)
        fresh = h is not None and h.running and h.image_id == image.id
        if fresh and refresh and ref != f"{name}:{LATEST}":
            fresh = False  # recreated: its creation time orders the generations
        if not fresh:
            if h is not None:
                plan.remove.append(h)
            plan.start.append((hname, ref))
    generations = sorted(
        (h for h in mine.values()
         if h.name not in wanted and h.labels.get(ROOT_TAG_LABEL, LATEST) not in (LATEST,
                                                                                 BASE)),
        key=lambda h: h.created, reverse=True)
    older = generations[max(keep - 1, 0):]
    plan.remove.extend(older)
    for h in generations[:max(keep - 1, 0)]:
        tag = h.labels.get(ROOT_TAG_LABEL, "")
        if tag and h.image_id in tags and f"{name}:{tag}" not in tags[h.image_id]:
            plan.retag.append((h.image_id, f"{name}:{tag}"))
    for ref in wanted.values():
        if ref not in tags.get(image.id, ()):
            plan.retag.append((image.id, ref))
    return plan


def apply_roots(engine: Engine, name: str, plan: RootPlan) -> None:
    for h in plan.remove:
        engine.remove_container(h.id)
    for image_id, ref in plan.retag:  # tags first: a holder is started from its tag
        engine.tag(image_id, *split_ref(ref))
    for hname, ref in plan.start:
        engine.remove_container(hname)  # a stopped one of that name, left by someone
        engine.hold(hname, ref, holder_labels(name, split_ref(ref)[1]))


def root_base(engine: Engine, name: str, base: str,
              holders: list[ContainerInfo] | None = None) -> bool:
    """Hold the base image a root image is built FROM (``nvidia/cuda:...``): builds never
    pull, so a prune that removes it would stop the next build. Only where it is present
    (the head; workers get its layers inside the images). Returns whether it started one."""
    holders = engine.holders(f"{ROOT_LABEL}={name}") if holders is None else holders
    info = engine.inspect(base)
    if info is None:
        return False
    hname = holder_name(name, BASE)
    h = next((h for h in holders if h.name == hname), None)
    if h is not None and h.running and h.image_id == info.id:
        return False
    engine.remove_container(hname)
    labels = holder_labels(name, BASE)
    labels[PURPOSE_LABEL] = (f"imagebuild GC root: keeps {base}, the base {name} is built "
                             f"FROM (builds never pull)")
    engine.hold(hname, base, labels)
    return True


def root(engine: Engine, name: str, image: ImageInfo, keep: int, refresh: bool,
         holders: list[ContainerInfo] | None = None) -> RootPlan:
    """Bring ``engine``'s holders of ``name`` in line with ``image`` being its latest."""
    holders = engine.holders(f"{ROOT_LABEL}={name}") if holders is None else holders
    ids = {image.id, *(h.image_id for h in holders if h.labels.get(ROOT_LABEL) == name)}
    tags: dict[str, tuple[str, ...]] = {}
    for image_id in ids:
        info = image if image_id == image.id else engine.inspect(image_id)
        if info is not None:
            tags[image_id] = info.tags
    plan = plan_roots(name, image, holders, keep, tags, refresh)
    if not plan.empty:
        apply_roots(engine, name, plan)
    return plan

