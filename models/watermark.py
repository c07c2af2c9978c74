"""The invisible watermark on generated images (the pixel half of facemux's provenance marks).

The EU AI Act (Article 50) asks providers of systems that generate synthetic images to mark
outputs in a machine-readable way. facemux does it twice, because each mark fails where the
other holds: a signed C2PA manifest (service/c2pa.py) is exact and attributable but lives in
metadata, so stripping metadata or re-encoding removes it; this watermark, in the pixels,
survives metadata stripping, JPEG re-encoding and modest resizing or cropping, but only says
"facemux made this" plus a short payload.

Scheme (our own; `invisible-watermark`'s dwtDct does not survive resizing): a keyed, periodic
spread-spectrum pattern added to luminance. One tile of TILE x TILE pixels is a grid of
CHIP x CHIP chips; half the chips carry a fixed pseudo-random sync pattern (the "facemux"
marker), the other half the payload (24 bits + CRC-16, convolutionally encoded to 92
bits), each coded bit on one or two chips with pseudo-random signs. The chips are rounded
off (a circular Gaussian blur), so the pattern has no hard block edges.

How strong it is where is a perceptual mask (``_strength``): about one level on flat,
bright areas, where any pattern shows, up to a few levels in texture and dark areas, where
the eye does not see it. It also follows how much of the mark a reader can fold: an area
of 112-160 px (a 128 px face keeps 2.6 tiles after JPEG q75, a 0.75x resize and a 10 %
crop) gets three times the texture's share, and more of the carrier on the payload than on
the marker, ramping to none at 64 and 224 px (SMALL_RAMP); flat areas are marked alike at
every size. Rounding to 8 bits goes through a keyed dither, so a fraction of a level still
adds up in the detector. PSNR against the unmarked image on the synthetic faces: ~45 dB
at 64 px, ~42 dB at 128 px, ~46 dB at 256 px (the previous uniform +-3 levels: 38.6 dB).

The tile repeats over the image, so the detector can:

1. estimate a resize from the autocorrelation of the noise residual (the repetition period),
2. undo it, fold the residual into one tile (summing every repetition: this is where the
   gain comes from on large images),
3. find the crop offset by circular cross-correlation with the sync pattern (FFT), and
4. correlate each coded bit's matched filter at that offset, decode the soft values with
   list Viterbi (the most likely messages in order) and check the CRC.

A frame is marked only in its swapped face regions (``regions``), on the frame's own tile
grid: the rest of the frame is the caller's, returned bit for bit. The detector needs no
face finder for that: the marker still shows on the whole frame, but the unmarked rest
dilutes the payload, so when the payload does not read there it is read again in the
sub-windows where the marker is strongest (see WINDOW_FRACTIONS).

The key is public (derived from a constant seed): this is a disclosure mark, not a secret.
Small images are the weak spot (bench/watermark.py has the rates): a 64 px crop is a single
tile with nothing to fold. The detector reports the payload only when its CRC matches.
Format 2 (this one) carries 24 payload bits; format 1 carried 32 with the same marker, so
its marks are still found, without their payload.

This module imports no grpc (models layer).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger(__name__)

TILE = 64  # pixels per tile side at scale 1
CHIP = 4  # pixels per chip side before smoothing: survives JPEG q75 and a 0.75x resize
GRID = TILE // CHIP  # chips per tile side
# 24 payload bits (the first 3 bytes of a hash, ``payload_for``) ... Format 2: format 1
# carried 32, but 48 message bits did not fit in what the attack chain leaves of a 128 px
# image (2.6 tiles to fold): on 40 synthetic 128 px faces after JPEG q75 + 0.75x resize +
# 10 % crop, with the small-area boost (SMALL_RAMP), 32 bits read on 21 and 24 bits on 38.
# The marker is the same in both formats (the same seed), so a format-1 mark is still
# found; its payload is not read. 24 bits still tell one request in 16 million from
# another, and ``match_payload`` tests a known request id's payload where it does not read.
PAYLOAD_BYTES = 3
CRC_BITS = 16  # ... plus a CRC-16 = 40 message bits ...
# ... through a rate-1/2 convolutional code (constraint length 7, the usual 171/133 octal
# generators, 6 zero tail bits): 92 coded bits, decoded by soft-decision Viterbi. Hard
# per-bit decisions on the message bits (with flips of the least reliable ones) read the
# payload of 55 % of the bench's 640x480 frames after JPEG q75 + 0.75x resize + 10 % crop
# (format 1); the code reads all of them, and each read is a single CRC check (fewer chance
# matches).
CONV_K = 7
CONV_POLYS = (0o171, 0o133)
MESSAGE_BITS = PAYLOAD_BYTES * 8 + CRC_BITS
N_BITS = (MESSAGE_BITS + CONV_K - 1) * len(CONV_POLYS)

# The carrier: the chip pattern blurred circularly (the tile still repeats seamlessly) by a
# Gaussian of CARRIER_SIGMA pixels. Hard 4x4 block edges were what the eye saw on smooth
# skin, and JPEG and resizing removed their high frequencies anyway.
CARRIER_SIGMA = 0.6
# The payload needs more energy than the marker (40 message bits to read against one
# pattern to find, and a marker whose payload reads counts as found, see CONFIRM_Z), so its
# chips are the stronger ones, but only a little. On 80 synthetic 128 px faces after JPEG
# q75 + 0.75x resize + 10 % crop the sync z-score averaged 6.8 with the weights 0.9 / 1.1,
# 7.2 with 1.0 / 1.1 and 7.5 with 1.1 / 1.1 (standard deviation 0.85), and the payload read
# on 28, 22 and 16 of them; at 1.1 / 1.1 a face-only mark on a full frame (the astronaut,
# JPEG q90) no longer read through the window search. The weights only share the energy
# (the carrier is normalised to the same RMS) and the detector's filters do not depend on
# them, so marks made with other weights read alike.
SYNC_WEIGHT = 1.0
DATA_WEIGHT = 1.1
# On small areas (SMALL_RAMP) the sync chips' weight falls towards SYNC_WEIGHT_SMALL: there the
# marker is found with room to spare (on 160 synthetic 128 px faces after the chain the
# payload, once read, confirms it from CONFIRM_Z up), and the payload is what runs short.
# Side by side on those 160 faces with the boost x3: 148 read at 1.0 / 1.1, 158 at 0.73 / 1.1.
SYNC_WEIGHT_SMALL = 0.73
CARRIER_CLIP = 1.5  # the carrier is clipped at this many RMS, then scaled to a peak of 1

# Perceptual mask: the peak change of a pixel, in 8-bit levels, follows the local texture and
# brightness, as just-noticeable-difference models have it: FLAT_LEVEL on flat areas, rising
# by TEXTURE_GAIN per level of local mean absolute deviation up to TEXTURE_MAX where texture
# hides it, and up to DARK_GAIN times more in dark areas (below DARK_LEVEL), where the eye's
# contrast threshold rises.
FLAT_LEVEL = 1.5
TEXTURE_GAIN = 0.5
TEXTURE_MAX = 2.25
DARK_GAIN = 0.5
DARK_LEVEL = 48.0

# Strength that follows how much of the mark a reader can fold. A 128 px image after JPEG
# q75 + 0.75x resize + 10 % crop keeps 78 px, 2.6 tiles: at the mask above the payload read
# on 10 of 40 synthetic faces (the marker on all). Areas whose shorter side is in the middle
# of SMALL_RAMP (px) get SMALL_TEXTURE_BOOST times the texture's share of the mask (the
# gain and the headroom above FLAT_LEVEL), ramping linearly to none at either end: flat
# areas keep FLAT_LEVEL (a flat patch looks the same at every size), 64 px faces, too small
# to read a payload from after the chain, keep their PSNR, and from 224 px the fold has
# enough tiles without it. On those 40 faces the boost x3 read 21 of 40 at 42.1 dB (45.3
# without); uniformly x1.5, flat areas included, 35 of 40 at 42.0 dB.
SMALL_RAMP = (64, 112, 160, 224)
SMALL_TEXTURE_BOOST = 3.0

# Sync z-score (peak of the normalised cross-correlation over all offsets and candidate
# scales) above which the marker counts as present (bench/watermark.py prints the highest
# unmarked score beside it). On the bench's 296 unmarked images, as they are and after JPEG
# q75 (592 trials), 54 scored 4.5 or more, 11 4.75, 5 5.0 and 1 5.25 (5.42), none 5.5: the
# tail falls about threefold every quarter point, so about one unmarked image in 2,000
# would reach 5.5. On 80 synthetic 128 px faces after JPEG q75 + 0.75x resize + 10 % crop
# (the sync z 7.2 on average, deviation 0.85) 6.0 missed the marker on 6 of them, 5.5 on 1.
DETECT_Z = 5.5
# Below DETECT_Z, a marker whose payload also reads (its CRC-16 matching) counts as found
# from CONFIRM_Z up; the likeliest message is read from CONFIRM_Z, the LIST_SIZE likeliest
# and one more at each of SCALE_STEPS from LIST_Z. Every check is a chance match once in
# 65536, and about half of the unmarked images score 4 or more, so the 68 extra checks
# wait for a sync that a mark gives: on 216 marked images of the bench's kinds under its
# five attacks (1,041 payloads read), the 25 read through the list or the scale steps all
# came with a sync of 5.6 or more, while 5 of its 592 unmarked trials score 5.0 or more.
# From 4.0 the list and steps made most of the bench's CRC checks on unmarked images
# (about 25,000 in all, so about 0.4 chance matches expected per run).
CONFIRM_Z = 4.0
LIST_Z = 5.0
# How many of the most likely messages the CRC is checked on at the sync's own scale and
# offset, when the likeliest one fails it. On 128 px faces after JPEG q75 + 0.75x resize +
# 10 % crop each coded bit was read with about 23 % errors in format 1: the likeliest
# message was right on 1 in 10 of them, one of the 64 likeliest on 1 in 4
# (bench/RESULTS.md). Each is one more chance CRC match (1 in 65536), so only this one
# read gets a list.
LIST_SIZE = 64

# Detection reads at most a DETECT_WINDOW-square window from the image's centre. The mark
# repeats every tile, so a window of 16 x 16 tiles already folds enough repetitions to find
# it (and tolerates resizes up to 3x), while the residual and its FFTs, about 40 bytes per
# pixel, no longer grow with the image: on a 6000 x 6000 image detection took seconds and
# over a gigabyte.
DETECT_WINDOW = 1024

# Autocorrelation peaks tried as the repetition period (each also halved): local maxima,
# since host content (a cat's fur) after JPEG + resize + crop made the samples around one
# high peak crowd out the mark's own period.
PERIOD_PEAKS = 3
# Relative scale refinements the payload is also read at when it does not read at the sync's.
SCALE_STEPS = (-0.006, 0.006, -0.012, 0.012)
# When no candidate scale reaches DETECT_Z, the sync is also searched at these relative
# steps around every candidate. On textured photos the autocorrelation's period is off by
# about a percent (47.4 px for 48 on immunohistochemistry after a 0.75x resize): over a few
# hundred pixels that smears the 4 px chips, and the marker scored 3.9 at the estimate, 7.5
# at the true scale. The search tries about five times as many scales, so unmarked images
# score higher too: the bench's highest went from 5.06 to 5.42 (see DETECT_Z).
SCALE_REFINE = SCALE_STEPS
# A frame is marked only on its swapped faces, so on the whole image the unmarked rest dilutes
# the payload's correlation: the marker is found, the payload not read. The detector then
# folds square windows of these fractions of the image's shorter side, each at every eighth
# of its side (a face's mark reads only from a window within about a quarter tile of it),
# ranks them by their own sync z-score and reads the payload in the best WINDOW_READS. Each
# read is one more CRC-16 check (a chance match once in 65536), so only a few, and only on
# images whose marker already scored WINDOW_Z. On 60 synthetic frames marked on the face
# only (format 2) under JPEG q75 or q90, crop, crop + JPEG q75 and the attack chain, the
# four payloads the windows read came from the best window; with 16 reads, an unmarked
# 256 px face read a chance payload in its 12th. Side by side with LIST_Z, on 60 other
# face-only frames, 160 128 px faces and the 16 skimage samples (the same payloads read,
# JPEG q75 and the chain) and 832 unmarked trials: the CRC checks on unmarked images fell
# from 34,637 to 2,647, the chance payloads from 1 to 0.
WINDOW_FRACTIONS = (1 / 2, 2 / 5, 1 / 3, 2 / 7)
WINDOW_STRIDE = 8
WINDOW_READS = 4
# The window search runs from this whole-image sync z-score up (a face of a quarter of a
# 640x480 frame after JPEG q75 scores 3 to 4 on the whole frame), at the best
# WINDOW_SCALES candidate scales: each costs a few hundred ms, paid also by unmarked photos
# that score above WINDOW_Z.
WINDOW_Z = 3.0
WINDOW_SCALES = 1

# The detector's high-pass (Gaussian sigma, pixels) and whitening constant (about the mark's
# own residual variance). The matched filters are the carriers high-passed alike; the payload
# bits' filters, on an image downscaled below RESIZED_BELOW, also blurred by MATCH_BLUR
# pixels: what a 0.75x resize (and the detector's upsampling back) leaves of them. The sync
# search keeps the sharp filter: blurred, it found the marker less often on small images.
RESIDUAL_SIGMA = 1.5
WHITEN_C = 2.0
MATCH_BLUR = 1.0
RESIZED_BELOW = 0.95

_SEED = int.from_bytes(hashlib.sha256(b"facemux-watermark-v1").digest()[:8], "little")


def _patterns() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sync chip signs, bit index per chip (-1 = sync chip), data chip signs), GRID x GRID."""
    rng = np.random.default_rng(_SEED)
    n = GRID * GRID
    order = rng.permutation(n)
    is_sync = np.zeros(n, bool)
    is_sync[order[: n // 2]] = True
    bit_of = np.full(n, -1, np.int64)
    data_chips = order[n // 2 :]
    bit_of[data_chips] = np.arange(len(data_chips)) % N_BITS
    sign = rng.choice(np.array([-1.0, 1.0]), size=n)
    sync = np.where(is_sync, sign, 0.0)
    data_sign = np.where(is_sync, 0.0, sign)
    return sync.reshape(GRID, GRID), bit_of.reshape(GRID, GRID), data_sign.reshape(GRID, GRID)


def _up(chips: np.ndarray) -> np.ndarray:
    """Chip grid -> pixel tile (each chip a CHIP x CHIP block)."""
    return np.kron(chips, np.ones((CHIP, CHIP)))


def _gauss_response(sigma: float) -> np.ndarray:
    """The (TILE, TILE) frequency response of a Gaussian blur, for circular filtering."""
    f = np.fft.fftfreq(TILE)
    g = np.exp(-2 * (np.pi * sigma * f) ** 2)
    return np.outer(g, g)


def _circular(tile: np.ndarray, response: np.ndarray) -> np.ndarray:
    return np.fft.ifft2(np.fft.fft2(tile) * response).real


_SYNC_CHIPS, _BIT_OF, _DATA_SIGN = _patterns()
_SMOOTH = _gauss_response(CARRIER_SIGMA)
_SYNC_CARRIER = _circular(_up(_SYNC_CHIPS), _SMOOTH)
_BIT_CHIP = np.maximum(_BIT_OF, 0)
# The Gaussian response is an outer product, so the circular blur of a tile X is S X S with
# S the (symmetric) 1-D circulant blur; blocks are E V E^T with E the chip-to-pixel
# repetition. Hence a carrier is (S E) V (S E)^T, V its GRID x GRID chip values.
_UP_SMOOTH = np.fft.ifft(
    np.fft.fft(np.kron(np.eye(GRID), np.ones((CHIP, 1))), axis=0)
    * np.exp(-2 * (np.pi * CARRIER_SIGMA * np.fft.fftfreq(TILE)) ** 2)[:, None],
    axis=0,
).real
# One smoothed carrier per coded bit: the tile for a payload is the sync carrier plus the
# bits (+-1) times these (the detector's matched filters are made of them).
_BIT_CARRIERS = np.stack(
    [
        _circular(_up(np.where(np.equal(_BIT_OF, b), _DATA_SIGN, 0.0)), _SMOOTH)
        for b in range(N_BITS)
    ]
)
# The carrier's mean square per unit weight, sync and payload (to normalise any weights).
_SYNC_MS = float((_SYNC_CARRIER**2).mean())
_DATA_MS = float((_BIT_CARRIERS.sum(0) ** 2).mean())
# The detector's matched filters: the carriers as its high-pass sees them, the bits' blurred
# too for a downscaled image (see MATCH_BLUR).
_HIGH_PASS = 1.0 - _gauss_response(RESIDUAL_SIGMA)
_HIGH_PASS_RESIZED = _HIGH_PASS * _gauss_response(MATCH_BLUR)
_SYNC_FFT = np.fft.fft2(_SYNC_CARRIER)
_BIT_FILTERS = {
    resized: np.stack([_circular(c, response) for c in _BIT_CARRIERS]).reshape(N_BITS, -1)
    for resized, response in ((False, _HIGH_PASS), (True, _HIGH_PASS_RESIZED))
}


def _resized(scale: float) -> bool:
    return scale < RESIZED_BELOW


# A keyed dither in [0, 1): a change of 0.3 level becomes +1 on 30 % of the pixels rather than
# nothing, so the weak mark of flat areas survives rounding to 8 bits on average.
_DITHER = np.random.default_rng(_SEED + 1).random((TILE, TILE)).astype(np.float32)


def _crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE: tells a real payload from bits read out of noise."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


_STATES = 1 << (CONV_K - 1)
# Output bits of every shift-register content (the new bit at the top, the state below).
_CONV_OUT = np.array(
    [[bin(reg & g).count("1") & 1 for g in CONV_POLYS] for reg in range(2 * _STATES)], np.uint8
)


def _message(payload: bytes) -> np.ndarray:
    body = payload[:PAYLOAD_BYTES].ljust(PAYLOAD_BYTES, b"\0")
    return np.unpackbits(np.frombuffer(body + _crc16(body).to_bytes(2, "big"), np.uint8))


def _encode(messages: np.ndarray) -> np.ndarray:
    """Coded bits as +-1 float32 (N, N_BITS) of (N, MESSAGE_BITS) message bits: the shift
    register's taps as shifted copies of the message, so a batch costs a few array adds."""
    n = len(messages)
    tail = np.zeros((n, CONV_K - 1), np.uint8)
    # Register bit i at step t holds message bit t - (CONV_K - 1 - i) (zeros before the start).
    padded = np.concatenate([tail, messages, tail], axis=1)
    steps = MESSAGE_BITS + CONV_K - 1
    out = np.zeros((n, steps, len(CONV_POLYS)), np.uint8)
    for k, poly in enumerate(CONV_POLYS):
        for i in range(CONV_K):
            if poly >> i & 1:
                out[:, :, k] ^= padded[:, i : i + steps]
    return out.reshape(n, -1).astype(np.float32) * 2 - 1


def _coded_bits(payload: bytes) -> np.ndarray:
    """The payload's coded bits as +-1: CRC appended, then convolutionally encoded."""
    return _encode(_message(payload)[None])[0]


def _viterbi(soft: np.ndarray, size: int = 1) -> np.ndarray:
    """The ``size`` message bit sequences most likely sent, best first (size, MESSAGE_BITS),
    from each coded bit's soft correlation (positive = 1): maximum likelihood over every path
    through the code's trellis that ends in the zero state (the tail). Each state keeps its
    ``size`` best paths (a parallel list Viterbi), so the list is the exact ``size`` best;
    fewer rows come back when the trellis has fewer paths."""
    steps = len(soft) // len(CONV_POLYS)
    branch = soft.reshape(steps, len(CONV_POLYS)) @ (_CONV_OUT.astype(np.float64) * 2 - 1).T
    # State s' is reached from register contents 2 s' and 2 s' + 1 (the bit shifted out).
    regs = 2 * np.arange(_STATES)[:, None] + np.arange(2)
    prev = regs & (_STATES - 1)
    metric = np.full((_STATES, size), -np.inf)
    metric[0, 0] = 0.0
    # choice[t, s', k]: the k-th best path into s' came from register bit j // size, and was
    # the (j % size)-th best path of that predecessor.
    choice = np.empty((steps, _STATES, size), np.int64)
    for t in range(steps):
        cand = (metric[prev] + branch[t][regs][:, :, None]).reshape(_STATES, 2 * size)
        choice[t] = np.argsort(-cand, axis=1, kind="stable")[:, :size]
        metric = np.take_along_axis(cand, choice[t], axis=1)
    ranks = np.flatnonzero(np.isfinite(metric[0]))
    state = np.zeros(len(ranks), np.int64)
    bits = np.empty((len(ranks), steps), np.uint8)
    for t in range(steps - 1, -1, -1):
        j = choice[t, state, ranks]
        reg = 2 * state + j // size
        ranks = j % size
        bits[:, t] = reg >> (CONV_K - 1)
        state = reg & (_STATES - 1)
    return bits[:, :MESSAGE_BITS]


def payload_for(request_id: str) -> bytes:
    """The 24-bit payload facemux embeds for a request id (a hash: ids are longer)."""
    return hashlib.sha256(request_id.encode()).digest()[:PAYLOAD_BYTES]


def _carriers(payloads: Sequence[bytes], small: float = 0.0) -> np.ndarray:
    """(N, TILE, TILE) float32 carriers, peak 1, one per payload, for an area that gets
    ``small`` of the small-area boost (``small_share``: the sync's weight)."""
    sync_weight = SYNC_WEIGHT + (SYNC_WEIGHT_SMALL - SYNC_WEIGHT) * small
    rms = np.sqrt(sync_weight**2 * _SYNC_MS + DATA_WEIGHT**2 * _DATA_MS)
    bits = _encode(np.stack([_message(p) for p in payloads])).astype(np.float64)
    # The chip values (GRID x GRID), then blocks rounded off as _UP_SMOOTH V _UP_SMOOTH^T:
    # two small products per payload instead of FFTs of the whole tile.
    chips = _SYNC_CHIPS * sync_weight + bits[:, _BIT_CHIP] * (_DATA_SIGN * DATA_WEIGHT)
    tiles = (_UP_SMOOTH @ chips @ _UP_SMOOTH.T / (rms * CARRIER_CLIP)).astype(np.float32)
    # Clipped after the cast (the same values: +-1 are exact in float32), in place.
    return np.clip(tiles, -1.0, 1.0, out=tiles)


# -- embedding -------------------------------------------------------------------------------
#
# One description of the change (``_delta``), run by numpy on the host and by torch on the
# model's device. It uses element-wise operations only (the blurs are sums of shifted slices,
# each add and multiply its own IEEE operation, in a fixed order), so numpy, torch on the CPU
# and torch on a GPU give the same pixels, and a batch the same pixels as its images one by
# one.


@dataclass(frozen=True)
class _Backend:
    """The few array operations the change needs, from numpy (host paths: single-threaded,
    no dispatch cost on small images) or torch (the model's device)."""

    pad: Callable[[Any, int, int, int, str], Any]  # (N, H, W), before/after rows, after cols
    floor: Callable[[Any], Any]
    clamp: Callable[[Any, float, float], Any]
    double: Callable[[Any, int], Any]  # nearest-neighbour 2x along an axis
    tile: Callable[[Any, tuple[int, ...]], Any]


def _np_pad(x: np.ndarray, before: int, after_y: int, after_x: int, mode: str) -> np.ndarray:
    width = ((0, 0), (before, after_y), (before, after_x))
    if mode == "reflect":
        return np.pad(x, width, mode="reflect")
    return np.pad(x, width, mode="edge")


def _t_pad(x: Tensor, before: int, after_y: int, after_x: int, mode: str) -> Tensor:
    import torch

    return torch.nn.functional.pad(x[:, None], (before, after_x, before, after_y), mode=mode)[:, 0]


_NUMPY = _Backend(
    pad=_np_pad,
    floor=np.floor,
    clamp=np.clip,
    double=lambda x, axis: np.repeat(x, 2, axis=axis),
    tile=np.tile,
)


@functools.cache
def _torch_backend() -> _Backend:
    # torch is imported here, not at the top: reading a mark (`facemux verify --local`)
    # needs numpy and OpenCV only, and starts in a fraction of the time without torch.
    import torch

    return _Backend(
        pad=_t_pad,
        floor=torch.floor,
        clamp=torch.clamp,
        double=lambda x, axis: torch.repeat_interleave(x, 2, dim=axis),
        tile=lambda x, reps: x.repeat(*reps),
    )


def _blur(x: Any, ops: _Backend) -> Any:
    """5-tap binomial blur (~ Gaussian, sigma 1) of (N, H, W), edges reflected, times 256:
    [1, 2, 1] twice per axis, additions only."""
    h, w = x.shape[-2:]
    p = ops.pad(x, 2, 2, 2, "reflect" if min(h, w) > 2 else "replicate")
    for _ in range(2):
        mid = p[:, :, 1:-1]
        p = p[:, :, :-2] + mid + mid + p[:, :, 2:]
    for _ in range(2):
        mid = p[:, 1:-1]
        p = p[:, :-2] + mid + mid + p[:, 2:]
    return p


def small_share(h: int, w: int) -> float:
    """How much of the small-image boost (SMALL_RAMP) an h x w area gets, 0 to 1."""
    lo, full_from, full_to, hi = SMALL_RAMP
    side = min(h, w)
    return max(0.0, min(1.0, (side - lo) / (full_from - lo), (hi - side) / (hi - full_to)))


def _strength(y3: Any, ops: _Backend) -> Any:
    """Peak change allowed per pixel (8-bit levels), the perceptual mask, from float32
    (N, H, W) R + G + B: FLAT_LEVEL on flat, bright areas, more in texture and darkness,
    and more in texture on small areas (SMALL_RAMP). Measured on a half-resolution copy (a
    quarter of the work; the mask is smooth anyway)."""
    h, w = y3.shape[-2:]
    # A Python float from the shape alone, 1.0 exactly outside the ramp: numpy and torch
    # multiply by the same number, and other sizes get the same pixels as before.
    boost = 1.0 + (SMALL_TEXTURE_BOOST - 1.0) * small_share(h, w)
    if h % 2 or w % 2:
        y3 = ops.pad(y3, 0, h % 2, w % 2, "replicate")
    half = y3[:, 0::2, 0::2] + y3[:, 1::2, 0::2] + y3[:, 0::2, 1::2] + y3[:, 1::2, 1::2]
    mean = _blur(half, ops)  # 3072 times the local mean luminance
    texture = _blur(abs(half * 256.0 - mean), ops)  # 786432 times the mean abs. deviation
    top = FLAT_LEVEL + (TEXTURE_MAX - FLAT_LEVEL) * boost
    level = ops.clamp(texture * (TEXTURE_GAIN * boost / 786432) + FLAT_LEVEL, 0.0, top)
    dark = ops.clamp(mean * (-1.0 / (3072 * DARK_LEVEL)) + 1.0, 0.0, 1.0)
    level = level * (dark * DARK_GAIN + 1.0)
    return ops.double(ops.double(level, 1), 2)[:, :h, :w]


def _tiled(tile: Any, h: int, w: int, oy: int, ox: int, ops: _Backend) -> Any:
    """(N, TILE, TILE) repeated over an (h, w) area whose top-left pixel is tile pixel
    (oy, ox)."""
    reps = (1, -(-(h + oy) // TILE), -(-(w + ox) // TILE))
    return ops.tile(tile, reps)[:, oy : oy + h, ox : ox + w]


def _delta(y3: Any, carriers: Any, dither: Any, origin: tuple[int, int], ops: _Backend) -> Any:
    """The change, whole levels as float32 (N, H, W), for an area with R + G + B ``y3``;
    carriers (N, TILE, TILE) and dither (1, TILE, TILE) alike; origin: where (y, x) the area
    sits in the image whose tile grid it follows."""
    h, w = y3.shape[-2:]
    oy, ox = origin[0] % TILE, origin[1] % TILE
    change = _strength(y3, ops) * _tiled(carriers, h, w, oy, ox, ops)
    return ops.floor(change + _tiled(dither, h, w, oy, ox, ops))


def _embed_t(rgb: Tensor, payloads: Sequence[bytes], origin: tuple[int, int] = (0, 0)) -> Tensor:
    """The marked copy of uint8 (N, 3, H, W), one payload per image."""
    import torch

    small = small_share(*rgb.shape[-2:])
    carriers = torch.from_numpy(_carriers(payloads, small)).to(rgb.device)
    x = rgb.to(torch.int16)
    y3 = (x[:, 0] + x[:, 1] + x[:, 2]).to(torch.float32)
    dither = torch.from_numpy(_DITHER[None]).to(rgb.device)
    delta = _delta(y3, carriers, dither, origin, _torch_backend()).to(torch.int16)
    return (x + delta[:, None]).clamp_(0, 255).to(torch.uint8)


def _embed_np(
    rgb: np.ndarray, payloads: Sequence[bytes], origin: tuple[int, int] = (0, 0)
) -> np.ndarray:
    """The marked copy of uint8 (N, H, W, 3): the same operations as ``_embed_t``, so the
    same pixels."""
    carriers = _carriers(payloads, small_share(*rgb.shape[1:3]))
    x = rgb.astype(np.int16)
    y3 = (x[..., 0] + x[..., 1] + x[..., 2]).astype(np.float32)
    x += _delta(y3, carriers, _DITHER[None], origin, _NUMPY).astype(np.int16)[..., None]
    return np.clip(x, 0, 255, out=x).astype(np.uint8)


Region = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, end exclusive


def _merge(regions: Sequence[Region], h: int, w: int) -> list[Region]:
    """Clipped to the image, overlapping regions merged (each pixel is marked once)."""
    boxes = [(max(0, x0), max(0, y0), min(w, x1), min(h, y1)) for x0, y0, x1, y1 in regions]
    boxes = [b for b in boxes if b[2] > b[0] and b[3] > b[1]]
    merged = True
    while merged:
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                    boxes[i] = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
                    del boxes[j]
                    merged = True
                    break
            if merged:
                break
    return boxes


def embed_watermark_t(
    rgb: Tensor, payload: bytes, regions: Sequence[Region] | None = None
) -> Tensor:
    """``embed_watermark`` for a uint8 (3, H, W) tensor on any device (a frame that stays on
    the GPU between nvjpeg decode and encode); the same pixels as the array version."""
    if regions is None:
        return _embed_t(rgb[None], [payload])[0]
    out = rgb.clone()
    for x0, y0, x1, y1 in _merge(regions, *rgb.shape[-2:]):
        out[:, y0:y1, x0:x1] = _embed_t(rgb[None, :, y0:y1, x0:x1], [payload], (y0, x0))[0]
    return out


def embed_watermark(
    rgb: np.ndarray, payload: bytes, regions: Sequence[Region] | None = None
) -> np.ndarray:
    """The marked copy of an (H, W, 3) uint8 RGB image.

    The change is the same on R, G and B (luminance), so colour is untouched and JPEG's
    full-resolution luma channel carries it. ``regions`` (x0, y0, x1, y1: a frame's swapped
    faces) confine it: every other pixel is returned as it was, and the marked areas keep
    the whole image's tile grid, so the detector sees one mark. Nothing is cached: every
    request (and every stream frame) has its own payload."""
    if regions is None:
        return _embed_np(rgb[None], [payload])[0]
    out = np.array(rgb, dtype=np.uint8, copy=True)
    for x0, y0, x1, y1 in _merge(regions, *rgb.shape[:2]):
        out[y0:y1, x0:x1] = _embed_np(rgb[None, y0:y1, x0:x1], [payload], (y0, x0))[0]
    return out


def embed_watermark_batch_t(rgb: Tensor, payloads: list[bytes]) -> Tensor:
    """``embed_watermark_t`` over a uint8 (N, 3, H, W) batch, one payload per image, in one
    pass: the faces are marked where the model left them (on the GPU, before they come back
    to the host)."""
    if len(payloads) != rgb.shape[0]:
        raise ValueError(f"{rgb.shape[0]} images but {len(payloads)} payloads")
    return _embed_t(rgb, payloads)


def embed_watermark_batch(rgb: np.ndarray, payloads: list[bytes]) -> np.ndarray:
    """``embed_watermark`` over a batch (N, H, W, 3) uint8, one payload per image, in one
    vectorised pass: the same pixels as calling it image by image."""
    if len(payloads) != rgb.shape[0]:
        raise ValueError(f"{rgb.shape[0]} images but {len(payloads)} payloads")
    return _embed_np(rgb, payloads)


# -- detection -------------------------------------------------------------------------------


@dataclass
class WatermarkResult:
    found: bool  # the facemux marker is present
    payload: bytes | None  # the 24-bit payload (3 bytes), only when its CRC matched
    confidence: float  # sync z-score (see DETECT_Z)
    scale: float = 1.0  # estimated resize factor of the image relative to the marked one


def _residual(rgb: np.ndarray) -> np.ndarray:
    """High-pass luminance, locally normalised: the watermark stands out, content does not."""
    y = rgb.astype(np.float32) if rgb.ndim == 2 else rgb.astype(np.float32).mean(axis=2)
    r = y - cv2.GaussianBlur(y, (0, 0), RESIDUAL_SIGMA)
    # Weight each pixel by the inverse of its local residual variance (a Wiener-style
    # whitening): edges and texture, where content dwarfs the mark, count little; flat skin
    # and background, where the mark is most of the residual, count most.
    return r / (cv2.GaussianBlur(r * r, (0, 0), 1.5) + WHITEN_C)


def _period_candidates(res: np.ndarray) -> list[float]:
    """Repetition periods (pixels, per axis averaged) suggested by the autocorrelation."""
    h, w = res.shape
    if min(h, w) < 2 * TILE * 0.5:
        return []
    f = np.fft.rfft2(res - res.mean())
    ac = np.fft.irfft2(np.abs(f) ** 2, s=res.shape)
    ac /= ac[0, 0] + 1e-9
    lo, hi = int(TILE * 0.45), min(int(TILE * 2.2), h // 2, w // 2)
    if hi <= lo + 2:
        return []
    # Sum the horizontal and vertical axes (isotropic resize); a small band around each axis
    # keeps the peak when the period is not an integer.
    prof = ac[0, lo:hi] + ac[lo:hi, 0] + 0.5 * (ac[1, lo:hi] + ac[lo:hi, 1])
    # Local maxima only: the samples either side of one peak are not other candidates.
    peak = np.ones(len(prof), bool)
    peak[1:] &= prof[1:] >= prof[:-1]
    peak[:-1] &= prof[:-1] >= prof[1:]
    cands: list[float] = []
    for i in [int(j) for j in np.argsort(prof)[::-1] if peak[j]][:PERIOD_PEAKS]:
        p = lo + float(i)
        if 0 < i < len(prof) - 1:  # parabolic sub-pixel refinement
            a, b, c = prof[i - 1], prof[i], prof[i + 1]
            den = a - 2 * b + c
            if den < 0:
                p += 0.5 * (a - c) / den
        cands += [p, p / 2]
    return cands


def _fold(res: np.ndarray) -> np.ndarray:
    h, w = res.shape
    ph, pw = -(-h // TILE) * TILE, -(-w // TILE) * TILE
    padded = np.zeros((ph, pw), np.float32)
    padded[:h, :w] = res
    return padded.reshape(ph // TILE, TILE, pw // TILE, TILE).sum(axis=(0, 2))


def _try_scale(
    res_full: np.ndarray, scale: float, template: np.ndarray = _SYNC_FFT
) -> tuple[float, np.ndarray, tuple[int, int]]:
    """Undo a resize by `scale`, fold, locate the template (the FFT of a carrier tile, the
    sync pattern unless told): (z, folded tile, offset)."""
    if abs(scale - 1.0) > 1e-3:
        h, w = res_full.shape
        size = (max(1, round(w / scale)), max(1, round(h / scale)))
        res = cv2.resize(res_full, size, interpolation=cv2.INTER_LINEAR)
    else:
        res = res_full
    folded = _fold(res)
    corr = np.fft.ifft2(np.fft.fft2(folded) * np.conj(template * _HIGH_PASS)).real
    std = corr.std() + 1e-9
    idx = int(np.argmax(corr))
    z = float((corr.flat[idx] - corr.mean()) / std)
    dy, dx = divmod(idx, TILE)
    return z, folded, (dy, dx)


def detect_watermark(rgb: np.ndarray) -> tuple[bool, bytes | None, float]:
    """(marker found, payload or None, confidence z-score) for an RGB (or gray) uint8 image."""
    r = detect_watermark_full(rgb)
    return r.found, r.payload, r.confidence


def detect_watermark_full(rgb: np.ndarray) -> WatermarkResult:
    h, w = rgb.shape[:2]
    y0, x0 = max(0, (h - DETECT_WINDOW) // 2), max(0, (w - DETECT_WINDOW) // 2)
    return _detect(_residual(rgb[y0 : y0 + DETECT_WINDOW, x0 : x0 + DETECT_WINDOW]))


def _scales(res: np.ndarray) -> list[float]:
    """Scale 1 always; the autocorrelation's periods otherwise. A few fixed scales cover
    images too small for the autocorrelation (a resized single tile)."""
    scales = [1.0] + [p / TILE for p in _period_candidates(res)]
    if min(res.shape) < 2 * TILE:
        scales += [0.75, 0.5, 1.25, 1.5, 2.0]
    out: list[float] = []
    for s in scales:
        if 0.3 <= s <= 3.0 and all(abs(s - t) >= 0.002 for t in out):
            out.append(s)
    return out


def _ranked(
    res: np.ndarray, template: np.ndarray = _SYNC_FFT
) -> list[tuple[float, np.ndarray, tuple[int, int], float]]:
    """(z, folded tile, offset, scale) at every candidate scale, the highest z first."""
    tried = [(*_try_scale(res, s, template), s) for s in _scales(res)]
    return sorted(tried, key=lambda t: -t[0])


def _best(
    res: np.ndarray, template: np.ndarray = _SYNC_FFT
) -> tuple[float, np.ndarray, tuple[int, int], float]:
    return _ranked(res, template)[0]


def match_watermark(rgb: np.ndarray, payload: bytes) -> float:
    """How strongly an image carries the mark made with `payload` (the z-score of the whole
    pattern, marker and payload chips together, at its best offset and scale; present from
    DETECT_Z up). The marker, the same for every payload, dominates it: it says the mark is
    there, not whose it is. ``match_payload`` tells one request from another."""
    h, w = rgb.shape[:2]
    y0, x0 = max(0, (h - DETECT_WINDOW) // 2), max(0, (w - DETECT_WINDOW) // 2)
    res = _residual(rgb[y0 : y0 + DETECT_WINDOW, x0 : x0 + DETECT_WINDOW])
    return _best(res, np.fft.fft2(_carriers([payload])[0]))[0]


# match_payload's alignments (the marker's likeliest offsets and scales), and the z from which
# a payload counts as matched. On 30 faces, as embedded and after JPEG q75, against 5 other
# payloads each (600 checks) and the 30 faces unmarked: other payloads 3.5 at most, unmarked
# 3.5; the right payload 8.1 or more at 128 px, a median of 5.2 at 64 px as embedded (a
# single tile, where the blind read also misses one in eight).
MATCH_ALIGNMENTS = 4
MATCH_Z = 4.5


def match_payload(rgb: np.ndarray, payload: bytes) -> float:
    """Whether the mark's payload chips carry `payload`: the correlation of their matched
    filters with its coded bits, as a z-score (about standard normal for any other payload
    or an unmarked image), best over the marker's likeliest alignments; a match from
    MATCH_Z up. Testing one known payload needs far less signal than reading one blind, so
    this answers "did request X make this image?" where ``detect_watermark`` reads no
    payload."""
    h, w = rgb.shape[:2]
    y0, x0 = max(0, (h - DETECT_WINDOW) // 2), max(0, (w - DETECT_WINDOW) // 2)
    res = _residual(rgb[y0 : y0 + DETECT_WINDOW, x0 : x0 + DETECT_WINDOW])
    signs = _coded_bits(payload).astype(np.float64)
    best = -np.inf
    for _, folded, (dy, dx), scale in _refined(res, _ranked(res))[:MATCH_ALIGNMENTS]:
        aligned = np.roll(folded, (-dy, -dx), axis=(0, 1)).reshape(-1)
        soft = _BIT_FILTERS[_resized(scale)] @ aligned.astype(np.float64)
        best = max(best, float(soft @ signs / (np.linalg.norm(soft) + 1e-12)))
    return best


def _refined(
    res: np.ndarray, ranked: list[tuple[float, np.ndarray, tuple[int, int], float]]
) -> list[tuple[float, np.ndarray, tuple[int, int], float]]:
    """``ranked`` with every candidate scale also tried at SCALE_REFINE around it."""
    tried = list(ranked)
    for s in [c[3] for c in ranked]:
        tried += [(*_try_scale(res, s * (1.0 + step)), s * (1.0 + step)) for step in SCALE_REFINE]
    return sorted(tried, key=lambda t: -t[0])


def _detect(res: np.ndarray) -> WatermarkResult:
    ranked = _ranked(res)
    z, folded, (dy, dx), scale = ranked[0] if ranked[0][0] >= DETECT_Z else _refined(res, ranked)[0]
    payload = None
    if z >= CONFIRM_Z:
        # The likeliest message alone first: the same answer when it reads, at a fraction
        # of the list's cost.
        payload = _read_payload(folded, dy, dx, scale)
        if payload is None and z >= LIST_Z:
            payload = _read_payload(folded, dy, dx, scale, LIST_SIZE)
    if payload is None and z >= LIST_Z:
        # The sync peak's scale is not always the payload's best: a few tenths of a pixel of
        # period drift over the folded repetitions blur the bits more than the sync. Each
        # further read is one more CRC-16 check (a chance match once in 65536).
        for step in SCALE_STEPS:
            _, f2, (y2, x2) = _try_scale(res, scale * (1.0 + step))
            payload = _read_payload(f2, y2, x2, scale * (1.0 + step))
            if payload is not None:
                break
    if payload is None and ranked[0][0] >= WINDOW_Z:
        # On a face-only mark the whole image's scale estimate is weak too: the windows are
        # searched at the best WINDOW_SCALES of them, as the candidates first scored (around
        # each, a face-only mark's weak whole-image sync finds a wrong scale as often).
        for _, _, _, s in ranked[:WINDOW_SCALES]:
            payload = _read_windows(res, s)
            if payload is not None:
                break
    return WatermarkResult(z >= DETECT_Z or payload is not None, payload, z, scale)


def _starts(n: int, side: int) -> list[int]:
    """Window origins along one axis, the last one flush with the end."""
    starts = list(range(0, n - side + 1, max(1, side // WINDOW_STRIDE)))
    return starts if starts[-1] == n - side else [*starts, n - side]


def _read_windows(res: np.ndarray, scale: float) -> bytes | None:
    """The payload read in the sub-windows whose marker is strongest (see WINDOW_FRACTIONS),
    at the whole image's scale: the face the mark sits on, without a face finder."""
    if abs(scale - 1.0) > 1e-3:
        h, w = res.shape
        res = cv2.resize(res, (max(1, round(w / scale)), max(1, round(h / scale))))
    h, w = res.shape
    found: list[tuple[float, np.ndarray, tuple[int, int]]] = []
    for frac in WINDOW_FRACTIONS:
        side = int(min(h, w) * frac)
        if side < 2 * TILE:
            continue
        for y in _starts(h, side):
            for x in _starts(w, side):
                found.append(_try_scale(res[y : y + side, x : x + side], 1.0))
    found.sort(key=lambda c: -c[0])
    for _, folded, (dy, dx) in found[:WINDOW_READS]:
        payload = _read_payload(folded, dy, dx, scale)
        if payload is not None:
            return payload
    return None


def _read_payload(
    folded: np.ndarray, dy: int, dx: int, scale: float, list_size: int = 1
) -> bytes | None:
    """The payload from a folded tile at a sync offset: the first of the ``list_size`` most
    likely messages whose CRC matches (each one more chance match, see LIST_SIZE)."""
    aligned = np.roll(folded, (-dy, -dx), axis=(0, 1)).reshape(-1)
    # Each coded bit's matched filter.
    soft = _BIT_FILTERS[_resized(scale)] @ aligned.astype(np.float64)
    for bits in _viterbi(soft, list_size):
        coded = np.packbits(bits).tobytes()
        body, crc = coded[:PAYLOAD_BYTES], int.from_bytes(coded[PAYLOAD_BYTES:], "big")
        if _crc16(body) == crc:
            return body
    return None
