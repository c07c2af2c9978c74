"""Real-photo face pipeline: detect, landmark, align, mask, colour-correct, paste back, track.

No gRPC here: numpy, OpenCV and dlib on the host, torch for the same pixel work on a device
(:mod:`.tensor`). The model is a callback (``SwapCrops``) so this package
does not care how crops are batched or on which device they run.

    detector = make_detector("hog")
    swapper = FaceSwapper(detector, LandmarkPredictor(5))
    result = swapper.swap(rgb, swap_crops, SwapOptions(max_faces=4))

Aligned crops match the synthetic training crops of :mod:`facemux.models.synth` (see
:mod:`.align`).
"""

from __future__ import annotations

from .align import (
    align_matrix,
    box_from_landmarks,
    crop_landmarks,
    invert_affine,
    template,
    template_landmarks,
    umeyama,
    warp_crop,
)
from .blend import BLEND_MODES, paste_face, warp_mask_to_frame
from .colour import COLOUR_METHODS, correct_colour
from .detect import (
    DETECTOR_LICENCES,
    DETECTORS,
    DetectedFace,
    Detector,
    HogDetector,
    YuNetDetector,
    box_iou,
    make_detector,
)
from .frame import DeviceFrame
from .landmarks import LANDMARK_LICENCES, Landmarker, LandmarkPredictor, model_file
from .mask import landmark_mask, refine_mask, template_mask
from .swap import (
    SKIP_NOT_SELECTED,
    SKIP_OVER_LIMIT,
    STAGES,
    FaceResult,
    FaceSwapper,
    SwapCrops,
    SwapCropsT,
    SwapOptions,
    SwapResult,
    swap_frame,
)
from .track import FaceTracker, LandmarkFilter

__all__ = [
    "BLEND_MODES",
    "COLOUR_METHODS",
    "DETECTORS",
    "DETECTOR_LICENCES",
    "LANDMARK_LICENCES",
    "SKIP_NOT_SELECTED",
    "SKIP_OVER_LIMIT",
    "STAGES",
    "DetectedFace",
    "Detector",
    "DeviceFrame",
    "FaceResult",
    "FaceSwapper",
    "FaceTracker",
    "HogDetector",
    "LandmarkFilter",
    "LandmarkPredictor",
    "Landmarker",
    "SwapCrops",
    "SwapCropsT",
    "SwapOptions",
    "SwapResult",
    "YuNetDetector",
    "align_matrix",
    "box_from_landmarks",
    "box_iou",
    "correct_colour",
    "crop_landmarks",
    "invert_affine",
    "landmark_mask",
    "make_detector",
    "model_file",
    "paste_face",
    "refine_mask",
    "swap_frame",
    "template",
    "template_landmarks",
    "template_mask",
    "umeyama",
    "warp_crop",
    "warp_mask_to_frame",
]
