"""Reading answers of a facemux archive served by TorchServe (`facemux export torchserve`).

TorchServe's gRPC Predictions call answers every item of a batch with status OK, even one the
handler refused: the refusal is only in the body. The handler answers a good item with PNG
bytes and a bad one with a JSON error object, so a caller tells them apart by the body, and
`prediction_image` does that for it. Over REST a refused item also gets HTTP 400/404.
"""

from __future__ import annotations

import json

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class TorchServeItemError(Exception):
    """The handler refused this item; `code` is the gRPC status name facemux would use."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def prediction_image(body: bytes) -> bytes:
    """The PNG face of one prediction, or TorchServeItemError with the handler's reason."""
    if body.startswith(PNG_SIGNATURE):
        return body
    try:
        err = json.loads(body)["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        raise TorchServeItemError("UNKNOWN", f"not a facemux answer: {body[:80]!r}") from None
    raise TorchServeItemError(code, message)
