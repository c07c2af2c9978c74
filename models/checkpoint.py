"""Encoder and decoder checkpoints: safetensors with facemux metadata, never pickle.

Layout: a standard safetensors file whose header metadata holds one key, ``facemux``,
a JSON object with the format name and version, the checkpoint ``kind`` ("encoder" or
"decoder"), the ModelConfig, the weights' fingerprint, for encoders the face template their
training crops were aligned to (facemux.models.face_template; a checkpoint without one reads
as the default) and, for decoders, the identity and the fingerprint of the encoder they were
trained against.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypeGuard

import safetensors.torch
import torch
from torch import Tensor, nn

from . import safe_json
from .config import ModelConfig
from .errors import CheckpointError, FingerprintMismatchError, InvalidInputError, NotFoundError
from .face_template import TEMPLATE_68, as_template
from .networks import Decoder, Encoder

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MAX_HEADER_BYTES",
    "METADATA_KEY",
    "DecoderMeta",
    "EncoderMeta",
    "PathOrBytes",
    "decoder_to_bytes",
    "encoder_to_bytes",
    "expected_size",
    "fingerprint",
    "load_decoder",
    "load_encoder",
    "read_decoder",
    "read_encoder",
    "read_metadata",
    "save_decoder",
    "save_encoder",
]

FORMAT = "facemux.checkpoint"
FORMAT_VERSION = 1
METADATA_KEY = "facemux"
# Our headers are a few KiB (tensor table + metadata); the cap stops a hostile or
# corrupted length field from making us allocate gigabytes before any other check.
MAX_HEADER_BYTES = 16 * 1024 * 1024

PathOrBytes = str | os.PathLike[str] | bytes | bytearray | memoryview
Kind = Literal["encoder", "decoder"]

_FINGERPRINT_DOMAIN = b"facemux.weights.v1\0"


# --------------------------------------------------------------------------- fingerprint


def fingerprint(module_or_state_dict: nn.Module | Mapping[str, Tensor]) -> str:
    """sha256 hex over (name, dtype, shape, raw bytes) of every tensor, sorted by name.

    Tensors are hashed as contiguous CPU copies, so device and memory format
    (channels_last) do not change the result; dtype does.
    """
    if isinstance(module_or_state_dict, nn.Module):
        state: Mapping[str, Tensor] = module_or_state_dict.state_dict()
    else:
        state = module_or_state_dict
    h = hashlib.sha256(_FINGERPRINT_DOMAIN)
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        head = json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)])
        raw = t.reshape(-1).view(torch.uint8).numpy()
        # Length-prefix both parts so no (name, data) split can collide with another.
        h.update(struct.pack("<Q", len(head)))
        h.update(head.encode())
        h.update(struct.pack("<Q", raw.nbytes))
        h.update(raw.data)
    return h.hexdigest()


# --------------------------------------------------------------------------- metadata


@dataclass
class EncoderMeta:
    config: ModelConfig
    fingerprint: str
    created: str  # ISO-8601 UTC
    summary: dict[str, Any] = field(default_factory=dict)
    # The mean face the training crops were aligned to, (68, 2) unit crop coordinates:
    # serving aligns frames to it (see facemux.models.faces.align).
    template: tuple[tuple[float, float], ...] = TEMPLATE_68

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "encoder",
            "config": self.config.to_dict(),
            "fingerprint": self.fingerprint,
            "created": self.created,
            "summary": self.summary,
            "template": [list(p) for p in self.template],
        }


@dataclass
class DecoderMeta:
    config: ModelConfig
    encoder_fingerprint: str
    identity: str
    created: str  # ISO-8601 UTC
    summary: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "decoder",
            "config": self.config.to_dict(),
            "encoder_fingerprint": self.encoder_fingerprint,
            "identity": self.identity,
            "created": self.created,
            "summary": self.summary,
            "fingerprint": self.fingerprint,
        }


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _is_hex_digest(value: object) -> TypeGuard[str]:
    return (
        isinstance(value, str)
        and len(value) == 64
        and all(ch in "0123456789abcdef" for ch in value)
    )


def _json_safe_summary(summary: Mapping[str, Any] | None) -> dict[str, Any]:
    if summary is None:
        return {}
    if not isinstance(summary, Mapping):
        raise InvalidInputError(f"summary must be a mapping, got {type(summary).__name__}")
    try:
        # Strict JSON (no NaN/Infinity): other services parse these headers too.
        return dict(json.loads(json.dumps(dict(summary), allow_nan=False)))
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"summary must be strict JSON (no NaN/inf): {exc}") from exc


def _encode_meta(payload: dict[str, Any]) -> dict[str, str]:
    body = {"format": FORMAT, "version": FORMAT_VERSION, **payload}
    return {METADATA_KEY: json.dumps(body, sort_keys=True, allow_nan=False)}


def _decode_meta(
    metadata: Mapping[str, str] | None, expected: Kind, source: str
) -> EncoderMeta | DecoderMeta:
    if not isinstance(metadata, Mapping) or METADATA_KEY not in metadata:
        raise CheckpointError(
            f"{source} has no facemux metadata: it is a safetensors file but not a facemux "
            f"{expected} checkpoint (save it with facemux.models.checkpoint.save_{expected})"
        )
    raw = metadata[METADATA_KEY]
    if not isinstance(raw, str):
        raise CheckpointError(f"{source}: facemux metadata is not a JSON string")
    body = safe_json.loads(raw, f"{source}: facemux metadata", error=CheckpointError)
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise CheckpointError(f"{source}: facemux metadata has no format {FORMAT!r} marker")
    version = body.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{source}: facemux metadata has no integer format version")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{source} uses checkpoint format version {version}; this facemux reads up to "
            f"version {FORMAT_VERSION} (upgrade facemux)"
        )
    kind = body.get("kind")
    if kind != expected:
        raise CheckpointError(
            f"{source} is {_article(kind)} checkpoint, expected {_article(expected)} checkpoint"
        )
    try:
        config = ModelConfig.from_dict(body.get("config"))
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    fp = body.get("fingerprint")
    if not _is_hex_digest(fp):
        raise CheckpointError(f"{source}: metadata fingerprint is not a sha256 hex digest")
    created = body.get("created")
    summary = body.get("summary", {})
    if not isinstance(created, str) or not isinstance(summary, dict):
        raise CheckpointError(f"{source}: metadata 'created' or 'summary' is malformed")
    if expected == "encoder":
        template = TEMPLATE_68
        if "template" in body:
            try:
                template = _template_tuple(body["template"], f"{source}: metadata template")
            except InvalidInputError as exc:
                raise CheckpointError(str(exc)) from None
        return EncoderMeta(
            config=config, fingerprint=fp, created=created, summary=summary, template=template
        )
    enc_fp = body.get("encoder_fingerprint")
    identity = body.get("identity")
    if not _is_hex_digest(enc_fp):
        raise CheckpointError(f"{source}: metadata encoder_fingerprint is not a sha256 hex digest")
    if not isinstance(identity, str) or not identity:
        raise CheckpointError(f"{source}: metadata has no identity name")
    return DecoderMeta(
        config=config,
        encoder_fingerprint=enc_fp,
        identity=identity,
        created=created,
        summary=summary,
        fingerprint=fp,
    )


def _template_tuple(value: Any, what: str) -> tuple[tuple[float, float], ...]:
    return tuple((float(x), float(y)) for x, y in as_template(value, what).tolist())


def _article(kind: object) -> str:
    if kind in ("encoder", "decoder"):
        return f"an {kind}" if kind == "encoder" else f"a {kind}"
    return f"a {kind!r}-kind"


# --------------------------------------------------------------------------- tensors


def _expected_shapes(kind: Kind, config: ModelConfig) -> dict[str, tuple[int, ...]]:
    # Built on the meta device: shapes without allocating or initialising any weights.
    with torch.device("meta"):
        module: nn.Module = Encoder(config) if kind == "encoder" else Decoder(config)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _check_tensors(
    tensors: Mapping[str, Tensor],
    kind: Kind,
    config: ModelConfig,
    source: str,
    error: type[InvalidInputError] = CheckpointError,
) -> None:
    """Raise on the first tensor that does not fit ``config``, naming it and both shapes."""
    expected = _expected_shapes(kind, config)
    for name in sorted(expected):
        want = expected[name]
        if name not in tensors:
            raise error(
                f"{source}: tensor {name!r} is missing (expected shape {list(want)} for "
                f"{kind} config {config.name!r})"
            )
        got = tuple(tensors[name].shape)
        if got != want:
            raise error(
                f"{source}: tensor {name!r} has shape {list(got)}, expected {list(want)} for "
                f"{kind} config {config.name!r}"
            )
        if not tensors[name].is_floating_point():
            raise error(
                f"{source}: tensor {name!r} has dtype {tensors[name].dtype}, expected a "
                "floating-point dtype"
            )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise error(
            f"{source}: unexpected tensor {extra[0]!r} with shape "
            f"{list(tensors[extra[0]].shape)} ({len(extra)} unexpected in all) for {kind} "
            f"config {config.name!r}"
        )


def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    # copy=True: a plain .to("cpu").contiguous() of a CPU parameter returns the parameter
    # itself, so training could change the tensors while they are being hashed/serialised.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------- reading


def _sniff(prefix: bytes, source: str) -> None:
    """Recognise common wrong formats so the error says what the file is."""
    if prefix.startswith(b"PK\x03\x04"):
        raise CheckpointError(
            f"{source} is a zip archive (a torch.save/pickle checkpoint?), not safetensors; "
            "facemux never unpickles checkpoints - convert it to safetensors"
        )
    if prefix[:1] == b"\x80" and prefix[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise CheckpointError(
            f"{source} is a Python pickle, not safetensors; facemux never unpickles "
            "checkpoints - convert it to safetensors"
        )


def _header_length(head: bytes, source: str) -> int:
    """The header length field of the first 8 bytes, checked to be plausible."""
    _sniff(head[:8], source)
    (n,) = struct.unpack("<Q", head[:8])
    if n < 2 or n > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{source} is not a safetensors file: header length field is {n} bytes "
            f"(must be 2..{MAX_HEADER_BYTES})"
        )
    return int(n)


def _parse_header(head: bytes, total: int, source: str) -> dict[str, Any]:
    """Validate the safetensors framing; ``head`` starts at byte 0, ``total`` is the size."""
    if total < 8 or len(head) < 8:
        raise CheckpointError(f"{source} is {total} bytes: too short to be a safetensors file")
    n = _header_length(head, source)
    if 8 + n > total:
        raise CheckpointError(
            f"{source} is truncated: the safetensors header needs {8 + n} bytes but there "
            f"are only {total}"
        )
    header, end = _header_table(head, n, source)
    data_len = total - 8 - n
    if end > data_len:
        raise CheckpointError(
            f"{source} is truncated: tensor data ends at byte {end} of the data section but "
            f"only {data_len} bytes are present"
        )
    return header


def expected_size(prefix: bytes, kind: Kind, source: str = "checkpoint") -> int | None:
    """The size a checkpoint must have, from its first bytes: for checking an upload as it
    arrives instead of after all of it. None while ``prefix`` is too short to tell (it
    needs 8 bytes, then the whole header); raises CheckpointError as soon as the bytes at
    hand show it is not a facemux ``kind`` checkpoint (not safetensors, an implausible
    header length, a header that is not JSON, no facemux metadata of that kind)."""
    if len(prefix) >= 2:
        _sniff(prefix[:8], source)
    if len(prefix) < 8:
        return None
    n = _header_length(prefix, source)
    if len(prefix) < 8 + n:
        return None
    header, end = _header_table(prefix, n, source)
    _decode_meta(header.get("__metadata__"), kind, source)
    return 8 + n + end


def _header_table(head: bytes, n: int, source: str) -> tuple[dict[str, Any], int]:
    """The parsed header (``n`` bytes after the length field) and where its data ends."""
    try:
        text = bytes(head[8 : 8 + n]).decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(
            f"{source} is not a safetensors file: its header is not JSON (not UTF-8)"
        ) from None
    header = safe_json.loads(
        text,
        f"{source} is not a safetensors file: its header",
        error=CheckpointError,
    )
    if not isinstance(header, dict):
        raise CheckpointError(f"{source} is not a safetensors file: header is not an object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets)
        ):
            raise CheckpointError(f"{source}: safetensors entry {name!r} has no valid offsets")
        end = max(end, offsets[1])
    return header, end


def _source(path_or_bytes: PathOrBytes) -> str:
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return f"checkpoint bytes ({len(path_or_bytes)} bytes)"
    return f"checkpoint {os.fspath(path_or_bytes)!r}"


def _header_from_bytes(data: bytes | bytearray | memoryview, source: str) -> dict[str, Any]:
    view = memoryview(data).cast("B")
    n = int.from_bytes(bytes(view[:8]), "little") if len(view) >= 8 else 0
    head = bytes(view[: 8 + min(n, MAX_HEADER_BYTES)])
    return _parse_header(head, len(view), source)


def _open_error(exc: OSError, source: str) -> Exception:
    if isinstance(exc, FileNotFoundError):
        return NotFoundError(f"{source} does not exist")
    if isinstance(exc, IsADirectoryError):
        return CheckpointError(f"{source} is a directory, not a checkpoint file")
    return CheckpointError(f"{source} cannot be read: {exc}")


def _read_header(path_or_bytes: PathOrBytes, source: str) -> dict[str, Any]:
    """Parse only the header; for a file, reads just its first bytes."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return _header_from_bytes(path_or_bytes, source)
    try:
        with open(os.fspath(path_or_bytes), "rb") as f:
            total = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            n = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
            head = prefix + (f.read(n) if 0 < n <= MAX_HEADER_BYTES else b"")
    except OSError as exc:
        raise _open_error(exc, source) from None
    return _parse_header(head, total, source)


def _snapshot(path_or_bytes: PathOrBytes, source: str) -> bytes:
    """The whole checkpoint as private bytes. Files are read, not memory-mapped: weights
    backed by a mapping would change under us if someone rewrote the file in place."""
    if isinstance(path_or_bytes, bytes):
        return path_or_bytes
    if isinstance(path_or_bytes, (bytearray, memoryview)):
        return bytes(path_or_bytes)
    # Reject a non-checkpoint (say a multi-GB video) from its first bytes before reading it.
    _read_header(path_or_bytes, source)
    try:
        with open(os.fspath(path_or_bytes), "rb") as f:
            return f.read()
    except OSError as exc:
        raise _open_error(exc, source) from None


def _read(path_or_bytes: PathOrBytes, kind: Kind) -> tuple[dict[str, Tensor], Any]:
    source = _source(path_or_bytes)
    data = _snapshot(path_or_bytes, source)
    header = _header_from_bytes(data, source)
    meta = _decode_meta(header.get("__metadata__"), kind, source)
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own error type and assorted others
        raise CheckpointError(f"{source} is not a valid safetensors file: {exc}") from None
    _check_tensors(tensors, kind, meta.config, source)
    got = fingerprint(tensors)
    if got != meta.fingerprint:
        raise CheckpointError(
            f"{source} is corrupted: its weights hash to {got[:16]} but the checkpoint "
            f"records {meta.fingerprint[:16]}"
        )
    return tensors, meta


def read_metadata(path_or_bytes: PathOrBytes) -> EncoderMeta | DecoderMeta:
    """Metadata only, from the header (no tensors read, weights not verified)."""
    source = _source(path_or_bytes)
    header = _read_header(path_or_bytes, source)
    raw = header.get("__metadata__")
    kind: Kind = "encoder"
    if isinstance(raw, dict) and isinstance(raw.get(METADATA_KEY), str):
        # Malformed metadata is reported by _decode_meta, whichever kind is assumed here.
        with contextlib.suppress(CheckpointError):
            body = safe_json.loads(raw[METADATA_KEY], source, error=CheckpointError)
            if isinstance(body, dict) and body.get("kind") == "decoder":
                kind = "decoder"
    return _decode_meta(raw, kind, source)


def read_encoder(path_or_bytes: PathOrBytes) -> tuple[dict[str, Tensor], EncoderMeta]:
    """Verified encoder weights (CPU) and metadata, without building the network."""
    tensors, meta = _read(path_or_bytes, "encoder")
    assert isinstance(meta, EncoderMeta)
    return tensors, meta


def read_decoder(path_or_bytes: PathOrBytes) -> tuple[dict[str, Tensor], DecoderMeta]:
    """Verified decoder weights (CPU) and metadata, without building the network."""
    tensors, meta = _read(path_or_bytes, "decoder")
    assert isinstance(meta, DecoderMeta)
    return tensors, meta


def _materialise(
    cls: type[Encoder] | type[Decoder],
    config: ModelConfig,
    tensors: Mapping[str, Tensor],
    device: torch.device | str,
) -> Any:
    with torch.device("meta"):
        module = cls(config)
    # assign=True adopts the loaded tensors instead of copying into freshly initialised
    # ones: no wasted init, no second copy of a 280 MB encoder.
    state = {k: (v.float() if v.dtype != torch.float32 else v) for k, v in tensors.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module.to(device).eval()


def load_encoder(
    path_or_bytes: PathOrBytes, device: torch.device | str = "cpu"
) -> tuple[Encoder, EncoderMeta]:
    tensors, meta = read_encoder(path_or_bytes)
    encoder: Encoder = _materialise(Encoder, meta.config, tensors, device)
    return encoder, meta


def load_decoder(
    path_or_bytes: PathOrBytes,
    device: torch.device | str = "cpu",
    expected_encoder_fingerprint: str | None = None,
) -> tuple[Decoder, DecoderMeta]:
    """Load a decoder; with ``expected_encoder_fingerprint`` refuse (FingerprintMismatchError)
    one trained against a different encoder, before building anything."""
    tensors, meta = read_decoder(path_or_bytes)
    if (
        expected_encoder_fingerprint is not None
        and meta.encoder_fingerprint != expected_encoder_fingerprint
    ):
        raise FingerprintMismatchError(
            f"decoder for identity {meta.identity!r}",
            expected_encoder_fingerprint,
            meta.encoder_fingerprint,
        )
    decoder: Decoder = _materialise(Decoder, meta.config, tensors, device)
    return decoder, meta


# --------------------------------------------------------------------------- writing


def _serialise_encoder(
    encoder: Encoder,
    config: ModelConfig,
    summary: Mapping[str, Any] | None,
    template: Any = None,
) -> tuple[bytes, EncoderMeta]:
    state = _cpu_state(encoder)
    _check_tensors(state, "encoder", config, "encoder to save", error=InvalidInputError)
    meta = EncoderMeta(
        config=config,
        fingerprint=fingerprint(state),
        created=_now(),
        summary=_json_safe_summary(summary),
        template=TEMPLATE_68 if template is None else _template_tuple(template, "template"),
    )
    payload = meta.to_dict()
    return safetensors.torch.save(state, metadata=_encode_meta(payload)), meta


def _serialise_decoder(
    decoder: Decoder,
    config: ModelConfig,
    encoder_fingerprint: str,
    identity: str,
    summary: Mapping[str, Any] | None,
) -> tuple[bytes, DecoderMeta]:
    if not _is_hex_digest(encoder_fingerprint):
        raise InvalidInputError(
            "encoder_fingerprint must be the sha256 hex digest from fingerprint(encoder)"
        )
    if not isinstance(identity, str) or not identity:
        raise InvalidInputError("identity must be a non-empty string")
    state = _cpu_state(decoder)
    _check_tensors(state, "decoder", config, "decoder to save", error=InvalidInputError)
    meta = DecoderMeta(
        config=config,
        encoder_fingerprint=encoder_fingerprint,
        identity=identity,
        created=_now(),
        summary=_json_safe_summary(summary),
        fingerprint=fingerprint(state),
    )
    return safetensors.torch.save(state, metadata=_encode_meta(meta.to_dict())), meta


def encoder_to_bytes(
    encoder: Encoder,
    config: ModelConfig,
    summary: Mapping[str, Any] | None = None,
    template: Any = None,
) -> tuple[bytes, EncoderMeta]:
    """The checkpoint file's bytes (for uploads) and its metadata. ``template``: the (68, 2)
    mean face the training crops were aligned to; None, the default they all use today."""
    return _serialise_encoder(encoder, config, summary, template)


def decoder_to_bytes(
    decoder: Decoder,
    config: ModelConfig,
    encoder_fingerprint: str,
    identity: str,
    summary: Mapping[str, Any] | None = None,
) -> tuple[bytes, DecoderMeta]:
    return _serialise_decoder(decoder, config, encoder_fingerprint, identity, summary)


def save_encoder(
    path: str | os.PathLike[str],
    encoder: Encoder,
    config: ModelConfig,
    summary: Mapping[str, Any] | None = None,
    template: Any = None,
) -> EncoderMeta:
    data, meta = _serialise_encoder(encoder, config, summary, template)
    atomic_write(Path(path), data)
    return meta


def save_decoder(
    path: str | os.PathLike[str],
    decoder: Decoder,
    config: ModelConfig,
    encoder_fingerprint: str,
    identity: str,
    summary: Mapping[str, Any] | None = None,
) -> DecoderMeta:
    data, meta = _serialise_decoder(decoder, config, encoder_fingerprint, identity, summary)
    atomic_write(Path(path), data)
    return meta


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Readers see the old file or the new one, never a partial write, even on power loss:
    temp file in the same directory (same filesystem, so rename is atomic), fsync, rename,
    fsync the directory so the rename itself is durable. `mode` 0o600 for secrets."""
    directory = path.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except FileNotFoundError:
        raise NotFoundError(f"directory {os.fspath(directory)!r} does not exist") from None
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                # mkstemp makes 0600; checkpoints are meant to be read by other processes.
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_directory(directory)


def fsync_directory(directory: Path) -> None:
    if os.name != "posix":
        return
    # Some filesystems refuse to fsync a directory; the data itself is already durable.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
