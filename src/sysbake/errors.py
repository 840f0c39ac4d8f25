"""One exception root; the CLI turns any SysbakeError into one line and an exit code."""

from __future__ import annotations


class SysbakeError(Exception):
    """Root of every error sysbake reports to the user (one clear line, non-zero exit)."""

    exit_code = 1


class ConfigError(SysbakeError):
    """A project file is malformed: names the file, the key and what was expected."""

    exit_code = 2


class CommandError(SysbakeError):
    """An external command failed; `tail` holds the last lines of its output, one per line
    (sysbake.proc.tail)."""

    def __init__(self, message: str, *, returncode: int = 1, tail: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.tail = tail


class StoreError(SysbakeError):
    """The local store cannot satisfy a request (unknown image, missing blob, full disk...)."""


class ImageNotFound(StoreError):
    """No image by that name or ID in the store."""


class LayerError(SysbakeError):
    """A layer tarball is malformed or hostile (absolute paths, '..', escaping links...)."""


class BuildError(SysbakeError):
    """A build stage failed; the message names the image and the stage."""


class RuntimeFailure(SysbakeError):
    """Booting, exec'ing into or stopping a container failed."""


class Interrupted(SysbakeError):
    """The user interrupted the operation (Ctrl-C); everything was cleaned up."""

    exit_code = 130
