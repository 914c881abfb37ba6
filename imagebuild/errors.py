"""The error hierarchy: one class per kind of failure, one exit code per class.

Every message says what failed, why, and what to do next. ``cli.main`` maps an
``ImagebuildError`` to its ``exit_code`` and prints the message; nothing else
in the package calls ``sys.exit``.
"""

from __future__ import annotations

import re


class ImagebuildError(Exception):
    """Base class. ``exit_code`` is what the command exits with."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return printable(f"{self.message}\n  hint: {self.hint}")
        return printable(self.message)


# control characters but newline and tab: what a remote text (a registry's error body, a
# worker's stderr, git's or uv's) could carry to move the cursor, retitle or blank the
# terminal an error is printed on
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with its control characters (escape sequences, carriage returns) shown as
    '?': safe to print on a terminal."""
    return _CONTROL.sub("?", text)


class SpecError(ImagebuildError):
    """The spec (imagebuild.yaml) is malformed, incomplete or unsafe."""

    exit_code = 2


class LockError(ImagebuildError):
    """wheels.lock is malformed, stale, or lacks a wheel the spec needs."""

    exit_code = 2


class UnresolvedHashError(LockError):
    """A wheel's sha256 is not known on this machine; run the lock step where it is."""

    exit_code = 2


class LockConflict(LockError):
    """A wheel's metadata requires what the locked closure does not have, and no declared
    override says why."""

    exit_code = 2


class ResolveFailed(LockError):
    """uv could not resolve an image's closure."""

    exit_code = 2


class RenderDrift(ImagebuildError):
    """A committed Dockerfile differs from what the templates produce."""

    exit_code = 1


class WheelHashMismatch(ImagebuildError):
    """A wheel file's bytes do not match the sha256 in wheels.lock."""

    exit_code = 3


class FileChanged(ImagebuildError):
    """A file the spec declares into an image changed after it was hashed."""

    exit_code = 3


class EngineError(ImagebuildError):
    """The Docker engine is unreachable or an API call failed."""

    exit_code = 4

    def __init__(self, message: str, *, hint: str | None = None, log_tail: str = "") -> None:
        super().__init__(message, hint=hint)
        self.log_tail = log_tail


class BuildFailed(EngineError):
    """A Dockerfile step failed during a build."""

    exit_code = 5


class WheelBuildFailed(BuildFailed):
    """A wheel could not be built from its source (fetch, patch, compile or the wheel
    it made): nothing was recorded."""

    exit_code = 5


class ImageNotFound(ImagebuildError):
    """An image the command needs is not present in the engine."""

    exit_code = 6


class VerifyFailed(ImagebuildError):
    """An image failed one of its checks: it must not be distributed."""

    exit_code = 1


class NotVerified(ImagebuildError):
    """An image has no passing verify record."""

    exit_code = 7


class BackupError(ImagebuildError):
    """A backup could not be written, or a tar is corrupt or does not match its sidecar."""

    exit_code = 8


class RemoteError(ImagebuildError):
    """An ssh command to a worker failed."""

    exit_code = 9


class NotReproducible(ImagebuildError):
    """A wheel built again from the same inputs has other bytes than the stored one."""

    exit_code = 10


class RegistryError(ImagebuildError):
    """The registry of ``distribute --via registry`` did not answer, refused, or replied
    with something other than what was sent."""

    exit_code = 11


def reason(exc: BaseException) -> str:
    """What went wrong, in one line: an error's message, or an OS error's text."""
    return exc.message if isinstance(exc, ImagebuildError) else str(exc)


class StoreBusy(BackupError):
    """Another run holds the backup store's lock in a way this one cannot share."""

    exit_code = 12


class MirrorError(ImagebuildError):
    """A mirror of the backup store could not be brought up to date (the backup on this
    host is written and intact)."""

    exit_code = 13


class Interrupted(ImagebuildError):
    """The user pressed Ctrl-C."""

    exit_code = 130
