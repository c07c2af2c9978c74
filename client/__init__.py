"""Python client for the facemux gRPC API. Installs and imports without torch."""

from facemux.client.client import DecodeResult, FacemuxClient, Latent, SwapResult
from facemux.client.errors import (
    FacemuxRpcError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)

__all__ = [
    "DecodeResult",
    "FacemuxClient",
    "FacemuxRpcError",
    "FailedPrecondition",
    "InvalidArgument",
    "Latent",
    "NotFound",
    "ResourceExhausted",
    "SwapResult",
    "Unavailable",
    "Unimplemented",
]
