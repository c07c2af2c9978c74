import datetime

from facemux.v1 import types_pb2 as _types_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VersionSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERSION_SOURCE_UNSPECIFIED: _ClassVar[VersionSource]
    VERSION_SOURCE_UPLOADED: _ClassVar[VersionSource]
    VERSION_SOURCE_TRAINED: _ClassVar[VersionSource]
VERSION_SOURCE_UNSPECIFIED: VersionSource
VERSION_SOURCE_UPLOADED: VersionSource
VERSION_SOURCE_TRAINED: VersionSource

class IdentityVersion(_message.Message):
    __slots__ = ("version", "created_at", "decoder_fingerprint", "encoder_fingerprint", "preset", "resolution", "size_bytes", "source", "job_id", "summary_json")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    DECODER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_JSON_FIELD_NUMBER: _ClassVar[int]
    version: int
    created_at: _timestamp_pb2.Timestamp
    decoder_fingerprint: str
    encoder_fingerprint: str
    preset: str
    resolution: int
    size_bytes: int
    source: VersionSource
    job_id: str
    summary_json: str
    def __init__(self, version: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., decoder_fingerprint: _Optional[str] = ..., encoder_fingerprint: _Optional[str] = ..., preset: _Optional[str] = ..., resolution: _Optional[int] = ..., size_bytes: _Optional[int] = ..., source: _Optional[_Union[VersionSource, str]] = ..., job_id: _Optional[str] = ..., summary_json: _Optional[str] = ...) -> None: ...

class Identity(_message.Message):
    __slots__ = ("name", "display_name", "default_version", "versions", "consent", "created_at", "consent_history")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CONSENT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CONSENT_HISTORY_FIELD_NUMBER: _ClassVar[int]
    name: str
    display_name: str
    default_version: int
    versions: _containers.RepeatedCompositeFieldContainer[IdentityVersion]
    consent: _types_pb2.ConsentRecord
    created_at: _timestamp_pb2.Timestamp
    consent_history: _containers.RepeatedCompositeFieldContainer[_types_pb2.ConsentRecord]
    def __init__(self, name: _Optional[str] = ..., display_name: _Optional[str] = ..., default_version: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[IdentityVersion, _Mapping]]] = ..., consent: _Optional[_Union[_types_pb2.ConsentRecord, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., consent_history: _Optional[_Iterable[_Union[_types_pb2.ConsentRecord, _Mapping]]] = ...) -> None: ...

class RegisterIdentityMetadata(_message.Message):
    __slots__ = ("name", "display_name", "make_default", "size_bytes", "sha256", "consent")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    MAKE_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CONSENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    display_name: str
    make_default: bool
    size_bytes: int
    sha256: str
    consent: _types_pb2.ConsentRecord
    def __init__(self, name: _Optional[str] = ..., display_name: _Optional[str] = ..., make_default: _Optional[bool] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., consent: _Optional[_Union[_types_pb2.ConsentRecord, _Mapping]] = ...) -> None: ...

class RegisterIdentityRequest(_message.Message):
    __slots__ = ("metadata", "chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: RegisterIdentityMetadata
    chunk: bytes
    def __init__(self, metadata: _Optional[_Union[RegisterIdentityMetadata, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class RegisterIdentityResponse(_message.Message):
    __slots__ = ("identity", "version")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    identity: Identity
    version: int
    def __init__(self, identity: _Optional[_Union[Identity, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class ListIdentitiesRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListIdentitiesResponse(_message.Message):
    __slots__ = ("identities", "next_page_token")
    IDENTITIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    identities: _containers.RepeatedCompositeFieldContainer[Identity]
    next_page_token: str
    def __init__(self, identities: _Optional[_Iterable[_Union[Identity, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetIdentityRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetIdentityResponse(_message.Message):
    __slots__ = ("identity",)
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    identity: Identity
    def __init__(self, identity: _Optional[_Union[Identity, _Mapping]] = ...) -> None: ...

class DeleteIdentityRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class DeleteIdentityResponse(_message.Message):
    __slots__ = ("deleted_versions", "identity_deleted")
    DELETED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted_versions: _containers.RepeatedScalarFieldContainer[int]
    identity_deleted: bool
    def __init__(self, deleted_versions: _Optional[_Iterable[int]] = ..., identity_deleted: _Optional[bool] = ...) -> None: ...

class SetDefaultVersionRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class SetDefaultVersionResponse(_message.Message):
    __slots__ = ("identity",)
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    identity: Identity
    def __init__(self, identity: _Optional[_Union[Identity, _Mapping]] = ...) -> None: ...

class RevokeConsentRequest(_message.Message):
    __slots__ = ("name", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RevokeConsentResponse(_message.Message):
    __slots__ = ("identity",)
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    identity: Identity
    def __init__(self, identity: _Optional[_Union[Identity, _Mapping]] = ...) -> None: ...

class RecordConsentRequest(_message.Message):
    __slots__ = ("name", "consent")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONSENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    consent: _types_pb2.ConsentRecord
    def __init__(self, name: _Optional[str] = ..., consent: _Optional[_Union[_types_pb2.ConsentRecord, _Mapping]] = ...) -> None: ...

class RecordConsentResponse(_message.Message):
    __slots__ = ("identity",)
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    identity: Identity
    def __init__(self, identity: _Optional[_Union[Identity, _Mapping]] = ...) -> None: ...
