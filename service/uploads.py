"""Checks on a checkpoint upload made as its chunks arrive, before the whole of it is in."""

from __future__ import annotations

from facemux.models import checkpoint
from facemux.models.errors import CheckpointError, InvalidInputError, ResourceExhaustedError


class UploadCheck:
    """Judges a checkpoint upload as its chunks arrive: the size limit, the declared size,
    and the safetensors header as soon as its bytes are in, so that a bogus or oversized
    upload is refused at its first chunk rather than after all of it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.received = 0
        self.size_bytes = 0  # declared by the caller; 0 = not declared
        self.expected: int | None = None  # what the header says the file is
        self._head = bytearray()

    def declared(self, size_bytes: int) -> None:
        if size_bytes > self.limit:
            raise ResourceExhaustedError(
                f"checkpoint of {size_bytes} bytes is over the server limit of "
                f"{self.limit} (setting max_checkpoint_bytes)"
            )
        self.size_bytes = size_bytes

    def chunk(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > self.limit:
            raise ResourceExhaustedError(
                f"checkpoint upload passed the server limit of {self.limit} bytes "
                "(setting max_checkpoint_bytes)"
            )
        if self.expected is None:
            self._head += data
            self.expected = checkpoint.expected_size(
                bytes(self._head), "decoder", "uploaded checkpoint"
            )
            if self.expected is not None:
                self._head = bytearray()
                self._check_expected(self.expected)
        if self.expected is not None and self.received > self.expected:
            raise CheckpointError(
                f"uploaded checkpoint is longer than its safetensors header says "
                f"({self.expected} bytes): not a valid checkpoint"
            )

    def _check_expected(self, expected: int) -> None:
        if expected > self.limit:
            raise ResourceExhaustedError(
                f"uploaded checkpoint's header describes {expected} bytes, over the server "
                f"limit of {self.limit} (setting max_checkpoint_bytes)"
            )
        if self.size_bytes and expected != self.size_bytes:
            raise InvalidInputError(
                f"metadata.size_bytes is {self.size_bytes} but the checkpoint's header "
                f"describes {expected} bytes: wrong file or corrupted upload"
            )

    def complete(self) -> None:
        if not self.received:
            raise InvalidInputError("no checkpoint bytes were sent")
        if self.expected is None:
            # Too short to hold its own header: let the parser say what is wrong with it.
            checkpoint.read_metadata(bytes(self._head))
        if self.received != self.expected:
            raise CheckpointError(
                f"uploaded checkpoint is truncated: {self.received} of the {self.expected} "
                "bytes its header describes arrived"
            )
