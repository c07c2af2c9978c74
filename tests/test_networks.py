"""Model configs, presets and the encoder/decoder networks."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from facemux.models.config import PRESETS, ModelConfig, get_preset
from facemux.models.errors import CheckpointError, InvalidInputError
from facemux.models.networks import (
    Decoder,
    Encoder,
    build_decoder,
    build_encoder,
    count_parameters,
)

# Exact counts of the presets as built; original64 matches faceswap's "original" model
# (about 69.7 M encoder, 6.2 M decoder).
EXPECTED_COUNTS = {
    "original64": (69_662_976, 6_199_747),
    "df128": (25_836_416, 19_136_000),
    "tiny": (695_552, 230_012),
}


@pytest.fixture(scope="module")
def tiny() -> ModelConfig:
    return get_preset("tiny")


# ------------------------------------------------------------------ config


def test_presets_are_listed_and_consistent() -> None:
    assert set(PRESETS) == {"original64", "df128", "tiny"}
    assert get_preset("original64").latent_shape == (512, 8, 8)
    assert get_preset("df128").latent_shape == (256, 16, 16)
    assert get_preset("tiny").resolution == 64
    assert not get_preset("original64").mask_head
    assert get_preset("df128").mask_head


def test_unknown_preset_lists_valid_names() -> None:
    with pytest.raises(InvalidInputError) as err:
        get_preset("nope")
    for name in PRESETS:
        assert name in str(err.value)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_json_round_trip(name: str) -> None:
    cfg = get_preset(name)
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ("not a dict", "JSON object"),
        ({"name": "x"}, "missing field"),
        ({**get_preset("tiny").to_dict(), "extra": 1}, "unknown field"),
        ({**get_preset("tiny").to_dict(), "resolution": "64"}, "'resolution' must be an integer"),
        ({**get_preset("tiny").to_dict(), "resolution": True}, "'resolution' must be an integer"),
        ({**get_preset("tiny").to_dict(), "encoder_dims": [16, "a"]}, "list of integers"),
        ({**get_preset("tiny").to_dict(), "decoder_dims": [48, 32]}, "upscales"),
        ({**get_preset("tiny").to_dict(), "mask_dims": [8]}, "mask_dims"),
        ({**get_preset("tiny").to_dict(), "out_kernel": 4}, "odd"),
        ({**get_preset("tiny").to_dict(), "latent_channels": -3}, "positive"),
    ],
)
def test_config_from_dict_rejects_garbage(data: object, fragment: str) -> None:
    with pytest.raises(CheckpointError) as err:
        ModelConfig.from_dict(data)
    assert fragment in str(err.value)


def test_direct_construction_validates(tiny: ModelConfig) -> None:
    with pytest.raises(InvalidInputError, match="divisible"):
        replace(tiny, resolution=60)


# ------------------------------------------------------------------ networks


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts_and_shapes(name: str) -> None:
    cfg = get_preset(name)
    enc, dec = build_encoder(cfg), build_decoder(cfg)
    assert (count_parameters(enc), count_parameters(dec)) == EXPECTED_COUNTS[name]
    x = torch.rand(1, 3, cfg.resolution, cfg.resolution)
    with torch.no_grad():
        z = enc(x)
        rgb, mask = dec(z)
    assert tuple(z.shape) == (1, *cfg.latent_shape)
    assert tuple(rgb.shape) == (1, 3, cfg.resolution, cfg.resolution)
    if cfg.mask_head:
        assert mask is not None
        assert tuple(mask.shape) == (1, 1, cfg.resolution, cfg.resolution)
    else:
        assert mask is None


def test_tiny_is_under_a_million_parameters(tiny: ModelConfig) -> None:
    total = count_parameters(build_encoder(tiny)) + count_parameters(build_decoder(tiny))
    assert total < 1_000_000


def test_tiny_forward_batch_ranges(tiny: ModelConfig) -> None:
    enc, dec = build_encoder(tiny, seed=0), build_decoder(tiny, seed=1)
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        rgb, mask = dec(enc(x))
    assert rgb.shape == (4, 3, 64, 64)
    assert mask is not None and mask.shape == (4, 1, 64, 64)
    for t in (rgb, mask):
        assert torch.isfinite(t).all()
        assert t.min() >= 0 and t.max() <= 1


def test_seeded_build_is_reproducible_and_leaves_global_rng(tiny: ModelConfig) -> None:
    before = torch.random.get_rng_state()
    a, b = build_encoder(tiny, seed=7), build_encoder(tiny, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    c = build_encoder(tiny, seed=8)
    assert not torch.equal(a.dense1.weight, c.dense1.weight)


def test_upscale_starts_as_nearest_neighbour(tiny: ModelConfig) -> None:
    # ICNR init: the 4 sub-pixels of each PixelShuffle block start with equal weights.
    dec = build_decoder(tiny, seed=0)
    w = dec.stages[0][0].conv.weight
    groups = w.view(-1, 4, *w.shape[1:])
    assert torch.equal(groups, groups[:, :1].expand_as(groups))


def test_channels_last_gives_same_outputs(tiny: ModelConfig) -> None:
    enc, dec = build_encoder(tiny, seed=0), build_decoder(tiny, seed=1)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref_rgb, ref_mask = dec(enc(x))
        enc_cl = enc.to(memory_format=torch.channels_last)
        dec_cl = dec.to(memory_format=torch.channels_last)
        z = enc_cl(x.contiguous(memory_format=torch.channels_last))
        rgb, mask = dec_cl(z)
    assert torch.allclose(rgb, ref_rgb, atol=1e-5)
    assert mask is not None and ref_mask is not None
    assert torch.allclose(mask, ref_mask, atol=1e-5)


def test_count_parameters_trainable_only(tiny: ModelConfig) -> None:
    dec = build_decoder(tiny)
    dec.rgb.requires_grad_(False)
    frozen = sum(p.numel() for p in dec.rgb.parameters())
    assert count_parameters(dec, trainable_only=True) == count_parameters(dec) - frozen


def test_modules_expose_their_config(tiny: ModelConfig) -> None:
    assert isinstance(build_encoder(tiny), Encoder) and build_encoder(tiny).config == tiny
    assert isinstance(build_decoder(tiny), Decoder) and build_decoder(tiny).config == tiny


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_channels_last_on_cuda(tiny: ModelConfig) -> None:
    enc = build_encoder(tiny, seed=0).cuda().to(memory_format=torch.channels_last)
    dec = build_decoder(tiny, seed=1).cuda().to(memory_format=torch.channels_last)
    x = torch.rand(4, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        rgb, mask = dec(enc(x))
    assert rgb.shape == (4, 3, 64, 64) and mask is not None
    rgb.float().mean().backward()
    assert all(p.grad is not None for p in enc.parameters())
