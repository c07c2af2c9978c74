"""The encoder shipped for the demo: it loads, its weights are the pinned ones, it has the
demo preset's architecture, it ships in the wheel, and a damaged or foreign file is refused.
The face-region SSIM the demo prints is scikit-image's."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from facemux.models import checkpoint, demo_encoder, synth
from facemux.models.config import get_preset
from facemux.models.errors import CheckpointError, FingerprintMismatchError, NotFoundError
from facemux.models.networks import build_encoder
from facemux.models.scores import face_scores, ssim_map
from skimage.metrics import structural_similarity

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]


def test_shipped_encoder_loads_with_the_pinned_fingerprint() -> None:
    encoder, data, fp = demo_encoder.load()
    assert fp == demo_encoder.FINGERPRINT
    assert checkpoint.fingerprint(encoder) == demo_encoder.FINGERPRINT
    # The demo builds its decoders from the tiny preset: the encoder must be exactly it.
    assert encoder.config == get_preset("tiny")
    meta = checkpoint.read_metadata(data)
    assert meta.summary["built_by"] == demo_encoder.BUILD_COMMAND
    assert demo_encoder.BUILD_COMMAND.startswith("python -m facemux.models.demo_encoder build ")
    # Pretrained, not fresh: its weights are not those of any seed's initialisation.
    assert meta.summary["steps"] > 0
    with torch.no_grad():
        z = encoder(torch.rand(2, 3, 64, 64))
    assert z.shape == (2, *get_preset("tiny").latent_shape) and torch.isfinite(z).all()


def test_check_command_accepts_the_shipped_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo_encoder.main(["check"]) == 0
    assert demo_encoder.FINGERPRINT in capsys.readouterr().out


def test_starter_decoder_fits_the_shipped_encoder() -> None:
    encoder, _, fp = demo_encoder.load()
    a, b = demo_encoder.starter_decoder(fp), demo_encoder.starter_decoder(fp)
    assert a.training and a.config == get_preset("tiny")
    # Two copies, not one module twice: training one must not move the other.
    with torch.no_grad():
        next(a.parameters()).add_(1.0)
    assert checkpoint.fingerprint(a) != checkpoint.fingerprint(b)
    with torch.no_grad():
        rgb, mask = b.eval()(encoder(torch.rand(1, 3, 64, 64)))
    assert rgb.shape == (1, 3, 64, 64) and mask.shape == (1, 1, 64, 64)
    with pytest.raises(FingerprintMismatchError):
        demo_encoder.starter_decoder("0" * 64)


def test_a_damaged_asset_is_refused(tmp_path: Path) -> None:
    raw = bytearray(demo_encoder.ASSET.read_bytes())
    raw[-1] ^= 0x01  # one bit of the last tensor's data
    bad = tmp_path / "damaged.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupted"):
        demo_encoder.read(bad)


def test_another_encoder_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.safetensors"
    cfg = get_preset("tiny")
    checkpoint.save_encoder(other, build_encoder(cfg, seed=3), cfg)
    with pytest.raises(FingerprintMismatchError):
        demo_encoder.read(other)


def test_a_missing_asset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="missing from this install"):
        demo_encoder.read(tmp_path / "absent.safetensors")


def test_the_wheel_carries_the_asset() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["facemux.models"]
    for asset in (demo_encoder.ASSET, demo_encoder.STARTER_DECODER):
        rel = asset.relative_to(REPO / "models")
        assert any(rel.match(p) for p in patterns), (rel, patterns)


def test_face_ssim_is_scikit_images() -> None:
    a_person, b_person = synth.identity_from_seed(5), synth.identity_from_seed(4)
    state = synth.make_states(1, seed=3)[0]
    truth = synth.render(b_person, state, 64)
    for pred in (synth.render(a_person, state, 64).image, truth.image[:, ::-1].copy()):
        _, full = structural_similarity(
            truth.image, pred, channel_axis=2, data_range=255, full=True, win_size=7
        )
        np.testing.assert_allclose(ssim_map(pred, truth.image), full.mean(axis=2), atol=1e-9)
        ssim, psnr = face_scores(pred, truth.image, truth.mask)
        inside = truth.mask > 127
        assert ssim == pytest.approx(float(full.mean(axis=2)[inside].mean()), abs=1e-9)
        mse = np.mean((pred[inside].astype(float) - truth.image[inside]) ** 2)
        assert psnr == pytest.approx(10 * np.log10(255**2 / mse))
    assert face_scores(truth.image, truth.image, truth.mask)[0] == pytest.approx(1.0)
