"""safetensors checkpoints: round trips, fingerprints, atomic writes and every refusal."""

from __future__ import annotations

import io
import json
import os
import struct
import time
from dataclasses import replace
from pathlib import Path

import pytest
import safetensors.torch
import torch
from facemux.models import checkpoint as ckpt
from facemux.models.config import ModelConfig, get_preset
from facemux.models.errors import (
    CheckpointError,
    FingerprintMismatchError,
    InvalidInputError,
    NotFoundError,
)
from facemux.models.networks import Decoder, Encoder, build_decoder, build_encoder


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return get_preset("tiny")


@pytest.fixture(scope="module")
def encoder(cfg: ModelConfig) -> Encoder:
    return build_encoder(cfg, seed=0)


@pytest.fixture(scope="module")
def decoder(cfg: ModelConfig) -> Decoder:
    return build_decoder(cfg, seed=1)


@pytest.fixture(scope="module")
def enc_fp(encoder: Encoder) -> str:
    return ckpt.fingerprint(encoder)


@pytest.fixture(scope="module")
def decoder_bytes(decoder: Decoder, cfg: ModelConfig, enc_fp: str) -> bytes:
    data, _ = ckpt.decoder_to_bytes(decoder, cfg, enc_fp, "alice", {"steps": 3})
    return data


@pytest.fixture(scope="module")
def encoder_bytes(encoder: Encoder, cfg: ModelConfig) -> bytes:
    data, _ = ckpt.encoder_to_bytes(encoder, cfg)
    return data


def _facemux_meta(data: bytes) -> dict[str, object]:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    return dict(json.loads(header["__metadata__"][ckpt.METADATA_KEY]))


def _forge(tensors: dict[str, torch.Tensor], body: dict[str, object] | None) -> bytes:
    """A safetensors file with arbitrary tensors and facemux metadata."""
    meta = None if body is None else {ckpt.METADATA_KEY: json.dumps(body)}
    return safetensors.torch.save(tensors, metadata=meta)


# ------------------------------------------------------------------ fingerprint


def test_fingerprint_is_stable_and_sensitive(encoder: Encoder, cfg: ModelConfig) -> None:
    fp = ckpt.fingerprint(encoder)
    assert len(fp) == 64 and fp == ckpt.fingerprint(encoder.state_dict())
    twin = build_encoder(cfg, seed=0)
    assert ckpt.fingerprint(twin) == fp
    # Memory format is not part of the weights.
    twin.to(memory_format=torch.channels_last)
    assert ckpt.fingerprint(twin) == fp
    with torch.no_grad():
        twin.down[0].conv.weight[0, 0, 0, 0] += 1e-3
    assert ckpt.fingerprint(twin) != fp


def test_fingerprint_depends_on_dtype_and_names(encoder: Encoder) -> None:
    state = encoder.state_dict()
    assert ckpt.fingerprint({k: v.double() for k, v in state.items()}) != ckpt.fingerprint(state)
    renamed = {("x" + k): v for k, v in state.items()}
    assert ckpt.fingerprint(renamed) != ckpt.fingerprint(state)


# ------------------------------------------------------------------ round trips


def test_encoder_round_trip_is_bit_identical(
    tmp_path: Path, encoder: Encoder, cfg: ModelConfig
) -> None:
    path = tmp_path / "enc.safetensors"
    meta = ckpt.save_encoder(path, encoder, cfg, summary={"note": "hi", "steps": 10})
    assert meta.fingerprint == ckpt.fingerprint(encoder)
    assert meta.created.endswith("Z") and "T" in meta.created
    loaded, meta2 = ckpt.load_encoder(path)
    assert meta2.fingerprint == meta.fingerprint and meta2.config == cfg
    assert meta2.summary == {"note": "hi", "steps": 10}
    assert ckpt.fingerprint(loaded) == meta.fingerprint
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(encoder(x), loaded(x))


def test_decoder_round_trip_from_bytes_is_bit_identical(
    decoder: Decoder, decoder_bytes: bytes, enc_fp: str, cfg: ModelConfig
) -> None:
    loaded, meta = ckpt.load_decoder(decoder_bytes, expected_encoder_fingerprint=enc_fp)
    assert meta.identity == "alice" and meta.encoder_fingerprint == enc_fp
    assert meta.fingerprint == ckpt.fingerprint(decoder) == ckpt.fingerprint(loaded)
    assert meta.summary == {"steps": 3} and meta.config == cfg
    z = torch.randn(2, *cfg.latent_shape)
    with torch.no_grad():
        rgb, mask = decoder(z)
        rgb2, mask2 = loaded(z)
    assert torch.equal(rgb, rgb2)
    assert mask is not None and mask2 is not None and torch.equal(mask, mask2)


def test_bytes_and_file_are_the_same_format(
    tmp_path: Path, decoder: Decoder, cfg: ModelConfig, enc_fp: str
) -> None:
    path = tmp_path / "dec.safetensors"
    meta = ckpt.save_decoder(path, decoder, cfg, enc_fp, "alice")
    tensors, meta2 = ckpt.read_decoder(path.read_bytes())
    assert meta2.fingerprint == meta.fingerprint
    assert ckpt.fingerprint(tensors) == meta.fingerprint
    tensors3, _ = ckpt.read_decoder(memoryview(path.read_bytes()))
    assert ckpt.fingerprint(tensors3) == meta.fingerprint
    # Plain safetensors readers see ordinary tensors.
    assert set(safetensors.torch.load_file(path)) == set(decoder.state_dict())


def test_read_metadata_without_tensors(decoder_bytes: bytes, encoder_bytes: bytes) -> None:
    dmeta = ckpt.read_metadata(decoder_bytes)
    emeta = ckpt.read_metadata(encoder_bytes)
    assert isinstance(dmeta, ckpt.DecoderMeta) and dmeta.identity == "alice"
    assert isinstance(emeta, ckpt.EncoderMeta)


def test_metadata_layout(decoder_bytes: bytes, enc_fp: str) -> None:
    body = _facemux_meta(decoder_bytes)
    assert body["kind"] == "decoder"
    assert body["format"] == ckpt.FORMAT and body["version"] == ckpt.FORMAT_VERSION
    assert body["encoder_fingerprint"] == enc_fp


def test_encoder_carries_its_face_template(encoder: Encoder, cfg: ModelConfig) -> None:
    """The mean face the training crops were aligned to travels with the encoder; a
    checkpoint from before templates were stored reads as the default one."""
    import numpy as np
    from facemux.models.face_template import TEMPLATE_68

    default = ckpt.load_encoder(ckpt.encoder_to_bytes(encoder, cfg)[0])[1]
    assert np.array_equal(default.template, TEMPLATE_68)
    own = np.asarray(TEMPLATE_68) * 0.9 + 0.05  # a face framed 10 % smaller
    data, _ = ckpt.encoder_to_bytes(encoder, cfg, template=own)
    assert np.array_equal(np.asarray(_facemux_meta(data)["template"], dtype=float), own)
    assert np.array_equal(ckpt.load_encoder(data)[1].template, own)
    assert np.array_equal(ckpt.read_metadata(data).template, own)

    body = _facemux_meta(data)
    del body["template"]
    old = _forge(ckpt._cpu_state(encoder), body)
    assert np.array_equal(ckpt.load_encoder(old)[1].template, TEMPLATE_68)
    for bad in ([[0.5, 0.5]] * 68, [[0.1, 0.2]] * 5, "face", [[float("nan"), 0.5]] * 68):
        with pytest.raises(CheckpointError, match="template"):
            ckpt.load_encoder(_forge(ckpt._cpu_state(encoder), {**body, "template": bad}))
    with pytest.raises(InvalidInputError, match="template"):
        ckpt.encoder_to_bytes(encoder, cfg, template=np.zeros((68, 2)))


def test_load_to_device_string(encoder_bytes: bytes) -> None:
    enc, _ = ckpt.load_encoder(encoder_bytes, device=torch.device("cpu"))
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in enc.parameters())


# ------------------------------------------------------------------ atomic writes


def test_atomic_save_leaves_no_temp_files(
    tmp_path: Path, encoder: Encoder, decoder: Decoder, cfg: ModelConfig, enc_fp: str
) -> None:
    path = tmp_path / "enc.safetensors"
    ckpt.save_encoder(path, encoder, cfg)
    ckpt.save_encoder(path, encoder, cfg)  # overwrite in place
    ckpt.save_decoder(tmp_path / "dec.safetensors", decoder, cfg, enc_fp, "bob")
    assert sorted(os.listdir(tmp_path)) == ["dec.safetensors", "enc.safetensors"]


def test_failed_save_leaves_old_file_and_no_temp(
    tmp_path: Path, encoder: Encoder, cfg: ModelConfig
) -> None:
    path = tmp_path / "enc.safetensors"
    ckpt.save_encoder(path, encoder, cfg)
    before = path.read_bytes()
    with pytest.raises(InvalidInputError, match="strict JSON"):
        ckpt.save_encoder(path, encoder, cfg, summary={"loss": float("nan")})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["enc.safetensors"]


def test_save_into_missing_directory(tmp_path: Path, encoder: Encoder, cfg: ModelConfig) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        ckpt.save_encoder(tmp_path / "no" / "enc.safetensors", encoder, cfg)


def test_save_refuses_config_that_does_not_match_module(
    tmp_path: Path, encoder: Encoder, cfg: ModelConfig
) -> None:
    other = replace(cfg, name="wide", bottleneck_dims=64)
    with pytest.raises(InvalidInputError, match=r"dense1\.bias.*\[128\].*\[64\]"):
        ckpt.save_encoder(tmp_path / "e.safetensors", encoder, other)
    assert not list(tmp_path.iterdir())


def test_save_decoder_validates_arguments(decoder: Decoder, cfg: ModelConfig, enc_fp: str) -> None:
    with pytest.raises(InvalidInputError, match="encoder_fingerprint"):
        ckpt.decoder_to_bytes(decoder, cfg, "abc", "alice")
    with pytest.raises(InvalidInputError, match="identity"):
        ckpt.decoder_to_bytes(decoder, cfg, enc_fp, "")


# ------------------------------------------------------------------ refusals


def test_truncated_file(tmp_path: Path, decoder_bytes: bytes) -> None:
    for cut in (4, 100, len(decoder_bytes) // 2, len(decoder_bytes) - 1):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(decoder_bytes[:cut])
        with pytest.raises(CheckpointError, match=r"truncated|too short"):
            ckpt.load_decoder(path)
        with pytest.raises(CheckpointError, match=r"truncated|too short"):
            ckpt.load_decoder(decoder_bytes[:cut])


def test_random_bytes() -> None:
    garbage = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
    data = bytes(garbage.to(torch.uint8).tolist())
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        ckpt.load_decoder(data)
    with pytest.raises(CheckpointError, match="too short"):
        ckpt.load_decoder(b"")


def test_absurd_header_size_is_refused_before_reading() -> None:
    data = struct.pack("<Q", 2**40) + b"{}"
    with pytest.raises(CheckpointError, match="header length"):
        ckpt.load_encoder(data)


def test_header_that_is_not_json() -> None:
    data = struct.pack("<Q", 4) + b"\xff\xfe{{"
    with pytest.raises(CheckpointError, match="not JSON"):
        ckpt.load_encoder(data)


def test_torch_save_pickle_is_refused(tmp_path: Path, decoder: Decoder) -> None:
    path = tmp_path / "dec.pt"
    torch.save(decoder.state_dict(), path)
    with pytest.raises(CheckpointError, match="pickle"):
        ckpt.load_decoder(path)
    buf = io.BytesIO()
    torch.save(decoder.state_dict(), buf, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="pickle"):
        ckpt.load_decoder(buf.getvalue())


def test_encoder_given_as_decoder(encoder_bytes: bytes, decoder_bytes: bytes) -> None:
    with pytest.raises(CheckpointError, match="is an encoder checkpoint, expected a decoder"):
        ckpt.load_decoder(encoder_bytes)
    with pytest.raises(CheckpointError, match="is a decoder checkpoint, expected an encoder"):
        ckpt.load_encoder(decoder_bytes)


def test_plain_safetensors_without_metadata(decoder: Decoder) -> None:
    data = _forge({k: v.contiguous() for k, v in decoder.state_dict().items()}, None)
    with pytest.raises(CheckpointError, match="no facemux metadata"):
        ckpt.load_decoder(data)


def test_newer_format_version(decoder_bytes: bytes, decoder: Decoder) -> None:
    body = {**_facemux_meta(decoder_bytes), "version": ckpt.FORMAT_VERSION + 1}
    data = _forge({k: v.contiguous() for k, v in decoder.state_dict().items()}, body)
    with pytest.raises(CheckpointError, match="upgrade facemux"):
        ckpt.load_decoder(data)


def test_garbage_config_in_metadata(decoder_bytes: bytes, decoder: Decoder) -> None:
    body = _facemux_meta(decoder_bytes)
    body["config"] = {**body["config"], "resolution": "big"}  # type: ignore[dict-item]
    data = _forge({k: v.contiguous() for k, v in decoder.state_dict().items()}, body)
    with pytest.raises(CheckpointError, match="'resolution' must be an integer"):
        ckpt.load_decoder(data)


def test_tensor_shapes_from_another_config(decoder_bytes: bytes, cfg: ModelConfig) -> None:
    # Weights of a wider decoder under metadata that claims the tiny preset.
    wide = build_decoder(replace(cfg, decoder_dims=(64, 32, 16)), seed=0)
    tensors = {k: v.contiguous() for k, v in wide.state_dict().items()}
    body = {**_facemux_meta(decoder_bytes), "fingerprint": ckpt.fingerprint(tensors)}
    with pytest.raises(CheckpointError) as err:
        ckpt.load_decoder(_forge(tensors, body))
    msg = str(err.value)
    assert "'stages.0.0.conv.bias'" in msg
    assert "[256]" in msg and "[192]" in msg  # got vs expected


def test_preset_mismatch_is_reported(decoder_bytes: bytes) -> None:
    # A tiny decoder file whose metadata says df128: the first tensor names differ.
    tensors, _ = ckpt.read_decoder(decoder_bytes)
    body = {**_facemux_meta(decoder_bytes), "config": get_preset("df128").to_dict()}
    with pytest.raises(CheckpointError) as err:
        ckpt.load_decoder(_forge(dict(tensors), body))
    assert "tensor '" in str(err.value) and "'df128'" in str(err.value)


def test_missing_and_extra_tensors(decoder_bytes: bytes) -> None:
    tensors, _ = ckpt.read_decoder(decoder_bytes)
    body = _facemux_meta(decoder_bytes)
    missing = dict(tensors)
    del missing["rgb.weight"]
    with pytest.raises(CheckpointError, match=r"'rgb\.weight' is missing"):
        ckpt.load_decoder(_forge(missing, body))
    extra = {**tensors, "zzz": torch.zeros(2)}
    with pytest.raises(CheckpointError, match="unexpected tensor 'zzz'"):
        ckpt.load_decoder(_forge(extra, body))


def test_corrupted_weights_fail_fingerprint(decoder_bytes: bytes) -> None:
    data = bytearray(decoder_bytes)
    data[-5] ^= 0xFF  # flip bits inside the last tensor's data
    with pytest.raises(CheckpointError, match="corrupted"):
        ckpt.load_decoder(bytes(data))


def test_fingerprint_mismatch(decoder_bytes: bytes, enc_fp: str) -> None:
    other = "0" * 64
    with pytest.raises(FingerprintMismatchError) as err:
        ckpt.load_decoder(decoder_bytes, expected_encoder_fingerprint=other)
    assert err.value.expected == other and err.value.got == enc_fp
    assert "alice" in str(err.value) and enc_fp[:16] in str(err.value)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        ckpt.load_encoder(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="directory"):
        ckpt.load_encoder(tmp_path)


@pytest.mark.parametrize(
    ("header", "words"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nests 100000 levels"),
        (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nests 50000 levels"),
        # Unterminated string of escaped quotes: a string scanner that retried from every
        # quote would take minutes here.
        (b'{"a": "' + b'\\"' * 50_000, "not JSON"),
        (b'{"__metadata__": {"facemux": "' + b"[" * 5_000 + b'"}}', "nests 5000 levels"),
        (b'{"__metadata__": "facemux"}', "no facemux metadata"),
    ],
    ids=["deep arrays", "deep objects", "escaped quotes", "deep metadata", "string metadata"],
)
def test_hostile_json_headers_are_refused_quickly(header: bytes, words: str) -> None:
    data = struct.pack("<Q", len(header)) + header
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=words):
        ckpt.read_metadata(data)
    assert time.perf_counter() - t0 < 1.0
