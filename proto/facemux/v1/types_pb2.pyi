import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_FORMAT_UNSPECIFIED: _ClassVar[ImageFormat]
    IMAGE_FORMAT_JPEG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_PNG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_WEBP: _ClassVar[ImageFormat]
    IMAGE_FORMAT_RAW: _ClassVar[ImageFormat]

class PixelLayout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PIXEL_LAYOUT_UNSPECIFIED: _ClassVar[PixelLayout]
    PIXEL_LAYOUT_RGB8: _ClassVar[PixelLayout]
    PIXEL_LAYOUT_BGR8: _ClassVar[PixelLayout]
    PIXEL_LAYOUT_RGBA8: _ClassVar[PixelLayout]
    PIXEL_LAYOUT_BGRA8: _ClassVar[PixelLayout]
    PIXEL_LAYOUT_GRAY8: _ClassVar[PixelLayout]

class LatentFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LATENT_FORMAT_UNSPECIFIED: _ClassVar[LatentFormat]
    LATENT_FORMAT_FLOAT32: _ClassVar[LatentFormat]
    LATENT_FORMAT_FLOAT16: _ClassVar[LatentFormat]
IMAGE_FORMAT_UNSPECIFIED: ImageFormat
IMAGE_FORMAT_JPEG: ImageFormat
IMAGE_FORMAT_PNG: ImageFormat
IMAGE_FORMAT_WEBP: ImageFormat
IMAGE_FORMAT_RAW: ImageFormat
PIXEL_LAYOUT_UNSPECIFIED: PixelLayout
PIXEL_LAYOUT_RGB8: PixelLayout
PIXEL_LAYOUT_BGR8: PixelLayout
PIXEL_LAYOUT_RGBA8: PixelLayout
PIXEL_LAYOUT_BGRA8: PixelLayout
PIXEL_LAYOUT_GRAY8: PixelLayout
LATENT_FORMAT_UNSPECIFIED: LatentFormat
LATENT_FORMAT_FLOAT32: LatentFormat
LATENT_FORMAT_FLOAT16: LatentFormat

class RawImage(_message.Message):
    __slots__ = ("width", "height", "layout", "data")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    layout: PixelLayout
    data: bytes
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., layout: _Optional[_Union[PixelLayout, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "raw")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawImage
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ...) -> None: ...

class OutputOptions(_message.Message):
    __slots__ = ("format", "quality", "raw_layout")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    RAW_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    format: ImageFormat
    quality: int
    raw_layout: PixelLayout
    def __init__(self, format: _Optional[_Union[ImageFormat, str]] = ..., quality: _Optional[int] = ..., raw_layout: _Optional[_Union[PixelLayout, str]] = ...) -> None: ...

class Point(_message.Message):
    __slots__ = ("x", "y")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x_min", "y_min", "x_max", "y_max")
    X_MIN_FIELD_NUMBER: _ClassVar[int]
    Y_MIN_FIELD_NUMBER: _ClassVar[int]
    X_MAX_FIELD_NUMBER: _ClassVar[int]
    Y_MAX_FIELD_NUMBER: _ClassVar[int]
    x_min: float
    y_min: float
    x_max: float
    y_max: float
    def __init__(self, x_min: _Optional[float] = ..., y_min: _Optional[float] = ..., x_max: _Optional[float] = ..., y_max: _Optional[float] = ...) -> None: ...

class Latent(_message.Message):
    __slots__ = ("shape", "format", "data", "encoder_fingerprint")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    format: LatentFormat
    data: bytes
    encoder_fingerprint: str
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., format: _Optional[_Union[LatentFormat, str]] = ..., data: _Optional[bytes] = ..., encoder_fingerprint: _Optional[str] = ...) -> None: ...

class ConsentRecord(_message.Message):
    __slots__ = ("attested_by", "evidence_ref", "granted_at", "scope", "expires_at", "revoked_at", "revocation_reason")
    ATTESTED_BY_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_REF_FIELD_NUMBER: _ClassVar[int]
    GRANTED_AT_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    REVOCATION_REASON_FIELD_NUMBER: _ClassVar[int]
    attested_by: str
    evidence_ref: str
    granted_at: _timestamp_pb2.Timestamp
    scope: str
    expires_at: _timestamp_pb2.Timestamp
    revoked_at: _timestamp_pb2.Timestamp
    revocation_reason: str
    def __init__(self, attested_by: _Optional[str] = ..., evidence_ref: _Optional[str] = ..., granted_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., scope: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revocation_reason: _Optional[str] = ...) -> None: ...
