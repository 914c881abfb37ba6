"""Install layers: how an image's locked closure is split into RUN steps, stable to
volatile. Pure: no I/O.

Every image installs what its closure lock has and its parent's does not, in groups, one
``COPY`` + ``RUN`` each, in the order the groups are declared. The builder cache reuses a
step when its requirements file and everything below it are unchanged, so a changed
wheel rebuilds only its own group and the groups above it: ordering the groups from what
changes rarely (the CUDA runtime wheels, torch) to what changes often (the locally built
vllm) keeps a vllm bump from re-shipping the gigabytes below it.

Which group takes a distribution (its canonical name):

1. the first group that names it exactly (``torch``);
2. else the first group with a pattern that matches it (``nvidia-*``);
3. else, for a local or built wheel, the first group with ``local: true``;
4. else the group whose patterns hold ``*`` (what no other group takes).

The assignment depends on the spec only (names and whether a wheel is local), so the
rendered Dockerfiles do not change when a lock does: an image whose group is empty
installs nothing in that step.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

CATCH_ALL = "*"
GROUP_NAME = re.compile(r"^[a-z][a-z0-9-]{0,23}\Z")
# a project name, or one with fnmatch wildcards (no path or shell characters)
PATTERN = re.compile(r"^[A-Za-z0-9*?][A-Za-z0-9*?._-]{0,99}\Z")


@dataclass(frozen=True)
class LayerGroup:
    name: str
    packages: tuple[str, ...] = ()  # canonical names and fnmatch patterns
    local: bool = False  # takes the local and built wheels no other group names

    @property
    def requirements(self) -> str:
        """The build-context file of this group's hash-pinned requirements."""
        return f"install-{self.name}.txt"

    @property
    def catch_all(self) -> bool:
        return CATCH_ALL in self.packages


DEFAULT_LAYERS: tuple[LayerGroup, ...] = (
    LayerGroup("cuda", ("nvidia-*", "cuda-*", "triton")),  # what torch needs: big, stable
    LayerGroup("torch", ("torch",)),
    LayerGroup("deps", (CATCH_ALL,)),
    LayerGroup("flashinfer", ("flashinfer-*",)),
    LayerGroup("wheels", (), local=True),  # the local and built wheels: vllm, most volatile
)


def _exact(pattern: str) -> bool:
    return not any(c in pattern for c in "*?[")


def group_for(name: str, local: bool, layers: Sequence[LayerGroup]) -> LayerGroup:
    """The group that installs the distribution ``name`` (canonical)."""
    for g in layers:
        if any(_exact(p) and p == name for p in g.packages):
            return g
    for g in layers:
        if any(not _exact(p) and p != CATCH_ALL and fnmatch.fnmatchcase(name, p)
               for p in g.packages):
            return g
    if local:
        for g in layers:
            if g.local:
                return g
    for g in layers:
        if g.catch_all:
            return g
    # the spec's validation guarantees a catch-all group
    raise AssertionError(f"no layer group takes {name}")


def assign(names: Iterable[tuple[str, bool]], layers: Sequence[LayerGroup]
           ) -> dict[str, list[str]]:
    """Group name -> the distributions it installs (``names``: (canonical name, is
    local)), every declared group present, in declaration order."""
    out: dict[str, list[str]] = {g.name: [] for g in layers}
    for name, local in names:
        out[group_for(name, local, layers).name].append(name)
    return out


def describe(g: LayerGroup) -> str:
    """A group's selector in words, for comments and ``plan``."""
    parts = [p for p in g.packages if p != CATCH_ALL]
    if g.local:
        parts.append("local and built wheels")
    if g.catch_all:
        parts.append("everything no other group takes")
    return ", ".join(parts)
