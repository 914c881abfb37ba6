"""The blobs of the layer store (docs/layer-store.md): every layer once, by digest.

    <root>/blobs/sha256/<hex>     a layer or config file, named by the sha256 of its bytes
    <root>/blobs/.incoming/       files being written (removed by ``clean_incoming``)

``ingest`` takes one file of a ``docker save`` stream and writes only what the store
lacks. A file named by its digest (``blobs/sha256/<hex>`` in an OCI layout) is hashed in
passing and compared with its name; it is written only when absent. A file whose name
says nothing (``<v1 id>/layer.tar`` of a classic-store save) is compared, chunk by
chunk, with the stored blobs of exactly its size: when one matches to the last byte the
layer is already there and nothing is written; when the last candidate diverges, the
prefix that matched is copied from it and the rest of the stream follows. Memory stays
flat: one chunk per open file.

Not yet wired into ``backup.py``: the generation directories, the readers and the ssh
store come next (issue 18).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .errors import BackupError
from .fsutil import fsync_dir

CHUNK = 1 << 20
_HEX = re.compile(r"^[0-9a-f]{64}$")

Read = Callable[[int], bytes]  # read(n): up to n bytes, b"" at the end


@dataclass(frozen=True)
class Ingested:
    digest: str  # hex sha256 of the file's bytes
    size: int
    written: int  # bytes written to the store (0: it was there already)


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.incoming_dir = root / "blobs" / ".incoming"

    def path(self, digest: str) -> Path:
        if not _HEX.match(digest):
            raise BackupError(f"{digest!r} is not a sha256 hex digest")
        return self.blobs / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def by_size(self) -> dict[int, list[str]]:
        """The stored blobs by size (the candidates of an unnamed layer)."""
        out: dict[int, list[str]] = {}
        if self.blobs.is_dir():
            for entry in os.scandir(self.blobs):
                if _HEX.match(entry.name) and entry.is_file(follow_symlinks=False):
                    out.setdefault(entry.stat().st_size, []).append(entry.name)
        return out

    def clean_incoming(self) -> None:
        """Remove what an interrupted write left behind."""
        shutil.rmtree(self.incoming_dir, ignore_errors=True)

    def ingest(self, read: Read, size: int, named: str | None = None,
               sizes: dict[int, list[str]] | None = None) -> Ingested:
        """Store the ``size`` bytes ``read`` yields, unless the store has them.

        ``named``: the digest the archive names the file by (checked against its bytes).
        ``sizes``: ``by_size()``, passed in when many files are ingested in a row (it is
        updated with what this call adds)."""
        if named is not None:
            got = (self._verify(read, size) if self.has(named)
                   else self._write(read, size, hashlib.sha256(), expect=named))
            if got.digest != named:
                raise BackupError(
                    f"a file the archive names sha256:{named[:12]} has the digest "
                    f"sha256:{got.digest[:12]}: the engine sent a corrupt blob",
                    hint="nothing of it was kept; run the backup again, and if it repeats, "
                         "check the engine's storage")
        else:
            table = sizes if sizes is not None else self.by_size()
            got = self._match(read, size, table.get(size, []))
        if got.written and sizes is not None:
            sizes.setdefault(size, []).append(got.digest)
        return got

    # -- the three ways a file goes ---------------------------------------------------------

    def _verify(self, read: Read, size: int) -> Ingested:
        h = hashlib.sha256()
        _drain(read, size, h.update)
        return Ingested(h.hexdigest(), size, 0)

    def _match(self, read: Read, size: int, candidates: list[str]) -> Ingested:
        """Compare the stream with every stored blob of its size; write it only when
        none of them is the same bytes."""
        h = hashlib.sha256()
        with contextlib.ExitStack() as stack:
            alive: dict[str, BinaryIO] = {
                c: stack.enter_context(self.path(c).open("rb")) for c in candidates}
            done = 0
            while done < size:
                chunk = read(min(CHUNK, size - done))
                if not chunk:
                    raise BackupError(f"the archive ended {size - done} bytes before the end "
                                      f"of a {size}-byte layer",
                                      hint="the save stream was cut short; run the backup "
                                           "again")
                survivor = next(iter(alive), None)
                for c, f in list(alive.items()):
                    if f.read(len(chunk)) != chunk:
                        del alive[c]
                if not alive:
                    # the bytes before this chunk are those of ``survivor`` (and hashed):
                    # copy them from it, then write this chunk and the rest of the stream
                    return self._write(read, size, h, survivor, done, chunk)
                h.update(chunk)
                done += len(chunk)
            digest = h.hexdigest()
            if digest in alive:
                return Ingested(digest, size, 0)
            if not alive:  # an empty file, and no empty blob stored yet
                return self._write(read, size, h)
        # a candidate matched every byte but is not named by their hash: a damaged blob
        raise BackupError(f"the stored blob {next(iter(alive))[:12]} holds the bytes of "
                          f"sha256:{digest[:12]}: the layer store is damaged",
                          hint="run 'imagebuild backup --check' to find every damaged blob")

    def _write(self, read: Read, size: int, h: hashlib._Hash, copy_from: str | None = None,
               copied: int = 0, first: bytes = b"", expect: str | None = None) -> Ingested:
        """Write the file into incoming/ and rename it to its digest: ``copied`` bytes
        from the stored blob ``copy_from`` (equal to the stream's first bytes, and
        already hashed into ``h``), then ``first``, then the rest of the stream."""
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.incoming_dir)
        written = 0
        try:
            with os.fdopen(fd, "wb") as out:
                if copy_from is not None and copied:
                    with self.path(copy_from).open("rb") as src:
                        left = copied
                        while left:
                            part = src.read(min(CHUNK, left))
                            if not part:
                                raise BackupError(f"the stored blob {copy_from[:12]} changed "
                                                  "while it was read")
                            out.write(part)
                            left -= len(part)
                            written += len(part)

                def sink(chunk: bytes) -> None:
                    nonlocal written
                    h.update(chunk)
                    out.write(chunk)
                    written += len(chunk)

                if first:
                    sink(first)
                _drain(read, size - copied - len(first), sink)
                out.flush()
                os.fsync(out.fileno())
            digest = h.hexdigest()
            if expect is not None and digest != expect:
                os.unlink(tmp)
                return Ingested(digest, size, 0)  # refused by the caller, nothing kept
            final = self.path(digest)
            if final.is_file():  # written meanwhile by another run: the same bytes
                os.unlink(tmp)
                return Ingested(digest, size, 0)
            self.blobs.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
            fsync_dir(self.blobs)
            return Ingested(digest, size, written)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def _drain(read: Read, size: int, sink: Callable[[bytes], None]) -> None:
    left = size
    while left:
        chunk = read(min(CHUNK, left))
        if not chunk:
            raise BackupError(f"the archive ended {left} bytes before the end of a "
                              f"{size}-byte file",
                              hint="the save stream was cut short; run the backup again")
        sink(chunk)
        left -= len(chunk)


# -- generations: one image's docker-save directory, its large files linked into blobs/ ------

SMALL = 1 << 16  # files up to this size that are not blobs are kept as they come
_BLOB_NAME = re.compile(r"^blobs/sha256/([0-9a-f]{64})$")


@dataclass(frozen=True)
class Generation:
    image: str
    hash12: str
    path: Path  # the generation directory
    config: str  # its config file's path in the directory
    layers: tuple[tuple[str, str, int], ...]  # (path in the directory, blob digest, size)


@dataclass(frozen=True)
class SaveIngest:
    generations: tuple[Generation, ...]
    written: int  # bytes written into blobs/
    read: int  # bytes of the save stream


class _Chunks(io.RawIOBase):
    """A read-only file over an iterator of chunks (for tarfile's stream mode)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it = iter(chunks)
        self._buf = b""
        self.total = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._it)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        self.total += n
        return n


def ingest_save(store: BlobStore, chunks: Iterable[bytes], wanted: dict[str, tuple[str, str]]
                ) -> SaveIngest:
    """Read a ``docker save`` stream into the store: every large file into blobs/ (only
    what is new), then one generation directory per image whose ``RepoTags`` has a key
    of ``wanted`` (tag -> (image name, hash12)). A generation appears, renamed from a
    temporary name, only when everything it links is in blobs/."""
    store.clean_incoming()
    sizes = store.by_size()
    stream = _Chunks(chunks)
    blobs: dict[str, tuple[str, int]] = {}  # path in the archive -> (digest, size)
    small: dict[str, bytes] = {}
    links: dict[str, str] = {}
    written = 0
    with tarfile.open(fileobj=io.BufferedReader(stream, CHUNK), mode="r|") as tf:
        for m in tf:
            name = m.name.removeprefix("./")
            if m.isdir():
                continue
            if m.issym():
                links[name] = m.linkname
                continue
            if not m.isfile():
                raise BackupError(f"the save stream holds {name!r}, which is neither a file, "
                                  "a directory nor a symbolic link")
            f = tf.extractfile(m)
            assert f is not None
            named = _BLOB_NAME.match(name)
            if named or m.size > SMALL or name.endswith("/layer.tar"):
                got = store.ingest(f.read, m.size, named=named.group(1) if named else None,
                                   sizes=sizes)
                blobs[name] = (got.digest, m.size)
                written += got.written
            else:
                small[name] = f.read()
    manifest = _json(small, blobs, store, "manifest.json")
    if not isinstance(manifest, list):
        raise BackupError("the save stream's manifest.json is not a list")
    gens = []
    for entry in manifest:
        tags = entry.get("RepoTags") or []
        hit = next((wanted[t] for t in tags if t in wanted), None)
        if hit is None:
            continue
        gens.append(_generation(store, hit, entry, blobs, small, links))
    return SaveIngest(tuple(gens), written, stream.total)


def _json(small: dict[str, bytes], blobs: dict[str, tuple[str, int]], store: BlobStore,
          name: str) -> Any:
    if name in small:
        raw = small[name]
    elif name in blobs:
        raw = store.path(blobs[name][0]).read_bytes()
    else:
        raise BackupError(f"the save stream has no {name}")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise BackupError(f"the save stream's {name} is not JSON: {exc}") from None


def _generation(store: BlobStore, hit: tuple[str, str], entry: dict[str, Any],
                blobs: dict[str, tuple[str, int]], small: dict[str, bytes],
                links: dict[str, str]) -> Generation:
    image, h12 = hit
    config, layers = entry["Config"], list(entry["Layers"])
    paths = {config, "oci-layout"} if "index.json" in small else {config}
    for layer in layers:
        paths.add(layer)
        if layer in links:  # a repeated layer: the symlink and the file it points to
            paths.add(os.path.normpath(os.path.join(os.path.dirname(layer), links[layer])))
        base = os.path.dirname(layer)
        paths |= {p for p in (f"{base}/json", f"{base}/VERSION") if p in small}
    extra: dict[str, bytes] = {"manifest.json": json.dumps([entry]).encode()}
    if "index.json" in small:  # OCI layout: this image's manifest alone, and its blob
        index = _json(small, blobs, store, "index.json")
        config_digest = "sha256:" + config.rsplit("/", 1)[-1]
        mine = []
        for desc in index.get("manifests", []):
            path = "blobs/sha256/" + str(desc.get("digest", "")).removeprefix("sha256:")
            if path in blobs and _json(small, blobs, store, path).get("config", {}).get(
                    "digest") == config_digest:
                mine.append(desc)
                paths.add(path)
        extra["index.json"] = json.dumps({**index, "manifests": mine}).encode()
    parent = store.root / "images" / image
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / h12
    tmp = parent / f".{h12}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for path in sorted(paths):
            dest = tmp / path
            dest.parent.mkdir(parents=True, exist_ok=True)
            if path in links:
                os.symlink(links[path], dest)
            elif path in blobs:
                os.link(store.path(blobs[path][0]), dest)
            elif path in small:
                dest.write_bytes(small[path])
            else:
                raise BackupError(f"{image}: the save stream lacks {path}, which its "
                                  "manifest names")
        for path, data in extra.items():
            (tmp / path).write_bytes(data)
        if final.exists():  # the same generation again: keep the one in place
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
            fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Generation(image, h12, final, config, tuple(
        (p, *blobs[_resolve(p, links)]) for p in layers))


def _resolve(path: str, links: dict[str, str]) -> str:
    if path in links:
        return os.path.normpath(os.path.join(os.path.dirname(path), links[path]))
    return path
