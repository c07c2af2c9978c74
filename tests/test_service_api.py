"""Encode / Decode / Swap on aligned faces through the real server and client."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from common import Models, decode_png, face_image, png
from facemux.client import FacemuxClient, Latent
from facemux.models import checkpoint, inference
from facemux.service.server import ServerThread


def test_model_info(client: FacemuxClient, models: Models) -> None:
    info = client.model_info()
    assert info.encoder_fingerprint == models.fingerprint
    assert info.preset == "tiny"
    assert info.resolution == models.config.resolution
    assert list(info.latent_shape) == list(models.config.latent_shape)
    assert info.device == "cpu"


@pytest.mark.unmarked_outputs
def test_swap_matches_the_model_run_in_process(client: FacemuxClient, models: Models) -> None:
    faces = [face_image(i) for i in range(3)]
    res = client.swap_faces([png(f) for f in faces], "bob")
    assert res.faces_swapped == 3 and res.identity == "bob" and res.identity_version == 1
    assert res.notes == []  # 64 px crops need no resize
    got = np.stack([decode_png(f) for f in res.faces])

    enc, _ = checkpoint.load_encoder(models.encoder_bytes)
    dec, _ = checkpoint.load_decoder(models.decoders["bob"])
    x, _ = inference.faces_to_tensor(faces, 64, torch.device("cpu"))
    rgb, _ = inference.decode(dec.eval(), inference.encode(enc.eval(), x))
    want = inference.tensor_to_images(rgb)
    # PNG is lossless: the only difference allowed is none.
    assert np.array_equal(got, want)


@pytest.mark.unmarked_outputs
def test_encode_then_decode_equals_swap(client: FacemuxClient, models: Models) -> None:
    faces = [png(face_image(i)) for i in range(2)]
    latents = client.encode(faces)
    assert [lat.array.shape for lat in latents] == [models.config.latent_shape] * 2
    assert all(lat.encoder_fingerprint == models.fingerprint for lat in latents)
    decoded = client.decode(latents, "alice", return_masks=True)
    swapped = client.swap_faces(faces, "alice", return_masks=True)
    assert decoded.faces == swapped.faces
    assert len(decoded.masks) == 2 and decoded.masks == swapped.masks
    mask = decode_png(decoded.masks[0])
    assert mask.shape == (64, 64)


def test_float16_latents_round_trip(client: FacemuxClient) -> None:
    face = png(face_image(7))
    f32 = client.encode([face])[0]
    f16 = client.encode([face], dtype="float16")[0]
    assert f16.array.dtype == np.float16
    np.testing.assert_allclose(f16.array.astype(np.float32), f32.array, rtol=1e-2, atol=1e-2)
    out = client.decode([f16], "alice")
    assert len(out.faces) == 1


def test_any_size_and_layout_is_resized_and_reported(client: FacemuxClient) -> None:
    big = face_image(3, size=150)
    gray = big[:, :, 0].copy()
    rgba = np.dstack([big, np.full(big.shape[:2], 200, np.uint8)])
    res = client.swap_faces([big, gray, rgba, png(face_image(4))], "alice", output_format="jpeg")
    assert res.faces_swapped == 4
    flags = [r.resized for r in res.response.results]
    assert flags == [True, True, True, False]
    assert res.response.results[0].input_width == 150
    assert any("3 of 4 crops were resized" in n for n in res.notes)
    assert all(f[:3] == b"\xff\xd8\xff" for f in res.faces)  # JPEG as asked


def test_raw_output(client: FacemuxClient) -> None:
    res = client.swap_faces([face_image(1)], "bob", output_format="raw")
    img = res.response.faces[0].raw
    assert (img.width, img.height) == (64, 64)
    assert len(img.data) == 64 * 64 * 3


@pytest.mark.unmarked_outputs
def test_swap_stream_of_aligned_crops_keeps_order(client: FacemuxClient) -> None:
    frames = [png(face_image(i)) for i in range(5)]
    frames.insert(2, b"not an image")
    out = list(client.swap_stream(frames, "bob", aligned=True))
    assert [r.frame_index for r in out] == list(range(6))
    assert out[2].HasField("error") and out[2].error.code == 3  # INVALID_ARGUMENT
    assert "not JPEG, PNG or WebP" in out[2].error.message
    good = [r for i, r in enumerate(out) if i != 2]
    assert all(r.faces_swapped == 1 and r.frame.encoded for r in good)
    # The same crop through unary Swap gives the same pixels.
    assert good[0].frame.encoded == client.swap_faces([frames[0]], "bob").faces[0]


def test_latent_from_client_object(client: FacemuxClient, models: Models) -> None:
    arr = np.zeros(models.config.latent_shape, np.float32)
    out = client.decode([Latent(arr, models.fingerprint)], "alice")
    assert decode_png(out.faces[0]).shape == (64, 64, 3)


def test_server_is_reachable_by_a_second_client(server: ServerThread) -> None:
    with FacemuxClient(server.target) as c:
        c.wait_ready(30)
        assert c.health() == "SERVING"
        assert {i.name for i in c.list_identities()} == {"alice", "bob"}
