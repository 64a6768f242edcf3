"""Typed errors of the core, translated once at each edge (gRPC status, CRD condition, CLI exit code)."""

from __future__ import annotations


class HpsError(Exception):
    """Base of every error this project raises on purpose; the message is meant for a user."""

    #: exit code the CLI uses for this error
    exit_code: int = 1


class InvalidSpecError(HpsError):
    """An EmbeddingModel (or a model file) has a field that is wrong; ``field`` is its path."""

    exit_code = 2

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.detail = message
        super().__init__(f"{field}: {message}")


class InvalidArgumentError(HpsError):
    """A request is malformed (bad key buffer, wrong dtype, empty name)."""

    exit_code = 2


class NotFoundError(HpsError):
    """An unknown model or table was asked for."""

    exit_code = 3


class ResourceExhaustedError(HpsError):
    """A request is over a configured limit; the message names the limit."""

    exit_code = 4


class UnavailableError(HpsError):
    """A tier or an endpoint cannot be reached right now."""

    exit_code = 5


class FailedPreconditionError(HpsError):
    """The request is well formed but this deployment cannot do it as it is set up (e.g. an update
    on agents that share read-only stores and have no update stream); the message says what to change."""

    exit_code = 8


class UnauthenticatedError(HpsError):
    """A credential was missing or refused: a store's password, or an RPC's bearer token (none sent
    where one is required, or one that is not valid)."""

    exit_code = 9


class PermissionDeniedError(HpsError):
    """The caller is known (its credential is valid) but not allowed to do this, e.g. a service account
    that is not among an agent's writers calling Update."""

    exit_code = 10


class TableSourceError(HpsError):
    """A table's source is missing, corrupt or does not match the spec; the message names the file."""

    exit_code = 6


class InsufficientGPUMemoryError(HpsError):
    """A model cannot be placed: ``needed`` bytes do not fit in ``available`` bytes."""

    exit_code = 7

    def __init__(self, needed: int, available: int, detail: str = "") -> None:
        self.needed = needed
        self.available = available
        self.detail = detail
        extra = f"; {detail}" if detail else ""
        super().__init__(f"insufficient GPU memory: needs {needed} bytes, {available} bytes available{extra}")
