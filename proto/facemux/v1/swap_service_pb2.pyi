from facemux.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FaceSelection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FACE_SELECTION_UNSPECIFIED: _ClassVar[FaceSelection]
    FACE_SELECTION_ALL: _ClassVar[FaceSelection]
    FACE_SELECTION_LARGEST: _ClassVar[FaceSelection]
    FACE_SELECTION_LISTED: _ClassVar[FaceSelection]

class ColorCorrection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COLOR_CORRECTION_UNSPECIFIED: _ClassVar[ColorCorrection]
    COLOR_CORRECTION_NONE: _ClassVar[ColorCorrection]
    COLOR_CORRECTION_AVERAGE: _ClassVar[ColorCorrection]
    COLOR_CORRECTION_REINHARD: _ClassVar[ColorCorrection]

class BlendMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BLEND_MODE_UNSPECIFIED: _ClassVar[BlendMode]
    BLEND_MODE_FEATHER: _ClassVar[BlendMode]
    BLEND_MODE_SEAMLESS: _ClassVar[BlendMode]

class SkipReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SKIP_REASON_UNSPECIFIED: _ClassVar[SkipReason]
    SKIP_REASON_NOT_SELECTED: _ClassVar[SkipReason]
    SKIP_REASON_OVER_LIMIT: _ClassVar[SkipReason]
    SKIP_REASON_TOO_SMALL: _ClassVar[SkipReason]
FACE_SELECTION_UNSPECIFIED: FaceSelection
FACE_SELECTION_ALL: FaceSelection
FACE_SELECTION_LARGEST: FaceSelection
FACE_SELECTION_LISTED: FaceSelection
COLOR_CORRECTION_UNSPECIFIED: ColorCorrection
COLOR_CORRECTION_NONE: ColorCorrection
COLOR_CORRECTION_AVERAGE: ColorCorrection
COLOR_CORRECTION_REINHARD: ColorCorrection
BLEND_MODE_UNSPECIFIED: BlendMode
BLEND_MODE_FEATHER: BlendMode
BLEND_MODE_SEAMLESS: BlendMode
SKIP_REASON_UNSPECIFIED: SkipReason
SKIP_REASON_NOT_SELECTED: SkipReason
SKIP_REASON_OVER_LIMIT: SkipReason
SKIP_REASON_TOO_SMALL: SkipReason

class FaceHint(_message.Message):
    __slots__ = ("box", "landmarks")
    BOX_FIELD_NUMBER: _ClassVar[int]
    LANDMARKS_FIELD_NUMBER: _ClassVar[int]
    box: _types_pb2.Box
    landmarks: _containers.RepeatedCompositeFieldContainer[_types_pb2.Point]
    def __init__(self, box: _Optional[_Union[_types_pb2.Box, _Mapping]] = ..., landmarks: _Optional[_Iterable[_Union[_types_pb2.Point, _Mapping]]] = ...) -> None: ...

class SwapOptions(_message.Message):
    __slots__ = ("selection", "face_indices", "face_boxes", "faces", "require_face", "color_correction", "blend_mode", "mask_erosion", "mask_blur", "return_masks", "max_faces")
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    FACE_INDICES_FIELD_NUMBER: _ClassVar[int]
    FACE_BOXES_FIELD_NUMBER: _ClassVar[int]
    FACES_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_FACE_FIELD_NUMBER: _ClassVar[int]
    COLOR_CORRECTION_FIELD_NUMBER: _ClassVar[int]
    BLEND_MODE_FIELD_NUMBER: _ClassVar[int]
    MASK_EROSION_FIELD_NUMBER: _ClassVar[int]
    MASK_BLUR_FIELD_NUMBER: _ClassVar[int]
    RETURN_MASKS_FIELD_NUMBER: _ClassVar[int]
    MAX_FACES_FIELD_NUMBER: _ClassVar[int]
    selection: FaceSelection
    face_indices: _containers.RepeatedScalarFieldContainer[int]
    face_boxes: _containers.RepeatedCompositeFieldContainer[_types_pb2.Box]
    faces: _containers.RepeatedCompositeFieldContainer[FaceHint]
    require_face: bool
    color_correction: ColorCorrection
    blend_mode: BlendMode
    mask_erosion: float
    mask_blur: float
    return_masks: bool
    max_faces: int
    def __init__(self, selection: _Optional[_Union[FaceSelection, str]] = ..., face_indices: _Optional[_Iterable[int]] = ..., face_boxes: _Optional[_Iterable[_Union[_types_pb2.Box, _Mapping]]] = ..., faces: _Optional[_Iterable[_Union[FaceHint, _Mapping]]] = ..., require_face: _Optional[bool] = ..., color_correction: _Optional[_Union[ColorCorrection, str]] = ..., blend_mode: _Optional[_Union[BlendMode, str]] = ..., mask_erosion: _Optional[float] = ..., mask_blur: _Optional[float] = ..., return_masks: _Optional[bool] = ..., max_faces: _Optional[int] = ...) -> None: ...

class SwapRequest(_message.Message):
    __slots__ = ("identity", "identity_version", "frame", "faces", "options", "output")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_VERSION_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    FACES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    identity: str
    identity_version: int
    frame: _types_pb2.Image
    faces: FaceBatch
    options: SwapOptions
    output: _types_pb2.OutputOptions
    def __init__(self, identity: _Optional[str] = ..., identity_version: _Optional[int] = ..., frame: _Optional[_Union[_types_pb2.Image, _Mapping]] = ..., faces: _Optional[_Union[FaceBatch, _Mapping]] = ..., options: _Optional[_Union[SwapOptions, _Mapping]] = ..., output: _Optional[_Union[_types_pb2.OutputOptions, _Mapping]] = ...) -> None: ...

class FaceBatch(_message.Message):
    __slots__ = ("faces",)
    FACES_FIELD_NUMBER: _ClassVar[int]
    faces: _containers.RepeatedCompositeFieldContainer[_types_pb2.Image]
    def __init__(self, faces: _Optional[_Iterable[_Union[_types_pb2.Image, _Mapping]]] = ...) -> None: ...

class FaceResult(_message.Message):
    __slots__ = ("index", "box", "landmarks", "confidence", "swapped", "skip_reason", "resized", "input_width", "input_height")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    LANDMARKS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    SWAPPED_FIELD_NUMBER: _ClassVar[int]
    SKIP_REASON_FIELD_NUMBER: _ClassVar[int]
    RESIZED_FIELD_NUMBER: _ClassVar[int]
    INPUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    INPUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    index: int
    box: _types_pb2.Box
    landmarks: _containers.RepeatedCompositeFieldContainer[_types_pb2.Point]
    confidence: float
    swapped: bool
    skip_reason: SkipReason
    resized: bool
    input_width: int
    input_height: int
    def __init__(self, index: _Optional[int] = ..., box: _Optional[_Union[_types_pb2.Box, _Mapping]] = ..., landmarks: _Optional[_Iterable[_Union[_types_pb2.Point, _Mapping]]] = ..., confidence: _Optional[float] = ..., swapped: _Optional[bool] = ..., skip_reason: _Optional[_Union[SkipReason, str]] = ..., resized: _Optional[bool] = ..., input_width: _Optional[int] = ..., input_height: _Optional[int] = ...) -> None: ...

class SwapResponse(_message.Message):
    __slots__ = ("frame", "faces", "masks", "results", "faces_swapped", "identity", "identity_version", "model_resolution", "notes", "request_id")
    FRAME_FIELD_NUMBER: _ClassVar[int]
    FACES_FIELD_NUMBER: _ClassVar[int]
    MASKS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    FACES_SWAPPED_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    frame: _types_pb2.Image
    faces: _containers.RepeatedCompositeFieldContainer[_types_pb2.Image]
    masks: _containers.RepeatedCompositeFieldContainer[_types_pb2.Image]
    results: _containers.RepeatedCompositeFieldContainer[FaceResult]
    faces_swapped: int
    identity: str
    identity_version: int
    model_resolution: int
    notes: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    def __init__(self, frame: _Optional[_Union[_types_pb2.Image, _Mapping]] = ..., faces: _Optional[_Iterable[_Union[_types_pb2.Image, _Mapping]]] = ..., masks: _Optional[_Iterable[_Union[_types_pb2.Image, _Mapping]]] = ..., results: _Optional[_Iterable[_Union[FaceResult, _Mapping]]] = ..., faces_swapped: _Optional[int] = ..., identity: _Optional[str] = ..., identity_version: _Optional[int] = ..., model_resolution: _Optional[int] = ..., notes: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class SwapStreamRequest(_message.Message):
    __slots__ = ("identity", "identity_version", "frame_index", "frame", "options", "output", "aligned", "detect_every")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_VERSION_FIELD_NUMBER: _ClassVar[int]
    FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ALIGNED_FIELD_NUMBER: _ClassVar[int]
    DETECT_EVERY_FIELD_NUMBER: _ClassVar[int]
    identity: str
    identity_version: int
    frame_index: int
    frame: _types_pb2.Image
    options: SwapOptions
    output: _types_pb2.OutputOptions
    aligned: bool
    detect_every: int
    def __init__(self, identity: _Optional[str] = ..., identity_version: _Optional[int] = ..., frame_index: _Optional[int] = ..., frame: _Optional[_Union[_types_pb2.Image, _Mapping]] = ..., options: _Optional[_Union[SwapOptions, _Mapping]] = ..., output: _Optional[_Union[_types_pb2.OutputOptions, _Mapping]] = ..., aligned: _Optional[bool] = ..., detect_every: _Optional[int] = ...) -> None: ...

class FrameError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class SwapStreamResponse(_message.Message):
    __slots__ = ("frame_index", "frame", "results", "faces_swapped", "error", "request_id", "identity", "identity_version")
    FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    FACES_SWAPPED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_VERSION_FIELD_NUMBER: _ClassVar[int]
    frame_index: int
    frame: _types_pb2.Image
    results: _containers.RepeatedCompositeFieldContainer[FaceResult]
    faces_swapped: int
    error: FrameError
    request_id: str
    identity: str
    identity_version: int
    def __init__(self, frame_index: _Optional[int] = ..., frame: _Optional[_Union[_types_pb2.Image, _Mapping]] = ..., results: _Optional[_Iterable[_Union[FaceResult, _Mapping]]] = ..., faces_swapped: _Optional[int] = ..., error: _Optional[_Union[FrameError, _Mapping]] = ..., request_id: _Optional[str] = ..., identity: _Optional[str] = ..., identity_version: _Optional[int] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("faces", "format")
    FACES_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    faces: _containers.RepeatedCompositeFieldContainer[_types_pb2.Image]
    format: _types_pb2.LatentFormat
    def __init__(self, faces: _Optional[_Iterable[_Union[_types_pb2.Image, _Mapping]]] = ..., format: _Optional[_Union[_types_pb2.LatentFormat, str]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("latents", "encoder_fingerprint", "resized", "model_resolution")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    RESIZED_FIELD_NUMBER: _ClassVar[int]
    MODEL_RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    latents: _containers.RepeatedCompositeFieldContainer[_types_pb2.Latent]
    encoder_fingerprint: str
    resized: _containers.RepeatedScalarFieldContainer[bool]
    model_resolution: int
    def __init__(self, latents: _Optional[_Iterable[_Union[_types_pb2.Latent, _Mapping]]] = ..., encoder_fingerprint: _Optional[str] = ..., resized: _Optional[_Iterable[bool]] = ..., model_resolution: _Optional[int] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("latents", "identity", "identity_version", "output", "return_masks")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_VERSION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    RETURN_MASKS_FIELD_NUMBER: _ClassVar[int]
    latents: _containers.RepeatedCompositeFieldContainer[_types_pb2.Latent]
    identity: str
    identity_version: int
    output: _types_pb2.OutputOptions
    return_masks: bool
    def __init__(self, latents: _Optional[_Iterable[_Union[_types_pb2.Latent, _Mapping]]] = ..., identity: _Optional[str] = ..., identity_version: _Optional[int] = ..., output: _Optional[_Union[_types_pb2.OutputOptions, _Mapping]] = ..., return_masks: _Optional[bool] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("faces", "masks", "identity", "identity_version", "request_id", "notes")
    FACES_FIELD_NUMBER: _ClassVar[int]
    MASKS_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    faces: _containers.RepeatedCompositeFieldContainer[_types_pb2.Image]
    masks: _containers.RepeatedCompositeFieldContainer[_types_pb2.Image]
    identity: str
    identity_version: int
    request_id: str
    notes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, faces: _Optional[_Iterable[_Union[_types_pb2.Image, _Mapping]]] = ..., masks: _Optional[_Iterable[_Union[_types_pb2.Image, _Mapping]]] = ..., identity: _Optional[str] = ..., identity_version: _Optional[int] = ..., request_id: _Optional[str] = ..., notes: _Optional[_Iterable[str]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("encoder_fingerprint", "preset", "resolution", "latent_shape", "has_mask", "device", "server_version", "face_detector", "face_models_licence")
    ENCODER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    LATENT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    HAS_MASK_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    FACE_DETECTOR_FIELD_NUMBER: _ClassVar[int]
    FACE_MODELS_LICENCE_FIELD_NUMBER: _ClassVar[int]
    encoder_fingerprint: str
    preset: str
    resolution: int
    latent_shape: _containers.RepeatedScalarFieldContainer[int]
    has_mask: bool
    device: str
    server_version: str
    face_detector: str
    face_models_licence: str
    def __init__(self, encoder_fingerprint: _Optional[str] = ..., preset: _Optional[str] = ..., resolution: _Optional[int] = ..., latent_shape: _Optional[_Iterable[int]] = ..., has_mask: _Optional[bool] = ..., device: _Optional[str] = ..., server_version: _Optional[str] = ..., face_detector: _Optional[str] = ..., face_models_licence: _Optional[str] = ...) -> None: ...
