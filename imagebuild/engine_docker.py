"""The head's engine through the docker SDK: the only module that imports ``docker``.

Every call returns the typed results of ``engine.py`` and raises ``EngineError`` (or a
subclass) carrying what was asked and what the engine said. Bulk bytes (save, load,
build contexts) are streamed: nothing here holds an image or a layer in memory.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterable, Iterator
from typing import Any

import docker  # type: ignore[import-untyped]
import docker.errors  # type: ignore[import-untyped]
import requests.exceptions

from .engine import (
    BuildEvent,
    ContainerInfo,
    Engine,
    EngineInfo,
    Job,
    OnLine,
    Receive,
    RunResult,
    Snapshot,
    is_local_engine_url,
    parse_container,
    parse_info,
)
from .errors import EngineError, ImageNotFound
from .image import BadReply, ImageInfo, parse_image
from .naming import CHECK_LABEL, ROOT_LABEL

API_TIMEOUT = 120  # seconds, for short calls; streaming calls use no timeout
LINE_MAX = 1 << 16  # a job's output line longer than this is passed on in pieces
_FAILURES = (docker.errors.APIError, requests.exceptions.RequestException, BadReply)


class DockerEngine(Engine):
    """A Docker engine reached through ``DOCKER_HOST`` (or the default socket)."""

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
    def where(self) -> str:
        return self.base_url

    @property
    def on_this_host(self) -> bool:
        return is_local_engine_url(self.base_url)

    def _streaming_client(self) -> Any:
        """A client with no read timeout: a save's first byte may take minutes."""
        return docker.APIClient(base_url=self.base_url, version=self.api.api_version,
                                timeout=None)

    # -- images ------------------------------------------------------------------------------

    def info(self) -> EngineInfo:
        try:
            return parse_info(self.api.info())
        except _FAILURES as exc:
            raise self._error("info", exc) from None

    def snapshot(self) -> Snapshot:
        try:
            rows = self.api.images(all=True)
        except _FAILURES as exc:
            raise self._error("list images", exc) from None
        ids = sorted({str(row.get("Id")) for row in rows if isinstance(row, dict)})
        images = [info for i in ids if (info := self.inspect(i)) is not None]
        return Snapshot(info=self.info(), images=tuple(images),
                        holders=tuple(self.holders(ROOT_LABEL)))

    def inspect(self, ref: str) -> ImageInfo | None:
        try:
            return parse_image(self.api.inspect_image(ref))
        except docker.errors.ImageNotFound:
            return None
        except docker.errors.APIError as exc:
            if exc.status_code == 404:
                return None
            raise self._error(f"inspect {ref}", exc) from None
        except (requests.exceptions.RequestException, BadReply) as exc:
            raise self._error(f"inspect {ref}", exc) from None

    def find_by_label(self, key: str, value: str) -> list[ImageInfo]:
        try:
            rows = self.api.images(filters={"label": f"{key}={value}"})
        except _FAILURES as exc:
            raise self._error(f"list images with label {key}={value}", exc) from None
        ids = sorted({str(row.get("Id")) for row in rows if isinstance(row, dict)})
        return [info for i in ids if (info := self.inspect(i)) is not None]

    def tag(self, image_id: str, repository: str, tag: str) -> None:
        try:
            ok = self.api.tag(image_id, repository, tag, force=True)
        except _FAILURES as exc:
            raise self._error(f"tag {image_id} as {repository}:{tag}", exc) from None
        if not ok:
            raise EngineError(f"the engine refused to tag {image_id} as {repository}:{tag}")

    def remove_image(self, ref: str) -> None:
        try:
            self.api.remove_image(ref, force=True)
        except docker.errors.ImageNotFound:
            return
        except _FAILURES as exc:
            raise self._error(f"remove {ref}", exc) from None

    # -- save / load -------------------------------------------------------------------------

    def save(self, *refs: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        what = " ".join(refs)
        try:
            api = self._streaming_client()
            if len(refs) == 1:
                yield from api.get_image(refs[0], chunk_size=chunk_size)
                return
            # several images in one archive (GET /images/get?names=...), which docker-py
            # has no public call for
            res = api._get(api._url("/images/get"), params={"names": list(refs)}, stream=True)
            api._raise_for_status(res)
            yield from api._stream_raw_result(res, chunk_size, False)
        except docker.errors.NotFound:
            raise ImageNotFound(f"image {what} is not present in the engine") from None
        except _FAILURES as exc:
            raise self._error(f"save {what}", exc) from None

    def load(self, chunks: Iterable[bytes]) -> list[str]:
        loaded: list[str] = []
        try:
            for item in self._streaming_client().load_image(chunks):
                if "error" in item:
                    detail = item.get("errorDetail") or {}
                    message = detail.get("message") or item["error"]
                    raise EngineError(f"docker load failed on {self.base_url}: {message}")
                text = str(item.get("stream") or "").strip()
                if text.startswith("Loaded"):
                    loaded.append(text)
        except _FAILURES as exc:
            raise self._error("load", exc) from None
        return loaded

    # -- build -------------------------------------------------------------------------------

    def build(self, context: Iterable[bytes], *, buildargs: dict[str, str],
              nocache: bool = False) -> Generator[BuildEvent, None, None]:
        """Classic-builder build from a streamed tar context; yields progress events.

        Nothing is tagged here: the caller tags the image ID only after success, so no
        tag ever points at a failed or partial build. Intermediate containers are
        removed even on failure (forcerm). Builds use host networking.
        """
        try:
            stream = self.api.build(
                fileobj=context, custom_context=True, buildargs=buildargs,
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
        try:
            cid = self.api.create_container(
                image, command=command[1:], entrypoint=[command[0]],
                network_disabled=True,
                host_config=self.api.create_host_config(network_mode="none"),
                labels={CHECK_LABEL: "1"},
            )["Id"]
        except docker.errors.ImageNotFound:
            raise ImageNotFound(f"image {image} is not present in the engine") from None
        except _FAILURES as exc:
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
        except _FAILURES as exc:
            raise self._error(f"run a check in {image}", exc) from None
        finally:
            self._discard(cid)

    def run_job(self, job: Job, upload: Iterable[bytes], on_line: OnLine,
                receive: Receive) -> int:
        api = self._streaming_client()  # a wheel build may run for hours
        try:
            cid = api.create_container(
                job.image, command=list(job.command[1:]), entrypoint=[job.command[0]],
                environment=dict(job.env), working_dir=job.workdir, labels=dict(job.labels),
                host_config=api.create_host_config(
                    network_mode="host",
                    binds={vol: {"bind": mount, "mode": "rw"} for vol, mount in job.volumes}),
            )["Id"]
        except docker.errors.ImageNotFound:
            raise ImageNotFound(
                f"the builder image {job.image} is not present in the engine at "
                f"{self.base_url}",
                hint=f"docker pull {job.image} (or build it), then run again: "
                     "builds never pull implicitly") from None
        except _FAILURES as exc:
            raise self._error(f"create a build container from {job.image}", exc) from None
        try:
            if not api.put_archive(cid, "/", upload):
                raise EngineError(f"the engine refused the source for the job in {job.image}")
            api.start(cid)
            pending = b""
            for chunk in api.logs(cid, stream=True, follow=True, stdout=True, stderr=True):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                if len(pending) > LINE_MAX:  # progress bars without newlines: flush
                    lines.append(pending)
                    pending = b""
                for line in lines:
                    on_line(line.decode(errors="replace"))
            if pending:
                on_line(pending.decode(errors="replace"))
            code = int(api.wait(cid).get("StatusCode", -1))
            if code == 0:
                stream, _stat = api.get_archive(cid, job.output, chunk_size=1 << 20)
                receive(stream)
            return code
        except _FAILURES as exc:
            raise self._error(f"run a job in {job.image}", exc) from None
        finally:
            self._discard(cid)

    def _discard(self, cid: str) -> None:
        """Remove a throwaway container, whatever state it is in (best effort: the
        failure that brought us here is the one to report)."""
        try:
            self.api.remove_container(cid, force=True)
        except (docker.errors.APIError, requests.exceptions.RequestException):
            pass

    # -- root holders ------------------------------------------------------------------------

    def holders(self, label: str) -> list[ContainerInfo]:
        try:
            rows = self.api.containers(all=True, filters={"label": label})
            out = []
            for row in rows:
                try:
                    out.append(parse_container(self.api.inspect_container(row["Id"])))
                except docker.errors.NotFound:
                    continue  # removed while we looked
            return out
        except (*_FAILURES, KeyError, TypeError) as exc:
            raise self._error(f"list containers labelled {label}", exc) from None

    def hold(self, name: str, ref: str, labels: dict[str, str]) -> ContainerInfo:
        try:
            cid = self.api.create_container(
                ref, command=["infinity"], entrypoint=["sleep"], name=name, labels=labels,
                network_disabled=True,
                host_config=self.api.create_host_config(
                    network_mode="none", restart_policy={"Name": "unless-stopped"},
                    read_only=True, security_opt=["no-new-privileges"]),
            )["Id"]
            self.api.start(cid)
            return parse_container(self.api.inspect_container(cid))
        except docker.errors.ImageNotFound:
            raise ImageNotFound(f"image {ref} is not present in the engine") from None
        except _FAILURES as exc:
            raise self._error(f"start the root holder {name} from {ref}", exc) from None

    def remove_container(self, ref: str) -> None:
        try:
            self.api.remove_container(ref, force=True)
        except docker.errors.NotFound:
            return
        except _FAILURES as exc:
            raise self._error(f"remove container {ref}", exc) from None

    def disk_usage(self) -> int:
        try:
            return int(self.api.df().get("LayersSize") or 0)
        except (*_FAILURES, ValueError) as exc:
            raise self._error("system df", exc) from None

    def _error(self, what: str, exc: Exception) -> EngineError:
        return EngineError(
            f"docker {what} failed on {self.base_url}: {_reason(exc)}",
            hint="check that dockerd is running and DOCKER_HOST points at it",
        )


def _reason(exc: Exception) -> str:
    if isinstance(exc, docker.errors.APIError):
        return str(exc.explanation or exc)
    return str(exc) or exc.__class__.__name__
