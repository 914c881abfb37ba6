"""A worker's engine over OpenSSH: the docker CLI on the worker, through remote.py.

Every reply is parsed by the same functions as the head's (``engine.parse_*``); a reply
of an unexpected shape (a login banner on stdout, an inspect entry without ``Id``) is a
``RemoteError`` naming the worker, so one bad worker fails alone. Bulk bytes go through
OpenSSH: ``load_archive`` pushes ranges of local files into ``ssh worker docker load``
with ``os.sendfile`` (no Python in the data path), except the files of a backup
generation that must match their sha256: those are read, hashed and written, their last
chunk held back until the digest matched.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator

from .engine import (
    BuildEvent,
    ContainerInfo,
    Engine,
    EngineInfo,
    OnLine,
    RunResult,
    Snapshot,
    parse_container,
    parse_info,
)
from .errors import EngineError, ImageNotFound, RemoteError
from .image import BadReply, ImageInfo, T, parse_array, parse_images
from .naming import CHECK_LABEL, ROOT_LABEL
from .remote import Process, Target, call, explain, finish, last_line, reading, run, start
from .streams import CHUNK, FileRange, OnBytes, Piece, piece_chunks
from .untrusted import loads_json

# One round trip: the engine's info, then the inspect arrays of every image and of every
# root holder, in marked sections (a constant script; nothing from the spec reaches this
# shell). The arrays are docker's own inspect output, as the head's SDK sees it: a
# --format '{{json .}}' rendering leaves out empty fields and would change fingerprints.
PROBE = ('docker info --format "{{json .}}" && echo @@images && '
         "docker images -aq --no-trunc | sort -u | xargs -r docker image inspect && "
         f"echo @@holders && docker ps -aq --no-trunc --filter label={ROOT_LABEL} "
         "| xargs -r docker container inspect")
HOLDERS = ('docker ps -aq --no-trunc --filter "label=$1" '
           "| xargs -r docker container inspect")
_SIZE = re.compile(r"^([0-9.]+)\s*([kKMGTP]?B)\Z")
_UNITS = {"B": 1, "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "PB": 10**15}
# Images with a label: the label arrives as "$1", never as shell text.
BY_LABEL = ('docker images -q --no-trunc --filter "label=$1" | sort -u '
            "| xargs -r docker image inspect")
_NOT_FOUND = ("No such image", "No such object", "not found", "reference does not exist")
CHECK_GRACE = 5  # seconds ssh may take on top of a check's own timeout


class SshEngine(Engine):
    """The Docker engine of one worker, reached with ``ssh worker docker ...``."""

    def __init__(self, target: Target) -> None:
        self.target = target

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def where(self) -> str:
        return str(self.target)

    @property
    def on_this_host(self) -> bool:
        return False

    def _reply(self, what: str, parse_text: str) -> list[ImageInfo]:
        try:
            return parse_images(parse_text)
        except BadReply as exc:
            raise RemoteError(f"{self.target}: unexpected reply to {what}: {exc}",
                              hint="a login banner or message on stdout breaks replies; "
                                   "make the worker's shell print nothing for "
                                   "non-interactive ssh") from None

    # -- images ------------------------------------------------------------------------------

    def info(self) -> EngineInfo:
        return self._parse_info(run(self.target, ["docker", "info", "--format", "{{json .}}"]))

    def _parse_info(self, line: str) -> EngineInfo:
        try:
            return parse_info(loads_json(line))
        except (ValueError, BadReply) as exc:
            raise RemoteError(f"{self.target}: unexpected reply to docker info: {exc}",
                              hint="a login banner or message on stdout breaks replies; "
                                   "make the worker's shell print nothing for "
                                   "non-interactive ssh") from None

    def snapshot(self) -> Snapshot:
        out = run(self.target, ["sh", "-c", PROBE])
        first, sep1, rest = out.partition("\n@@images\n")
        images, sep2, holders = rest.partition("@@holders\n")
        if not sep1 or not sep2:
            raise RemoteError(f"{self.target}: unexpected reply to the probe (no sections)",
                              hint="a login banner or message on stdout breaks replies; "
                                   "make the worker's shell print nothing for "
                                   "non-interactive ssh")
        return Snapshot(info=self._parse_info(first),
                        images=tuple(self._reply("the image listing", images)),
                        holders=tuple(self._array("the root holders", holders,
                                                  parse_container)))

    def _array(self, what: str, text: str, parse: Callable[[object], T]) -> list[T]:
        try:
            return parse_array(text, parse)
        except BadReply as exc:
            raise RemoteError(f"{self.target}: unexpected reply to {what}: {exc}") from None

    def inspect(self, ref: str) -> ImageInfo | None:
        r = call(self.target, ["docker", "image", "inspect", "--", ref])
        if r.code == 0:
            found = self._reply(f"docker image inspect {ref}", r.stdout)
            if len(found) != 1:
                raise RemoteError(f"{self.target}: docker image inspect {ref} returned "
                                  f"{len(found)} images")
            return found[0]
        if r.code == 1 and any(s in r.stderr for s in _NOT_FOUND):
            return None
        raise self._failed(f"docker image inspect {ref}", r.code, r.stderr)

    def find_by_label(self, key: str, value: str) -> list[ImageInfo]:
        out = run(self.target, ["sh", "-c", BY_LABEL, "sh", f"{key}={value}"])
        return self._reply(f"images labelled {key}", out)

    def tag(self, image_id: str, repository: str, tag: str) -> None:
        run(self.target, ["docker", "tag", image_id, f"{repository}:{tag}"])

    def remove_image(self, ref: str) -> None:
        r = call(self.target, ["docker", "rmi", "-f", "--", ref])
        if r.code != 0 and not (r.code == 1 and any(s in r.stderr for s in _NOT_FOUND)):
            raise self._failed(f"docker rmi {ref}", r.code, r.stderr)

    # -- save / load -------------------------------------------------------------------------

    def save(self, *refs: str) -> Iterator[bytes]:
        ref = " ".join(refs)
        with reading(self.target, ["docker", "save", "--", *refs]) as proc:
            assert proc.stdout is not None
            while chunk := proc.stdout.read(CHUNK):
                yield chunk
        r = finish(proc)
        if r.code != 0:
            if any(s in r.stderr for s in _NOT_FOUND):
                raise ImageNotFound(f"{self.target}: image {ref} is not present")
            raise self._failed(f"docker save {ref}", r.code, r.stderr)

    def load(self, chunks: Iterable[bytes]) -> list[str]:
        def feed(fd: int, count: OnBytes) -> None:
            for chunk in chunks:
                _write_all(fd, chunk)
                count(len(chunk))

        return self._loading(feed)[0]

    def load_archive(self, pieces: list[Piece], on_bytes: OnBytes | None = None) -> int:
        """Pieces into ``docker load``: ranges of each file's open descriptor with
        ``sendfile``, or, for a range that must match its sha256, read, hashed and
        written (``piece_chunks``: a mismatch raises before the file's last chunk, and
        the load is killed, so ``docker load`` sees a truncated archive); literals with
        ``write``."""

        def feed(fd: int, count: OnBytes) -> None:
            for piece in pieces:
                if not isinstance(piece, FileRange) or piece.sha256 is not None:
                    for chunk in piece_chunks(piece):
                        _write_all(fd, chunk)
                        count(len(chunk))
                    continue
                offset, length = piece.offset, piece.length
                while length > 0:
                    n = os.sendfile(fd, piece.file.fd, offset, min(length, 1 << 30))
                    if n == 0:
                        raise RemoteError(f"{piece.file.path} ended early while sending to "
                                          f"{self.target.name}")
                    offset += n
                    length -= n
                    count(n)

        return self._loading(feed, on_bytes)[1]

    def _loading(self, feed: Callable[[int, OnBytes], None], on_bytes: OnBytes | None = None
                 ) -> tuple[list[str], int]:
        """Run ``ssh worker docker load`` and let ``feed`` write the archive to its stdin;
        returns the "Loaded ..." lines and the bytes sent."""
        proc = start(self.target, ["docker", "load"])
        assert proc.stdin is not None
        sent = 0

        def count(n: int) -> None:
            nonlocal sent
            sent += n
            if on_bytes is not None:
                on_bytes(sent)

        broken = False
        try:
            feed(proc.stdin.fileno(), count)
        except (BrokenPipeError, ConnectionResetError):
            broken = True
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        return self._finish_load(proc, sent, broken), sent

    def _finish_load(self, proc: Process, sent: int, broken: bool) -> list[str]:
        r = finish(proc)
        if r.code != 0 or broken:
            why = (explain(self.target, r.code or 255, r.stderr) if r.code or r.stderr.strip()
                   else f"{self.target.name}: the connection closed during the transfer")
            raise RemoteError(f"transfer failed after {sent / 1e6:.1f} MB: {why}")
        return [ln.strip() for ln in r.stdout.splitlines() if ln.strip().startswith("Loaded")]

    def pull(self, ref: str, on_line: OnLine | None = None) -> None:
        """``ssh worker docker pull -- REF``; its progress lines go to ``on_line`` as they
        come. A pull that fails leaves no tag: docker tags only a complete image."""
        with reading(self.target, ["docker", "pull", "--", ref]) as proc:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode(errors="replace").strip()
                if line and on_line is not None:
                    on_line(line)
        r = finish(proc)
        if r.code != 0:
            if r.code == 1 and any(s in r.stderr for s in ("manifest unknown", "not found")):
                raise ImageNotFound(f"{self.target}: {ref} is not in its registry: "
                                    f"{last_line(r.stderr)}")
            raise self._failed(f"docker pull {ref}", r.code, r.stderr)

    # -- build and checks --------------------------------------------------------------------

    def build(self, context: Iterable[bytes], *, buildargs: dict[str, str],
              nocache: bool = False) -> Generator[BuildEvent, None, None]:
        raise EngineError(f"{self.target}: images are built on the head node's engine, "
                          f"not on a worker",
                          hint="run imagebuild build on the head, then imagebuild distribute")
        yield BuildEvent("error")  # pragma: no cover - makes this a generator

    def run_check(self, image: str, command: list[str], timeout: float) -> RunResult:
        name = f"imagebuild-check-{uuid.uuid4().hex[:12]}"
        argv = ["docker", "run", "--rm", "--pull", "never", "--name", name, "--network", "none",
                "--label", f"{CHECK_LABEL}=1", "--entrypoint", command[0], "--", image,
                *command[1:]]
        r = call(self.target, argv, timeout=timeout + CHECK_GRACE)
        if r.code is None or r.code == 255:
            call(self.target, ["docker", "rm", "-f", name])
        if r.code is None:
            return RunResult(exit_code=None, stdout=r.stdout, stderr=r.stderr, timed_out=True)
        if r.code == 255:
            raise self._failed(f"docker run {image}", r.code, r.stderr)
        if r.code == 125 and any(s in r.stderr for s in _NOT_FOUND):
            raise ImageNotFound(f"{self.target}: image {image} is not present")
        return RunResult(exit_code=r.code, stdout=r.stdout, stderr=r.stderr, timed_out=False)

    # -- root holders ------------------------------------------------------------------------

    def holders(self, label: str) -> list[ContainerInfo]:
        out = run(self.target, ["sh", "-c", HOLDERS, "sh", label])
        return self._array(f"containers labelled {label}", out, parse_container)

    def hold(self, name: str, ref: str, labels: dict[str, str]) -> ContainerInfo:
        argv = ["docker", "run", "-d", "--pull", "never", "--name", name, "--network", "none",
                "--restart", "unless-stopped", "--read-only",
                "--security-opt", "no-new-privileges", "--entrypoint", "sleep"]
        for k, v in sorted(labels.items()):
            argv += ["--label", f"{k}={v}"]
        r = call(self.target, [*argv, "--", ref, "infinity"])
        if r.code != 0:
            if r.code == 125 and any(s in r.stderr for s in _NOT_FOUND):
                raise ImageNotFound(f"{self.target}: image {ref} is not present")
            raise self._failed(f"docker run (the root holder {name})", r.code, r.stderr)
        found = self._array("docker container inspect",
                            run(self.target, ["docker", "container", "inspect", "--", name]),
                            parse_container)
        if len(found) != 1:
            raise RemoteError(f"{self.target}: the root holder {name} is not there after "
                              f"docker run")
        return found[0]

    def remove_container(self, ref: str) -> None:
        r = call(self.target, ["docker", "rm", "-f", "--", ref])
        if r.code != 0 and not (r.code == 1 and any(s in r.stderr for s in _NOT_FOUND)):
            raise self._failed(f"docker rm {ref}", r.code, r.stderr)

    def disk_usage(self) -> int:
        out = run(self.target, ["docker", "system", "df", "--format",
                                "{{.Type}}\t{{.Size}}"])
        for line in out.splitlines():
            kind, _, size = line.partition("\t")
            if kind.strip() == "Images":
                m = _SIZE.match(size.strip())
                if m:
                    return int(float(m.group(1)) * _UNITS[m.group(2)])
        raise RemoteError(f"{self.target}: unexpected reply to docker system df: "
                          f"{out[:80]!r}")

    def _failed(self, what: str, code: int | None, stderr: str) -> RemoteError:
        if code == 255 or code is None:
            return RemoteError(explain(self.target, code or 255, stderr))
        return RemoteError(f"{self.target}: {what} failed (exit {code}): "
                           f"{last_line(stderr) or 'no output'}")



def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
