"""The invisible watermark on generated images (the pixel half of facemux's provenance marks).

The EU AI Act (Article 50) asks providers of systems that generate synthetic images to mark
outputs in a machine-readable way. facemux does it twice, because each mark fails where the
other holds:

- a C2PA manifest (content credentials), signed with the operator's key, says who made the
  image and that it is AI-generated (IPTC digital source type). It is exact and attributable
  but lives in metadata, so stripping metadata or re-encoding removes it;
- an invisible watermark in the pixels survives metadata stripping, JPEG re-encoding and
  modest resizing or cropping, but only says "facemux made this" plus a short payload.

Watermark scheme (our own; `invisible-watermark`'s dwtDct does not survive resizing):
a keyed, periodic spread-spectrum pattern added to luminance. One tile of TILE x TILE pixels
is a grid of CHIP x CHIP blocks; half the blocks carry a fixed pseudo-random sync pattern
(the "facemux" marker), the other half carry the payload bits (48 bits: 32 payload + CRC-16),
each bit spread over several blocks with pseudo-random signs. The tile repeats over the
image, so the detector can:

1. estimate a resize from the autocorrelation of the noise residual (the repetition period),
2. undo it, fold the residual into one tile (summing every repetition: this is where the
   gain comes from on large images),
3. find the crop offset by circular cross-correlation with the sync pattern (FFT), and
4. read the bits at that offset and check the CRC.

The key is public (derived from a constant seed): this is a disclosure mark, not a secret.
Images smaller than one tile (e.g. 64 px aligned crops, which are exactly one tile) have no
repetition to fold; the sync marker is still detectable there but the payload usually is
not, and the detector reports the payload only when its CRC matches.

This module imports no grpc (models layer); the C2PA manifest, signing and the test CA are
the service's (service/c2pa.py).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

TILE = 64  # pixels per tile side at scale 1
CHIP = 4  # pixels per chip side: coarse enough to survive JPEG q75 and a 0.75x resize
GRID = TILE // CHIP  # chips per tile side
PAYLOAD_BYTES = 4  # 32 payload bits ...
CRC_BITS = 16  # ... plus a CRC-16 = 48 coded bits
CHASE_BITS = 6  # the decoder also tries flipping the 6 least reliable bits (64 CRC checks)
N_BITS = PAYLOAD_BYTES * 8 + CRC_BITS
DEFAULT_STRENGTH = 3.0  # luminance amplitude in 8-bit levels (PSNR ~38.7 dB)
# Sync z-score (peak of the normalised cross-correlation over all offsets and candidate
# scales) above which the marker counts as present. Chosen from bench/watermark.py: the
# highest score on 300+ unmarked images was ~5.1; marked images of 128 px and up score
# 9-18 even after JPEG q75 + 0.75x + crop.
DETECT_Z = 6.0

# Detection reads at most a DETECT_WINDOW-square window from the image's centre. The mark
# repeats every tile, so a window of 16 x 16 tiles already folds enough repetitions to find
# it (and tolerates resizes up to 3x), while the residual and its FFTs, about 40 bytes per
# pixel, no longer grow with the image: on a 6000 x 6000 image detection took seconds and
# over a gigabyte.
DETECT_WINDOW = 1024

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


_SYNC_CHIPS, _BIT_OF, _DATA_SIGN = _patterns()


def _up(chips: np.ndarray) -> np.ndarray:
    """Chip grid -> pixel tile (each chip a CHIP x CHIP block)."""
    return np.kron(chips, np.ones((CHIP, CHIP)))


_SYNC_TILE = _up(_SYNC_CHIPS).astype(np.float32)
_BIT_TILE = _up(_BIT_OF.astype(np.float64)).astype(np.int64)
_DATA_SIGN_TILE = _up(_DATA_SIGN).astype(np.float32)
_SYNC_FFT_CONJ = np.conj(np.fft.fft2(_SYNC_TILE))


def _crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE: tells a real payload from bits read out of noise."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def _coded_bits(payload: bytes) -> np.ndarray:
    body = payload[:PAYLOAD_BYTES].ljust(PAYLOAD_BYTES, b"\0")
    coded = body + _crc16(body).to_bytes(2, "big")
    return np.unpackbits(np.frombuffer(coded, np.uint8)).astype(np.float32) * 2 - 1


def payload_for(request_id: str) -> bytes:
    """The 32-bit payload facemux embeds for a request id (a hash: ids are longer)."""
    return hashlib.sha256(request_id.encode()).digest()[:PAYLOAD_BYTES]


def _tile(h: int, w: int, payload: bytes) -> np.ndarray:
    bits = _coded_bits(payload)
    data = np.where(_BIT_TILE >= 0, bits[np.maximum(_BIT_TILE, 0)], 0.0) * _DATA_SIGN_TILE
    one = _SYNC_TILE + data
    reps = (-(-h // TILE), -(-w // TILE))
    return np.tile(one, reps)[:h, :w]


def embed_watermark(
    rgb: np.ndarray, payload: bytes, strength: float = DEFAULT_STRENGTH
) -> np.ndarray:
    """Add the watermark to an (H, W, 3) uint8 RGB image; returns a new array.

    The pattern is added equally to R, G and B (a luminance change), so colour is untouched
    and JPEG's full-resolution luma channel carries it. Every pixel moves by +-strength;
    OpenCV's saturating uint8 add/subtract does it in one pass. Nothing is cached: every
    request (and every stream frame) has its own payload."""
    h, w = rgb.shape[:2]
    level = min(255, round(strength))
    sign = _tile(TILE, TILE, payload)[:, :, None]  # one tile, then repeated as uint8
    reps = (-(-h // TILE), -(-w // TILE), 3)
    up = np.tile(np.where(sign > 0, level, 0).astype(np.uint8), reps)[:h, :w]
    down = np.tile(np.where(sign < 0, level, 0).astype(np.uint8), reps)[:h, :w]
    image = np.ascontiguousarray(rgb, dtype=np.uint8)
    return cv2.subtract(cv2.add(image, np.ascontiguousarray(up)), np.ascontiguousarray(down))


_BIT_INDEX = np.maximum(_BIT_TILE, 0)
_SYNC_SIGN = _SYNC_TILE.astype(np.int16)
_DATA_SIGN_I16 = _DATA_SIGN_TILE.astype(np.int16)


def _sign_tiles(payloads: list[bytes]) -> np.ndarray:
    """(N, TILE, TILE) int16 signs (+1 / -1) of each payload's tile (``_tile``'s signs, for
    every payload at once: sync chips and data chips never overlap)."""
    bits = np.stack([_coded_bits(p) for p in payloads]).astype(np.int16)  # (N, N_BITS) +-1
    return _SYNC_SIGN + bits[:, _BIT_INDEX] * _DATA_SIGN_I16


def embed_watermark_batch(
    rgb: np.ndarray, payloads: list[bytes], strength: float = DEFAULT_STRENGTH
) -> np.ndarray:
    """``embed_watermark`` over a batch (N, H, W, 3) uint8, one payload per image, in one
    vectorised pass: the same pixels as calling it image by image."""
    n, h, w = rgb.shape[:3]
    if len(payloads) != n:
        raise ValueError(f"{n} images but {len(payloads)} payloads")
    level = min(255, round(strength))
    tiles = _sign_tiles(payloads) * np.int16(level)
    delta = np.tile(tiles, (1, -(-h // TILE), -(-w // TILE)))[:, :h, :w, None]
    out = rgb.astype(np.int16)
    out += delta
    # Saturating, as cv2.add/subtract are in the per-image version.
    return np.clip(out, 0, 255, out=out).astype(np.uint8)


def embed_watermark_batch_t(
    rgb: Tensor, payloads: list[bytes], strength: float = DEFAULT_STRENGTH
) -> Tensor:
    """``embed_watermark_batch`` for a uint8 (N, 3, H, W) tensor on any device: the faces
    are marked where the model left them (on the GPU, before they come back to the host)."""
    h, w = rgb.shape[-2:]
    level = min(255, round(strength))
    tiles = torch.from_numpy(_sign_tiles(payloads) * np.int16(level)).to(rgb.device)
    delta = tiles.repeat(1, -(-h // TILE), -(-w // TILE))[:, None, :h, :w]
    return (rgb.to(torch.int16) + delta).clamp_(0, 255).to(torch.uint8)


def embed_watermark_t(rgb: Tensor, payload: bytes, strength: float = DEFAULT_STRENGTH) -> Tensor:
    """``embed_watermark`` for a uint8 (3, H, W) tensor on any device (a frame that stays on
    the GPU between nvjpeg decode and encode); the same pixels as the array version."""
    h, w = rgb.shape[-2:]
    level = min(255, round(strength))
    sign = np.sign(_tile(TILE, TILE, payload)).astype(np.int16) * level
    tile = torch.from_numpy(sign).to(rgb.device)  # one tile travels, repeated on the device
    delta = tile.repeat(-(-h // TILE), -(-w // TILE))[:h, :w]
    # Saturating add, as cv2.add/subtract do on the host.
    return (rgb.to(torch.int16) + delta).clamp_(0, 255).to(torch.uint8)


@dataclass
class WatermarkResult:
    found: bool  # the facemux marker is present
    payload: bytes | None  # the 32-bit payload, only when its CRC matched
    confidence: float  # sync z-score (see DETECT_Z)
    scale: float = 1.0  # estimated resize factor of the image relative to the marked one


def _residual(rgb: np.ndarray) -> np.ndarray:
    """High-pass luminance, locally normalised: the watermark stands out, content does not."""
    y = rgb.astype(np.float32) if rgb.ndim == 2 else rgb.astype(np.float32).mean(axis=2)
    r = y - cv2.GaussianBlur(y, (0, 0), 1.5)
    # Weight each pixel by the inverse of its local residual variance (a Wiener-style
    # whitening): edges and texture, where content dwarfs the mark, count little; flat skin
    # and background, where the mark is most of the residual, count most. The constant is
    # about the mark's own variance. Tuned on 64 px synthetic faces, where it doubled the
    # z-score after JPEG q75 over plain local normalisation (bench/watermark.py).
    return r / (cv2.GaussianBlur(r * r, (0, 0), 1.5) + 9.0)


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
    cands: list[float] = []
    for i in np.argsort(prof)[::-1][:3]:
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


def _try_scale(res_full: np.ndarray, scale: float) -> tuple[float, np.ndarray, tuple[int, int]]:
    """Undo a resize by `scale`, fold, locate the sync pattern: (z, folded tile, offset)."""
    if abs(scale - 1.0) > 1e-3:
        h, w = res_full.shape
        size = (max(1, round(w / scale)), max(1, round(h / scale)))
        res = cv2.resize(res_full, size, interpolation=cv2.INTER_LINEAR)
    else:
        res = res_full
    folded = _fold(res)
    corr = np.fft.ifft2(np.fft.fft2(folded) * _SYNC_FFT_CONJ).real
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
    res = _residual(rgb[y0 : y0 + DETECT_WINDOW, x0 : x0 + DETECT_WINDOW])
    # Scale 1 always; the autocorrelation's periods otherwise. A few fixed scales cover images
    # too small for the autocorrelation (a resized single tile).
    scales = [1.0] + [p / TILE for p in _period_candidates(res)]
    if min(res.shape) < 2 * TILE:
        scales += [0.75, 0.5, 1.25, 1.5, 2.0]
    best: tuple[float, np.ndarray, tuple[int, int], float] | None = None
    seen: list[float] = []
    for s in scales:
        if not 0.3 <= s <= 3.0 or any(abs(s - t) < 0.002 for t in seen):
            continue
        seen.append(s)
        z, folded, off = _try_scale(res, s)
        if best is None or z > best[0]:
            best = (z, folded, off, s)
    assert best is not None
    z, folded, (dy, dx), scale = best
    payload = _read_payload(folded, dy, dx) if z >= DETECT_Z else None
    return WatermarkResult(z >= DETECT_Z, payload, z, scale)


def _read_payload(folded: np.ndarray, dy: int, dx: int) -> bytes | None:
    aligned = np.roll(folded, (-dy, -dx), axis=(0, 1))
    contrib = aligned * _DATA_SIGN_TILE
    mask = _BIT_TILE >= 0
    soft = np.bincount(_BIT_TILE[mask], weights=contrib[mask], minlength=N_BITS)
    hard = (soft > 0).astype(np.uint8)
    # Chase decoding: a bit read from few chips is the one most likely wrong, so try the
    # combinations of flips of the least reliable ones; the CRC picks the real payload.
    weak = np.argsort(np.abs(soft))[:CHASE_BITS]
    for combo in range(1 << CHASE_BITS):
        bits = hard.copy()
        for j, pos in enumerate(weak):
            if combo >> j & 1:
                bits[pos] ^= 1
        coded = np.packbits(bits).tobytes()
        body, crc = coded[:PAYLOAD_BYTES], int.from_bytes(coded[PAYLOAD_BYTES:], "big")
        if _crc16(body) == crc:
            return body
    return None
