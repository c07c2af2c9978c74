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

class TrainMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAIN_MODE_UNSPECIFIED: _ClassVar[TrainMode]
    TRAIN_MODE_IDENTITY: _ClassVar[TrainMode]
    TRAIN_MODE_PRETRAIN: _ClassVar[TrainMode]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
TRAIN_MODE_UNSPECIFIED: TrainMode
TRAIN_MODE_IDENTITY: TrainMode
TRAIN_MODE_PRETRAIN: TrainMode
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class UploadDatasetMetadata(_message.Message):
    __slots__ = ("name", "aligned")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIGNED_FIELD_NUMBER: _ClassVar[int]
    name: str
    aligned: bool
    def __init__(self, name: _Optional[str] = ..., aligned: _Optional[bool] = ...) -> None: ...

class UploadDatasetRequest(_message.Message):
    __slots__ = ("metadata", "image")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    metadata: UploadDatasetMetadata
    image: _types_pb2.Image
    def __init__(self, metadata: _Optional[_Union[UploadDatasetMetadata, _Mapping]] = ..., image: _Optional[_Union[_types_pb2.Image, _Mapping]] = ...) -> None: ...

class RejectedImage(_message.Message):
    __slots__ = ("index", "reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    reason: str
    def __init__(self, index: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Dataset(_message.Message):
    __slots__ = ("name", "faces", "content_hash", "resolution", "updated_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FACES_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    faces: int
    content_hash: str
    resolution: int
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., faces: _Optional[int] = ..., content_hash: _Optional[str] = ..., resolution: _Optional[int] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class UploadDatasetResponse(_message.Message):
    __slots__ = ("dataset", "accepted", "duplicates", "rejected", "duplicate_indices")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_INDICES_FIELD_NUMBER: _ClassVar[int]
    dataset: Dataset
    accepted: int
    duplicates: int
    rejected: _containers.RepeatedCompositeFieldContainer[RejectedImage]
    duplicate_indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, dataset: _Optional[_Union[Dataset, _Mapping]] = ..., accepted: _Optional[int] = ..., duplicates: _Optional[int] = ..., rejected: _Optional[_Iterable[_Union[RejectedImage, _Mapping]]] = ..., duplicate_indices: _Optional[_Iterable[int]] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets",)
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[Dataset]
    def __init__(self, datasets: _Optional[_Iterable[_Union[Dataset, _Mapping]]] = ...) -> None: ...

class DeleteDatasetRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteDatasetResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TrainHyperParameters(_message.Message):
    __slots__ = ("steps", "batch_size", "learning_rate", "encoder_learning_rate", "checkpoint_every", "seed")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    ENCODER_LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    steps: int
    batch_size: int
    learning_rate: float
    encoder_learning_rate: float
    checkpoint_every: int
    seed: int
    def __init__(self, steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., encoder_learning_rate: _Optional[float] = ..., checkpoint_every: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("mode", "identity", "datasets", "preset", "hyper_parameters", "consent")
    MODE_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    HYPER_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    CONSENT_FIELD_NUMBER: _ClassVar[int]
    mode: TrainMode
    identity: str
    datasets: _containers.RepeatedScalarFieldContainer[str]
    preset: str
    hyper_parameters: TrainHyperParameters
    consent: _types_pb2.ConsentRecord
    def __init__(self, mode: _Optional[_Union[TrainMode, str]] = ..., identity: _Optional[str] = ..., datasets: _Optional[_Iterable[str]] = ..., preset: _Optional[str] = ..., hyper_parameters: _Optional[_Union[TrainHyperParameters, _Mapping]] = ..., consent: _Optional[_Union[_types_pb2.ConsentRecord, _Mapping]] = ...) -> None: ...

class TrainResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "mode", "state", "identity", "datasets", "step", "steps", "error", "created_at", "updated_at", "result_version", "encoder_fingerprint")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    RESULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    id: str
    mode: TrainMode
    state: JobState
    identity: str
    datasets: _containers.RepeatedScalarFieldContainer[str]
    step: int
    steps: int
    error: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    result_version: int
    encoder_fingerprint: str
    def __init__(self, id: _Optional[str] = ..., mode: _Optional[_Union[TrainMode, str]] = ..., state: _Optional[_Union[JobState, str]] = ..., identity: _Optional[str] = ..., datasets: _Optional[_Iterable[str]] = ..., step: _Optional[int] = ..., steps: _Optional[int] = ..., error: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., result_version: _Optional[int] = ..., encoder_fingerprint: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("id", "replay")
    ID_FIELD_NUMBER: _ClassVar[int]
    REPLAY_FIELD_NUMBER: _ClassVar[int]
    id: str
    replay: bool
    def __init__(self, id: _Optional[str] = ..., replay: _Optional[bool] = ...) -> None: ...

class WatchJobResponse(_message.Message):
    __slots__ = ("job", "losses", "examples_per_second", "eta_seconds", "preview", "message")
    class LossesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    job: Job
    losses: _containers.ScalarMap[str, float]
    examples_per_second: float
    eta_seconds: float
    preview: _types_pb2.Image
    message: str
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ..., losses: _Optional[_Mapping[str, float]] = ..., examples_per_second: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., preview: _Optional[_Union[_types_pb2.Image, _Mapping]] = ..., message: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("states",)
    STATES_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[JobState]
    def __init__(self, states: _Optional[_Iterable[_Union[JobState, str]]] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...
