from facemux.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VerifyRequest(_message.Message):
    __slots__ = ("image", "check_request_id")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CHECK_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    image: _types_pb2.Image
    check_request_id: str
    def __init__(self, image: _Optional[_Union[_types_pb2.Image, _Mapping]] = ..., check_request_id: _Optional[str] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("manifest_present", "manifest_valid", "issuer_trusted", "issuer", "signer", "digital_source_type", "generator", "request_id", "manifest_errors", "manifest_summary", "watermark_found", "watermark_confidence", "watermark_payload", "checked_request_id", "watermark_matches_request")
    MANIFEST_PRESENT_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_VALID_FIELD_NUMBER: _ClassVar[int]
    ISSUER_TRUSTED_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    SIGNER_FIELD_NUMBER: _ClassVar[int]
    DIGITAL_SOURCE_TYPE_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_ERRORS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_SUMMARY_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_FOUND_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CHECKED_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_MATCHES_REQUEST_FIELD_NUMBER: _ClassVar[int]
    manifest_present: bool
    manifest_valid: bool
    issuer_trusted: bool
    issuer: str
    signer: str
    digital_source_type: str
    generator: str
    request_id: str
    manifest_errors: _containers.RepeatedScalarFieldContainer[str]
    manifest_summary: str
    watermark_found: bool
    watermark_confidence: float
    watermark_payload: str
    checked_request_id: str
    watermark_matches_request: bool
    def __init__(self, manifest_present: _Optional[bool] = ..., manifest_valid: _Optional[bool] = ..., issuer_trusted: _Optional[bool] = ..., issuer: _Optional[str] = ..., signer: _Optional[str] = ..., digital_source_type: _Optional[str] = ..., generator: _Optional[str] = ..., request_id: _Optional[str] = ..., manifest_errors: _Optional[_Iterable[str]] = ..., manifest_summary: _Optional[str] = ..., watermark_found: _Optional[bool] = ..., watermark_confidence: _Optional[float] = ..., watermark_payload: _Optional[str] = ..., checked_request_id: _Optional[str] = ..., watermark_matches_request: _Optional[bool] = ...) -> None: ...
