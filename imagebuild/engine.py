"""The one boundary to the Docker Engine: the only module that imports ``docker``.

Everything here returns typed results and raises ``EngineError`` (or a subclass)
carrying what was asked, what the engine said, and the tail of any log. Bulk bytes
(save/load) are streamed: nothing here holds an image or a layer in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import docker  # type: ignore[import-untyped]
import docker.errors  # type: ignore[import-untyped]
import requests.exceptions

from .errors import EngineError, ImageNotFound

API_TIMEOUT = 120  # seconds, for short calls; streaming calls use no timeout


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

    @property
    def fingerprint(self) -> str:
        """Content fingerprint, equal across image stores for the same content.

        sha256 over the RootFS diff IDs and the image config (env, cmd, entrypoint,
        labels, workdir, user...). Image IDs differ between the overlay2 and containerd
        stores for the same image; this does not.
        """
        material = {"diff_ids": list(self.diff_ids), "config": self.config}
        blob = json.dumps(material, sort_keys=True, separators=(",", ":")).encode()
        return "sha256:" + hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class BuildEvent:
    """One item of a build's progress stream."""

    kind: str  # "line" | "error" | "done"
    text: str = ""
    image_id: str = ""


@dataclass(frozen=True)
class RunResult:
    exit_code: int | None  # None: killed at its timeout
    stdout: str
    stderr: str
    timed_out: bool


def image_info_from_inspect(data: dict[str, Any]) -> ImageInfo:
    cfg = data.get("Config") or {}
    return ImageInfo(
        id=data["Id"],
        tags=tuple(data.get("RepoTags") or ()),
        labels=dict(cfg.get("Labels") or {}),
        diff_ids=tuple((data.get("RootFS") or {}).get("Layers") or ()),
        size=int(data.get("Size") or 0),
        created=str(data.get("Created") or ""),
        config={k: cfg.get(k) for k in ("Env", "Cmd", "Entrypoint", "Labels", "WorkingDir",
                                         "User", "ExposedPorts", "Volumes")},
    )


def is_local_engine_url(url: str) -> bool:
    """Whether an engine address is on this machine: a unix socket or a loopback TCP
    address (not ``ssh://`` or a remote ``tcp://``)."""
    if url.startswith(("unix://", "/")):
        return True
    host = urlsplit(url if "://" in url else "tcp://" + url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


class Engine:
    """A Docker engine, reached through ``DOCKER_HOST`` (or the default socket)."""

    def __init__(self, base_url: str | None = None) -> None:
        self.base_url = base_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        try:
            self.api = docker.APIClient(base_url=self.base_url, version="auto",
                                        timeout=API_TIMEOUT)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise EngineError(
                f"cannot reach the Docker engine at {self.base_url}: {_reason(exc)}",
                hint="is dockerd running? set DOCKER_HOST to its socket (for the test bed: "
                     "eval \"$(scripts/testbed env)\")",
            ) from None

    @property
    def on_this_host(self) -> bool:
        """Whether a build with host networking reaches this process on 127.0.0.1."""
        return is_local_engine_url(self.base_url)

    # -- images ------------------------------------------------------------------------------

    def inspect(self, ref: str) -> ImageInfo | None:
        try:
            return image_info_from_inspect(self.api.inspect_image(ref))
        except docker.errors.ImageNotFound:
            return None
        except docker.errors.APIError as exc:
            if exc.status_code == 404:
                return None
            raise self._error(f"inspect {ref}", exc) from None
        except requests.exceptions.RequestException as exc:
            raise self._error(f"inspect {ref}", exc) from None

    def require(self, ref: str) -> ImageInfo:
        info = self.inspect(ref)
        if info is None:
            raise ImageNotFound(f"image {ref} is not present in the engine at {self.base_url}")
        return info

    def find_by_label(self, key: str, value: str) -> list[ImageInfo]:
        try:
            rows = self.api.images(filters={"label": f"{key}={value}"})
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            raise self._error(f"list images with label {key}={value}", exc) from None
        out = []
        for row in rows:
            info = self.inspect(row["Id"])
            if info is not None:
                out.append(info)
        return out

    def tag(self, image_id: str, repository: str, tag: str) -> None:
        try:
            ok = self.api.tag(image_id, repository, tag, force=True)
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            raise self._error(f"tag {image_id} as {repository}:{tag}", exc) from None
        if not ok:
            raise EngineError(f"the engine refused to tag {image_id} as {repository}:{tag}")

    def remove_image(self, ref: str) -> None:
        try:
            self.api.remove_image(ref, force=True)
        except docker.errors.ImageNotFound:
            return
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            raise self._error(f"remove {ref}", exc) from None

    # -- save / load -------------------------------------------------------------------------

    def save(self, ref: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """``docker save`` as a stream of chunks (the engine exports before sending)."""
        try:
            # a dedicated client with no read timeout: the first byte may take minutes
            api = docker.APIClient(base_url=self.base_url, version=self.api.api_version,
                                   timeout=None)
            yield from api.get_image(ref, chunk_size=chunk_size)
        except docker.errors.NotFound:
            raise ImageNotFound(f"image {ref} is not present in the engine") from None
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            raise self._error(f"save {ref}", exc) from None

    def load(self, chunks: Iterable[bytes]) -> list[str]:
        """``docker load`` from a stream; returns the engine's "Loaded ..." lines."""
        api = docker.APIClient(base_url=self.base_url, version=self.api.api_version,
                               timeout=None)
        loaded: list[str] = []
        try:
            for item in api.load_image(chunks):
                if "error" in item:
                    detail = item.get("errorDetail") or {}
                    message = detail.get("message") or item["error"]
                    raise EngineError(f"docker load failed: {message}")
                text = str(item.get("stream") or "").strip()
                if text.startswith("Loaded"):
                    loaded.append(text)
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            raise self._error("load", exc) from None
        return loaded

    # -- build -------------------------------------------------------------------------------

    def build(self, context: Iterable[bytes], *, buildargs: dict[str, str],
              labels: dict[str, str], nocache: bool = False
              ) -> Generator[BuildEvent, None, None]:
        """Classic-builder build from a streamed tar context; yields progress events.

        Nothing is tagged here: the caller tags the image ID only after success, so no
        tag ever points at a failed or partial build. Intermediate containers are
        removed even on failure (forcerm). Builds use host networking.
        """
        try:
            stream = self.api.build(
                fileobj=context, custom_context=True, buildargs=buildargs, labels=labels,
                network_mode="host", rm=True, forcerm=True, pull=False, nocache=nocache,
                decode=True, timeout=None,
            )
            for item in stream:
                if "stream" in item:
                    yield BuildEvent("line", text=str(item["stream"]))
                elif "error" in item:
                    detail = item.get("errorDetail") or {}
                    yield BuildEvent("error", text=str(detail.get("message") or item["error"]))
                    return
                elif "aux" in item and isinstance(item["aux"], dict) and "ID" in item["aux"]:
                    yield BuildEvent("done", image_id=str(item["aux"]["ID"]))
                elif "status" in item:
                    yield BuildEvent("line", text=str(item["status"]) + "\n")
        except docker.errors.APIError as exc:
            yield BuildEvent("error", text=_reason(exc))
        except requests.exceptions.RequestException as exc:
            raise self._error("build", exc) from None

    # -- containers --------------------------------------------------------------------------

    def run_check(self, image: str, command: list[str], timeout: float) -> RunResult:
        """Run ``command`` in a throwaway container: entrypoint overridden, no network,
        killed at ``timeout``, always removed. Returns exit code and combined output."""
        try:
            cid = self.api.create_container(
                image, command=command[1:], entrypoint=[command[0]],
                network_disabled=True,
                host_config=self.api.create_host_config(network_mode="none"),
                labels={"org.imagebuild.check": "1"},
            )["Id"]
        except docker.errors.ImageNotFound:
            raise ImageNotFound(f"image {image} is not present in the engine") from None
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            raise self._error(f"create a check container from {image}", exc) from None
        try:
            self.api.start(cid)
            timed_out = False
            code: int | None
            try:
                status = self.api.wait(cid, timeout=timeout)
                code = int(status.get("StatusCode", -1))
            except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
                # docker-py surfaces a read timeout on the wait call as either
                timed_out, code = True, None
                self.api.kill(cid)
            out = self.api.logs(cid, stdout=True, stderr=False).decode(errors="replace")
            err = self.api.logs(cid, stdout=False, stderr=True).decode(errors="replace")
            return RunResult(exit_code=code, stdout=out, stderr=err, timed_out=timed_out)
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            raise self._error(f"run a check in {image}", exc) from None
        finally:
            try:
                self.api.remove_container(cid, force=True)
            except (docker.errors.APIError, requests.exceptions.RequestException):
                pass

    # -- info --------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        try:
            return dict(self.api.info())
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            raise self._error("info", exc) from None

    def _error(self, what: str, exc: Exception) -> EngineError:
        return EngineError(
            f"docker {what} failed on {self.base_url}: {_reason(exc)}",
            hint="check that dockerd is running and DOCKER_HOST points at it",
        )


def _reason(exc: Exception) -> str:
    if isinstance(exc, docker.errors.APIError):
        return str(exc.explanation or exc)
    return str(exc) or exc.__class__.__name__
