"""Domain errors shared by every layer of facemux.

The service maps each class to one gRPC status code (facemux.service.errors); the
models package raises them without knowing anything about gRPC.
"""

from __future__ import annotations


class FacemuxError(Exception):
    """Base class: the message must tell a caller what to change."""


class InvalidInputError(FacemuxError):
    """The request itself is malformed (bad image, bad latent, bad name...)."""


class UnauthenticatedError(FacemuxError):
    """The caller's credentials are missing, malformed, unknown or expired."""


class PermissionDeniedError(FacemuxError):
    """The caller is known but lacks the role the call needs."""


class NotFoundError(FacemuxError):
    """A named thing (identity, version, encoder, job) does not exist."""


class AlreadyExistsError(FacemuxError):
    """Creating something that exists and may not be overwritten."""


class PreconditionError(FacemuxError):
    """The request is well formed but the system is not in a state to serve it,
    e.g. a latent or decoder made for another encoder."""


class CheckpointError(InvalidInputError):
    """A checkpoint is unreadable, not safetensors, or has the wrong tensors."""


class FingerprintMismatchError(PreconditionError):
    """A decoder or latent belongs to a different shared encoder."""

    def __init__(self, what: str, expected: str, got: str) -> None:
        super().__init__(
            f"{what} was made for encoder {got[:16]} but this server's encoder is "
            f"{expected[:16]}; re-train the decoder against encoder {expected[:16]} "
            "or serve the encoder it was trained with"
        )
        self.expected = expected
        self.got = got


class ResourceExhaustedError(FacemuxError):
    """A bounded resource (queue, size limit) is full; retrying later may work.

    `retry_after`, when set, is how many seconds the caller should wait before retrying; the
    service sends it as trailing metadata `retry-after`."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExpiredError(FacemuxError):
    """The caller's deadline passed before the work started; nothing was computed."""


class UnavailableError(FacemuxError):
    """The server is not ready yet (e.g. the encoder is still loading)."""


class NotImplementedYetError(FacemuxError):
    """A documented part of the API whose behaviour has not shipped yet."""
