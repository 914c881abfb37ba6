"""Render Dockerfiles from Jinja2 templates.

``StrictUndefined`` makes a missing parameter an error, and a ``finalize`` hook refuses
any interpolated value that carries a newline or control character, so nothing from
the spec can add a line to a Dockerfile even if a validator upstream missed it.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from .errors import RenderDrift, SpecError
from .fsutil import atomic_write_text
from .layers import describe, group_for
from .spec import ImageSpec, Spec

UV_REQUIREMENTS = "uv-requirements.txt"
# What an image installs: the part of its closure lock its parent does not have, split
# into the spec's layer groups (layers.py), one requirements file per group
# (``install-<group>.txt``): one direct URL per file, pinned by sha256, installed with
# --no-deps. Local wheels are not COPYed: imagebuild serves them to the RUN (see
# wheelserve.py), and their URLs start with ${IMAGEBUILD_WHEELS}, the build arg naming
# the server, declared just before the first group that can take a local wheel (a build
# arg's value is part of the builder cache key of every RUN after its declaration).
WHEELS_ARG = "IMAGEBUILD_WHEELS"


def _finalize(value: Any) -> Any:
    text = "" if value is None else str(value)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise SpecError(
            f"refusing to render {text!r}: it contains a newline or control character",
            hint="a spec value must not be able to inject lines into a Dockerfile",
        )
    return value


@functools.lru_cache(maxsize=8)
def _environment(templates_dir: Path) -> jinja2.Environment:
    """One environment per templates directory and process: its loader compiles each
    template once and compiles it again when the file changes (jinja's auto_reload)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir)),
        undefined=jinja2.StrictUndefined,
        finalize=_finalize,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["shq"] = lambda v: shlex.quote(str(v))
    return env


def dockerfile_path(spec: Spec, name: str) -> Path:
    return spec.dockerfiles_dir / f"{name}.Dockerfile"


def default_base(spec: Spec, img: ImageSpec) -> str:
    """The ``BASE_IMAGE`` default written in the Dockerfile (readable, runnable by hand)."""
    if img.parent is not None:
        return f"{img.parent}:latest"
    assert img.base_reference is not None
    return img.base_reference


def _index_wheel(spec: Spec, img: ImageSpec, name: str | None, key: str
                 ) -> dict[str, str] | None:
    """What a template needs to install a hash-pinned wheel from its index."""
    if name is None:
        return None
    for decl in spec.wheels:
        if decl.name == name and decl.index is not None:
            return {"name": decl.name, "version": decl.version, "index": decl.index}
    raise SpecError(f"{spec.path}: images.{img.name}.{key} names {name!r}, which is not "
                    f"declared under wheels.index")


def layer_context(spec: Spec, torch: str | None) -> list[dict[str, Any]]:
    """What a template needs of each install group, in install order: the group that
    takes the lineage's ``torch`` (the field's --force-reinstall), the groups that can
    take a local wheel, and the first of them (where the wheel server's build arg is
    declared)."""
    layers = spec.layers
    local = {group_for(n, True, layers).name for n in spec.local_names()}
    first_local = next((g.name for g in layers if g.name in local), None)
    reinstall = group_for(torch, False, layers).name if torch else None
    return [{"name": g.name, "requirements": g.requirements, "what": describe(g),
             "reinstall": g.name == reinstall, "local": g.name in local,
             "declare_arg": g.name == first_local}
            for g in layers]


def render_image(spec: Spec, name: str) -> str:
    img = spec.images[name]
    env = _environment(spec.templates_dir)
    try:
        template = env.get_template(img.template)
    except jinja2.TemplateNotFound:
        raise SpecError(f"{spec.path}: images.{name}.template: {img.template!r} not found in "
                        f"{spec.templates_dir}") from None
    except jinja2.TemplateSyntaxError as exc:
        raise SpecError(f"{exc.filename or spec.templates_dir / img.template}:{exc.lineno}: "
                        f"template syntax error: {exc.message}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{spec.templates_dir / img.template}: the template is not UTF-8 "
                        f"text (byte {exc.start})") from None
    except OSError as exc:
        raise SpecError(f"{spec.templates_dir / img.template}: cannot read the template: "
                        f"{exc.strerror or exc}") from None
    template_rel = os.path.relpath(template.filename or img.template, spec.root)
    header = (f"# generated by imagebuild render from {Path(template_rel).as_posix()}"
              f" — do not edit")
    p = img.params
    uv = _index_wheel(spec, img, p.uv, "params.uv")
    torch = spec.torch_of(name)
    context = {
        "header": header,
        "image": {"name": img.name, "parent": img.parent, "default_base": default_base(spec, img)},
        "apt_packages": list(p.apt_packages),
        "env": list(p.env),
        "uv": uv and {**uv, "requirements": UV_REQUIREMENTS},
        "install": {"arg": WHEELS_ARG, "lock": f"pylock.{img.name}.toml"},
        "layers": layer_context(spec, torch),
        "files": [{"src": f"files/{i}", "dest": f.dest,
                   "json": json.dumps([f"files/{i}", f.dest])}
                  for i, f in enumerate(img.files)],
        "workdir": img.workdir,
        "entrypoint": json.dumps(list(img.entrypoint)) if img.entrypoint else None,
        "cmd": json.dumps(list(img.cmd)) if img.cmd else None,
        "torch": _index_wheel(spec, img, torch, "torch"),
    }
    try:
        return template.render(**context)
    except jinja2.UndefinedError as exc:
        raise SpecError(f"{spec.templates_dir / img.template}: {exc.message}",
                        hint=f"set the parameter under images.{name}.params in {spec.path}"
                        ) from None
    except jinja2.TemplateError as exc:
        raise SpecError(f"{spec.templates_dir / img.template}: template error: {exc}") from None
    except SpecError:
        raise
    except RecursionError:
        raise SpecError(f"{spec.templates_dir / img.template}: the template includes or "
                        f"calls itself without end") from None
    except Exception as exc:  # a template is code: 1/0, a bad filter argument, ...
        raise SpecError(f"{spec.templates_dir / img.template}: rendering failed: "
                        f"{type(exc).__name__}: {exc}") from None


@dataclass(frozen=True)
class RenderResult:
    written: tuple[Path, ...]
    unchanged: tuple[Path, ...]


def render_all(spec: Spec) -> dict[Path, str]:
    """Every image's Dockerfile path and text (all rendered before anything is written)."""
    return {dockerfile_path(spec, name): render_image(spec, name) for name in spec.images}


def _committed(path: Path) -> str | None:
    """A committed Dockerfile's text (None: there is none), read as an edge input."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        return "(not UTF-8 text)\n"  # differs from any rendering: reported as drift
    except OSError as exc:
        raise SpecError(f"{path}: cannot read it: {exc.strerror or exc}",
                        hint="the spec's 'dockerfiles:' must name a directory") from None


def write_rendered(spec: Spec) -> RenderResult:
    rendered = render_all(spec)
    written: list[Path] = []
    unchanged: list[Path] = []
    for path, text in rendered.items():
        if _committed(path) == text:
            unchanged.append(path)
            continue
        try:
            atomic_write_text(path, text)
        except OSError as exc:
            raise SpecError(f"cannot write {path}: {exc.strerror or exc}",
                            hint="the spec's 'dockerfiles:' must name a directory") from None
        written.append(path)
    return RenderResult(written=tuple(written), unchanged=tuple(unchanged))


def check_rendered(spec: Spec) -> None:
    """Raise RenderDrift with a unified diff when committed Dockerfiles are stale."""
    rendered = render_all(spec)
    diffs: list[str] = []
    for path, text in rendered.items():
        current = _committed(path) or ""
        if current != text:
            rel = _rel(path, spec.root)
            diffs.extend(difflib.unified_diff(
                current.splitlines(keepends=True), text.splitlines(keepends=True),
                fromfile=f"{rel} (committed)" if current else f"{rel} (missing)",
                tofile=f"{rel} (rendered)",
            ))
    if spec.dockerfiles_dir.is_dir():
        for extra in sorted(spec.dockerfiles_dir.glob("*.Dockerfile")):
            if extra not in rendered:
                diffs.append(f"{_rel(extra, spec.root)}: no image of the spec renders this file\n")
    if diffs:
        raise RenderDrift(
            "committed Dockerfiles differ from what the templates produce:\n"
            + "".join(d if d.endswith("\n") else d + "\n" for d in diffs).rstrip("\n"),
            hint="run 'imagebuild render' and commit dockerfiles/ (or remove stale files)",
        )


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
