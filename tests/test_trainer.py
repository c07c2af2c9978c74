"""Augmentation, losses and the trainer, on the tiny preset and synthetic shapes."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from facemux.models import checkpoint, synth
from facemux.models.augment import (
    AugmentConfig,
    colour_cast,
    colour_jitter,
    make_training_pair,
    random_transform,
    random_warp,
)
from facemux.models.config import ModelConfig, get_preset
from facemux.models.errors import InvalidInputError, PreconditionError
from facemux.models.faces.mask import template_mask
from facemux.models.losses import (
    LossWeights,
    auto_ssim_window,
    identity_confusion,
    landmark_weight_map,
    psnr_from_mse,
    reconstruction_loss,
    ssim,
)
from facemux.models.networks import Decoder, Encoder, build_decoder, build_encoder
from facemux.models.pretrain import JobSpec, prepare_work_dir, read_events, run_job
from facemux.models.trainer import Progress, TrainConfig, Trainer, mean_latent


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _shapes(n: int, seed: int, colour: tuple[float, float, float], size: int = 64) -> torch.Tensor:
    """uint8 (N,size,size,3): a coloured ellipse ("face") on a soft gradient background."""
    g = _gen(seed)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        cx, cy = (torch.rand(2, generator=g) - 0.5) * 0.4
        rx, ry = 0.45 + torch.rand(2, generator=g) * 0.2
        inside = (((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1).float()
        bg = 0.3 + 0.2 * (xs + 1) / 2 + 0.1 * torch.rand(1, generator=g)
        eye = (((xs - cx) ** 2 + (ys - cy + 0.15) ** 2) < 0.01).float()
        img = torch.stack(
            [bg * (1 - inside) + (c * inside) * (1 - eye) for c in colour], dim=-1
        ).clamp(0, 1)
        out.append(img)
    return (torch.stack(out) * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return get_preset("tiny")


@pytest.fixture(scope="module")
def faces() -> dict[str, torch.Tensor]:
    return {"alice": _shapes(24, 1, (0.9, 0.6, 0.5)), "bob": _shapes(24, 2, (0.4, 0.5, 0.8))}


@pytest.fixture
def images() -> torch.Tensor:
    return _shapes(4, 3, (0.8, 0.7, 0.6)).permute(0, 3, 1, 2).float() / 255


# ------------------------------------------------------------------ augment


def test_warp_shape_range_determinism(images: torch.Tensor) -> None:
    a = random_warp(images, _gen(1))
    b = random_warp(images, _gen(1))
    c = random_warp(images, _gen(2))
    assert a.shape == images.shape and a.dtype == images.dtype
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # The warp actually moves pixels (edges of the ellipse shift).
    assert (a - images).abs().mean() > 0.003
    # ... and with zero displacement it is the identity.
    assert torch.allclose(random_warp(images, _gen(1), scale=0.0), images, atol=1e-5)


def test_transform_identity_and_flip(images: torch.Tensor) -> None:
    same, none = random_transform(images, _gen(), rotation=0, zoom=0, shift=0, flip=0)
    assert none is None
    assert torch.allclose(same, images, atol=1e-5)
    flipped, _ = random_transform(images, _gen(), rotation=0, zoom=0, shift=0, flip=1.0)
    assert torch.allclose(flipped, images.flip(-1), atol=1e-5)


def test_transform_moves_masks_with_images(images: torch.Tensor) -> None:
    masks = images[:, :1].clone()
    out, out_masks = random_transform(images, _gen(5), rotation=20, zoom=0.1, masks=masks)
    assert out_masks is not None and out_masks.shape == masks.shape
    assert torch.allclose(out_masks, out[:, :1], atol=1e-6)
    assert not torch.allclose(out, images, atol=1e-3)


def test_colour_jitter_range_and_determinism(images: torch.Tensor) -> None:
    a = colour_jitter(images, _gen(3), 0.2, 0.2, 0.2)
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, colour_jitter(images, _gen(3), 0.2, 0.2, 0.2))
    assert not torch.equal(a, images)


def test_training_pair(images: torch.Tensor) -> None:
    masks = (images[:, :1] > 0.5).float()
    pair = make_training_pair(images, _gen(4), AugmentConfig(), warp=True, masks=masks)
    again = make_training_pair(images, _gen(4), AugmentConfig(), warp=True, masks=masks)
    assert torch.equal(pair.inputs, again.inputs) and torch.equal(pair.targets, again.targets)
    assert pair.inputs.shape == pair.targets.shape == images.shape
    assert pair.masks is not None and pair.masks.shape == masks.shape
    assert not torch.equal(pair.inputs, pair.targets)  # input is warped, target is not
    for t in (pair.inputs, pair.targets, pair.masks):
        assert t.min() >= 0 and t.max() <= 1
    flat = make_training_pair(images, _gen(4), AugmentConfig(), warp=False)
    assert torch.equal(flat.inputs, flat.targets)


def test_input_colour_casts_the_input_only(images: torch.Tensor) -> None:
    plain = make_training_pair(images, _gen(4), AugmentConfig(), warp=False)
    cast = make_training_pair(images, _gen(4), AugmentConfig(input_colour=0.6), warp=False)
    # Same geometry and the same clean target; only the encoder's input changes colour.
    assert torch.equal(cast.targets, plain.targets)
    assert not torch.allclose(cast.inputs, plain.inputs, atol=0.02)
    assert cast.inputs.min() >= 0 and cast.inputs.max() <= 1


def test_colour_cast_is_one_gain_per_image_and_channel() -> None:
    # Dark enough that no gain (at most e^0.9) reaches the clamp at 1.
    dark = torch.rand(6, 3, 8, 8, generator=_gen(2)) * 0.3 + 0.05
    out = colour_cast(dark, _gen(3), 0.6)
    assert torch.equal(out, colour_cast(dark, _gen(3), 0.6))
    gain = out / dark
    per = gain.flatten(2)
    assert (per.amax(2) - per.amin(2)).max() < 1e-5  # a colour change, not a texture
    assert gain.min() >= math.exp(-0.9) - 1e-5 and gain.max() <= math.exp(0.9) + 1e-5
    assert (per[:, :, 0] - 1).abs().max() > 0.05
    with pytest.raises(InvalidInputError):
        AugmentConfig(input_colour=1.5)


def test_augment_rejects_bad_input() -> None:
    with pytest.raises(InvalidInputError):
        random_warp(torch.zeros(2, 64, 64, 3, dtype=torch.uint8), _gen())
    with pytest.raises(InvalidInputError):
        AugmentConfig(flip=2.0)


# ------------------------------------------------------------------ losses


def test_ssim_identity_and_noise(images: torch.Tensor) -> None:
    assert torch.allclose(ssim(images, images), torch.ones(4), atol=1e-5)
    g = _gen(0)
    scores = []
    for sigma in (0.02, 0.05, 0.1, 0.2):
        noisy = (images + sigma * torch.randn(images.shape, generator=g)).clamp(0, 1)
        scores.append(ssim(images, noisy).mean().item())
    assert all(a > b for a, b in itertools.pairwise(scores)), scores
    assert scores[0] < 1.0
    assert auto_ssim_window(64) == 5 and auto_ssim_window(128) == 11


def test_reconstruction_loss_terms(images: torch.Tensor) -> None:
    zero, parts = reconstruction_loss(images, images)
    assert zero.item() == pytest.approx(0, abs=1e-6)
    assert set(parts) == {"dssim", "mse", "total"}
    noisy = (images + 0.1 * torch.randn(images.shape, generator=_gen(1))).clamp(0, 1)
    total, parts = reconstruction_loss(noisy, images)
    assert parts["total"] == pytest.approx(10 * parts["dssim"] + 10 * parts["mse"], rel=1e-5)
    assert total.item() == pytest.approx(parts["total"], rel=1e-6)
    _, with_l1 = reconstruction_loss(noisy, images, terms=LossWeights(l1=1.0))
    assert with_l1["l1"] > 0
    assert with_l1["total"] == pytest.approx(parts["total"] + with_l1["l1"], rel=1e-5)
    assert psnr_from_mse(parts["mse"]) > 15


def test_masked_loss_ignores_background(images: torch.Tensor) -> None:
    mask = torch.zeros(4, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    spoiled = images.clone()
    spoiled[..., :8, :] = 0.0  # only outside the mask
    _, parts = reconstruction_loss(spoiled, images, mask=mask)
    assert parts["mse"] == pytest.approx(0, abs=1e-7)
    assert parts["dssim"] == pytest.approx(0, abs=1e-5)
    _, unmasked = reconstruction_loss(spoiled, images)
    assert unmasked["mse"] > 1e-3


def test_mask_head_term(images: torch.Tensor) -> None:
    target_mask = torch.ones(4, 1, 64, 64)
    _, parts = reconstruction_loss(
        images, images, pred_mask=torch.zeros(4, 1, 64, 64), target_mask=target_mask
    )
    assert parts["mask_mse"] == pytest.approx(1.0)
    assert parts["total"] == pytest.approx(10.0)


def test_emphasis_weights(images: torch.Tensor) -> None:
    pred = images.clone()
    pred[..., :32, :] = (pred[..., :32, :] + 0.2).clamp(0, 1)  # error in the top half only
    top = torch.ones(1, 1, 64, 64)
    top[..., :32, :] = 3.0
    bottom = torch.ones(1, 1, 64, 64)
    bottom[..., 32:, :] = 3.0
    _, up = reconstruction_loss(pred, images, weights=top)
    _, down = reconstruction_loss(pred, images, weights=bottom)
    assert up["mse"] > down["mse"] and up["dssim"] > down["dssim"]


def test_landmark_weight_map() -> None:
    lm = np.zeros((68, 2), dtype=np.float32)
    lm[:] = (32, 50)  # park unused points on the chin area
    lm[36:42] = [(16, 24), (19, 22), (23, 22), (26, 24), (23, 26), (19, 26)]
    lm[42:48] = lm[36:42] + np.array([22, 0])
    mouth = [(22, 46), (26, 44), (32, 43), (38, 44), (42, 46), (38, 50)]
    mouth += [(32, 51), (26, 50), (24, 47), (32, 46), (40, 47), (32, 49)]
    lm[48:60] = mouth
    w = landmark_weight_map(lm, 64)
    assert w.shape == (1, 1, 64, 64) and w.dtype == torch.float32
    assert w[0, 0, 24, 21] == 3.0 and w[0, 0, 24, 43] == 3.0  # eye centres (row, col)
    assert w[0, 0, 47, 32] == 2.0  # mouth
    assert w[0, 0, 5, 5] == 1.0  # forehead corner
    batched = landmark_weight_map(torch.from_numpy(np.stack([lm, lm])), 64)
    assert batched.shape == (2, 1, 64, 64) and torch.equal(batched[0], w[0])
    # Brows count only when asked for: thin arcs above the eyes, grown like the eyes.
    lm[17:22] = [(14, 17), (17, 15), (20, 14), (23, 15), (26, 17)]
    lm[22:27] = lm[17:22] + np.array([22, 0])
    assert landmark_weight_map(lm, 64)[0, 0, 15, 20] == 1.0
    browed = landmark_weight_map(lm, 64, brows=2.5)
    assert browed[0, 0, 15, 20] == 2.5 and browed[0, 0, 15, 42] == 2.5
    assert browed[0, 0, 24, 21] == 3.0 and browed[0, 0, 5, 5] == 1.0
    with pytest.raises(InvalidInputError):
        landmark_weight_map(np.zeros((5, 2)), 64)


# ------------------------------------------------------------------ trainer


def _models(
    cfg: ModelConfig, names: list[str], seed: int = 0
) -> tuple[Encoder, dict[str, Decoder]]:
    enc = build_encoder(cfg, seed=seed)
    decs = {n: build_decoder(cfg, seed=seed + 1 + i) for i, n in enumerate(names)}
    return enc, decs


def test_loss_decreases(cfg: ModelConfig, faces: dict[str, torch.Tensor]) -> None:
    enc, decs = _models(cfg, list(faces))
    tc = TrainConfig(steps=20, batch_size=8, lr=1e-3, log_every=10, seed=0)
    trainer = Trainer(enc, decs, faces, tc)
    first = trainer.step()  # loss of the untrained networks
    reports: list[Progress] = []
    summary = trainer.fit(on_progress=reports.append)
    assert [p.step for p in reports] == [10, 20]
    last = reports[-1].losses  # mean over steps 11..20
    assert set(last) == {"alice", "bob", "total"}
    assert last["total"] < 0.75 * first["total"], (first, last)
    for name in faces:
        assert last[name] < first[name]
    assert reports[-1].eta_s == 0 and reports[-1].examples_per_s > 0
    assert summary["steps"] == 20 and not summary["stopped"]
    assert summary["final_losses"] == last
    json.dumps(summary, allow_nan=False)  # goes into checkpoint metadata as is


def test_training_is_deterministic(cfg: ModelConfig, faces: dict[str, torch.Tensor]) -> None:
    runs = []
    for _ in range(2):
        enc, decs = _models(cfg, list(faces))
        trainer = Trainer(enc, decs, faces, TrainConfig(steps=3, batch_size=4, seed=11))
        runs.append([trainer.step() for _ in range(3)])
    assert runs[0] == runs[1]


def test_frozen_encoder_stays_bit_identical(
    cfg: ModelConfig, faces: dict[str, torch.Tensor]
) -> None:
    enc, decs = _models(cfg, ["carol"])
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    dec_before = decs["carol"].rgb.weight.detach().clone()
    tc = TrainConfig(steps=3, batch_size=4, lr=1e-3, encoder_lr=0.0)
    trainer = Trainer(enc, decs, {"carol": faces["alice"]}, tc)
    summary = trainer.fit()
    assert summary["encoder_frozen"] is True
    for k, v in enc.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in enc.parameters())
    assert not torch.equal(decs["carol"].rgb.weight, dec_before)


def test_identity_confusion_is_zero_only_for_a_critic_that_cannot_tell() -> None:
    assert float(identity_confusion(torch.zeros(5, 4))) == pytest.approx(0.0, abs=1e-6)
    sure = torch.tensor([[8.0, 0.0, 0.0], [0.0, 8.0, 0.0]])
    assert float(identity_confusion(sure)) > 2.0
    logits = sure.clone().requires_grad_(True)
    identity_confusion(logits).backward()
    assert logits.grad is not None
    # Gradient descent lowers each row's confident logit: towards a uniform guess.
    assert float(logits.grad[0, 0]) > 0 and float(logits.grad[1, 1]) > 0
    with pytest.raises(InvalidInputError, match="logits"):
        identity_confusion(torch.zeros(3, 1))


def test_latent_critic_moves_only_the_encoder(
    cfg: ModelConfig, faces: dict[str, torch.Tensor]
) -> None:
    """One step from the same start with and without the critic: the confusion term's
    gradient reaches the encoder but no decoder (their gradients are identical; unclipped,
    since clipping over all parameters together would rescale them), and the critic learns
    in the same step."""
    after = {}
    for weight in (0.0, 1.0):
        enc, decs = _models(cfg, ["alice", "bob"])
        tc = TrainConfig(steps=1, batch_size=4, lr=1e-3, latent_adversary=weight, grad_clip=None)
        trainer = Trainer(enc, decs, faces, tc)
        assert (trainer.critic is not None) == (weight > 0)
        critic_before = None
        if trainer.critic is not None:
            critic_before = [p.detach().clone() for p in trainer.critic.parameters()]
        summary = trainer.fit()
        if trainer.critic is not None and critic_before is not None:
            moved = [
                not torch.equal(p, q)
                for p, q in zip(trainer.critic.parameters(), critic_before, strict=True)
            ]
            assert all(moved)
            assert summary["latent_adversary"] == 1.0 and summary["critic_loss"] > 0
        else:
            assert summary["latent_adversary"] == 0.0 and summary["critic_loss"] is None
        # The step leaves each parameter's gradient of its one backward pass in .grad.
        after[weight] = (
            {k: p.grad.clone() for k, p in enc.named_parameters() if p.grad is not None},
            {
                f"{n}.{k}": p.grad.clone()
                for n, d in decs.items()
                for k, p in d.named_parameters()
                if p.grad is not None
            },
        )
    (enc0, decs0), (enc1, decs1) = after[0.0], after[1.0]
    assert set(enc0) == set(enc1) and len(enc0) > 0
    assert any(not torch.equal(enc0[k], enc1[k]) for k in enc0)
    assert set(decs0) == set(decs1) and len(decs0) > 0
    for k in decs0:
        assert torch.equal(decs0[k], decs1[k]), k


def test_latent_critic_only_where_the_encoder_learns_from_several_identities(
    cfg: ModelConfig, faces: dict[str, torch.Tensor]
) -> None:
    enc, decs = _models(cfg, ["alice", "bob"])
    frozen = TrainConfig(steps=1, batch_size=4, encoder_lr=0.0, latent_adversary=1.0)
    assert Trainer(enc, decs, faces, frozen).critic is None
    enc, decs = _models(cfg, ["alice"])
    one = TrainConfig(steps=1, batch_size=4, latent_adversary=1.0)
    assert Trainer(enc, decs, {"alice": faces["alice"]}, one).critic is None
    with pytest.raises(InvalidInputError, match="latent_adversary"):
        TrainConfig(steps=1, latent_adversary=-0.5)
    with pytest.raises(InvalidInputError, match="latent_adversary"):
        JobSpec(mode="pretrain", datasets=["ann"], latent_adversary=100.0).validate()


def test_latent_critic_learns_to_tell_identities_apart(
    cfg: ModelConfig, faces: dict[str, torch.Tensor]
) -> None:
    """With a negligible weight the encoder ignores the critic, and the critic learns to
    name an orange face and a blue one from the latent: its loss falls well below ln 2, the
    loss of a coin toss."""
    enc, decs = _models(cfg, ["alice", "bob"])
    tc = TrainConfig(steps=20, batch_size=8, lr=1e-3, latent_adversary=1e-9)
    summary = Trainer(enc, decs, faces, tc).fit()
    assert summary["critic_loss"] < 0.5 * math.log(2), summary["critic_loss"]


def test_mean_latent_averages_the_faces_and_their_mirror_images(
    cfg: ModelConfig, faces: dict[str, torch.Tensor]
) -> None:
    enc, _ = _models(cfg, [])
    enc.train()
    x = faces["alice"][:5].permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        want = enc.eval()(torch.cat((x, x.flip(-1)))).mean(0)
    enc.train()
    got = mean_latent(enc, faces["alice"][:5], batch=2)  # uint8 NHWC, in uneven batches
    assert got.shape == cfg.latent_shape and torch.allclose(got, want, atol=1e-6)
    assert enc.training  # handed back as it came
    assert torch.allclose(mean_latent(enc, x), want, atol=1e-6)  # float NCHW too


def _decoder_inputs(trainer: Trainer, steps: int) -> dict[str, list[torch.Tensor]]:
    """What each decoder was handed in ``steps`` steps, caught by forward pre-hooks."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in trainer.identities}
    hooks = [
        dec.register_forward_pre_hook(lambda _m, args, n=n: seen[n].append(args[0].detach()))
        for n, dec in trainer.decoders.items()
    ]
    for _ in range(steps):
        trainer.step()
    for h in hooks:
        h.remove()
    return seen


def test_identity_shift_moves_latents_towards_other_people(
    cfg: ModelConfig, faces: dict[str, torch.Tensor]
) -> None:
    """Without augmentation a one-face identity's latent is known exactly; what its decoder
    gets is that latent plus u * (another person's mean - its own), 0 <= u <= the shift."""
    enc, decs = _models(cfg, ["alice", "bob"])
    still = AugmentConfig(
        rotation=0, zoom=0, shift=0, flip=0, brightness=0, contrast=0, saturation=0
    )
    one = {n: f[:1] for n, f in faces.items()}
    extra = mean_latent(enc, _shapes(4, 9, (0.2, 0.8, 0.2)))
    tc = TrainConfig(
        steps=10, batch_size=1, encoder_lr=0.0, warp=False, augment=still, identity_shift=0.5
    )
    trainer = Trainer(enc, decs, one, tc, extra_latent_means={"carol": extra})
    mean = {n: mean_latent(enc, f) for n, f in one.items()}
    seen = _decoder_inputs(trainer, 12)
    towards_carol = 0
    for name, other in (("alice", "bob"), ("bob", "alice")):
        with torch.no_grad():
            own = enc(one[name].permute(0, 3, 1, 2).float() / 255)[0]
        for z in seen[name]:
            delta = z[0] - own
            fits = []
            for target in (mean[other], extra):
                direction = target - mean[name]
                u = float((delta * direction).sum() / direction.square().sum())
                if torch.allclose(delta, u * direction, atol=1e-5):
                    fits.append(u)
            assert len(fits) == 1 and -1e-6 <= fits[0] <= 0.5 + 1e-6, fits
            towards_carol += torch.allclose(delta, fits[0] * (extra - mean[name]), atol=1e-5)
    assert 0 < towards_carol < 24  # both kinds of other person are drawn


def test_identity_shift_needs_a_frozen_encoder_and_another_person(
    cfg: ModelConfig, faces: dict[str, torch.Tensor]
) -> None:
    with pytest.raises(InvalidInputError, match="frozen"):
        TrainConfig(steps=1, identity_shift=1.0)
    with pytest.raises(InvalidInputError, match="identity_shift"):
        TrainConfig(steps=1, encoder_lr=0.0, identity_shift=-1.0)
    enc, decs = _models(cfg, ["alice"])
    tc = TrainConfig(steps=1, batch_size=2, encoder_lr=0.0, identity_shift=1.0)
    with pytest.raises(InvalidInputError, match="another person"):
        Trainer(enc, decs, {"alice": faces["alice"]}, tc)
    with pytest.raises(InvalidInputError, match="extra latent mean"):
        Trainer(enc, decs, {"alice": faces["alice"]}, tc, extra_latent_means={"x": torch.ones(3)})
    one = Trainer(
        enc, decs, {"alice": faces["alice"]}, tc, extra_latent_means={"x": torch.zeros(64, 8, 8)}
    )
    assert set(one.step()) == {"alice", "total"}


def test_masks_float_data_and_stop(cfg: ModelConfig, faces: dict[str, torch.Tensor]) -> None:
    enc, decs = _models(cfg, ["alice"])
    data = {"alice": faces["alice"].permute(0, 3, 1, 2).float() / 255}  # float NCHW
    masks = {"alice": (faces["alice"][..., 0] > 150).to(torch.uint8) * 255}  # (N,R,R)
    calls = iter(range(100))
    trainer = Trainer(
        enc, decs, data, TrainConfig(steps=50, batch_size=4, log_every=1), masks=masks
    )
    summary = trainer.fit(should_stop=lambda: next(calls) >= 2)
    assert summary["stopped"] is True and summary["steps"] == 2
    assert math.isfinite(summary["final_losses"]["total"])


def test_small_dataset_smaller_than_batch(cfg: ModelConfig, faces: dict[str, torch.Tensor]) -> None:
    enc, decs = _models(cfg, ["alice"])
    trainer = Trainer(enc, decs, {"alice": faces["alice"][:3]}, TrainConfig(steps=1, batch_size=8))
    assert set(trainer.step()) == {"alice", "total"}


def test_trainer_rejects_bad_setup(cfg: ModelConfig, faces: dict[str, torch.Tensor]) -> None:
    enc, decs = _models(cfg, ["alice"])
    tc = TrainConfig(steps=1, batch_size=2)
    with pytest.raises(InvalidInputError, match="same identities"):
        Trainer(enc, decs, {"bob": faces["bob"]}, tc)
    with pytest.raises(InvalidInputError, match="uint8"):
        Trainer(enc, decs, {"alice": faces["alice"][:, :32]}, tc)
    with pytest.raises(InvalidInputError, match="masks"):
        Trainer(enc, decs, {"alice": faces["alice"]}, tc, masks={"alice": torch.ones(2, 64, 64)})
    with pytest.raises(InvalidInputError, match="at least one"):
        Trainer(enc, {}, {}, tc)
    with pytest.raises(InvalidInputError, match="encoder_lr"):
        TrainConfig(steps=1, encoder_lr=-1.0)


def test_divergence_is_reported(cfg: ModelConfig, faces: dict[str, torch.Tensor]) -> None:
    enc, decs = _models(cfg, ["alice"])
    with torch.no_grad():
        enc.dense1.weight.fill_(float("nan"))
    trainer = Trainer(enc, decs, {"alice": faces["alice"]}, TrainConfig(steps=2, batch_size=2))
    with pytest.raises(PreconditionError, match="diverged"):
        trainer.fit()


def test_cosine_schedule_anneals_to_the_floor() -> None:
    cfg = get_preset("tiny")
    imgs = torch.randint(0, 255, (8, cfg.resolution, cfg.resolution, 3), dtype=torch.uint8)
    trainer = Trainer(
        build_encoder(cfg, seed=0),
        {"a": build_decoder(cfg, seed=1)},
        {"a": imgs},
        TrainConfig(steps=4, batch_size=2, lr=1e-3, lr_schedule="cosine", min_lr_ratio=0.1),
    )
    lrs = []
    for _ in range(4):
        trainer.step()
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    # Step k runs at the rate for progress k/steps: 1.0, ..., then cos(3/4 pi) of the way.
    expected = [1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 4))) for k in range(4)]
    assert lrs == pytest.approx(expected)
    assert lrs == sorted(lrs, reverse=True)
    with pytest.raises(InvalidInputError, match="lr_schedule"):
        TrainConfig(steps=1, lr_schedule="sometimes")


def test_warmup_ramps_the_rate_then_hands_over_to_the_schedule() -> None:
    cfg = get_preset("tiny")
    imgs = torch.randint(0, 255, (8, cfg.resolution, cfg.resolution, 3), dtype=torch.uint8)
    for schedule in ("constant", "cosine"):
        trainer = Trainer(
            build_encoder(cfg, seed=0),
            {"a": build_decoder(cfg, seed=1)},
            {"a": imgs},
            TrainConfig(steps=6, batch_size=2, lr=1e-3, lr_schedule=schedule, warmup_steps=3),
        )
        lrs = []
        for _ in range(6):
            trainer.step()
            lrs.append(trainer.optimizer.param_groups[0]["lr"])
        after = [
            1.0 if schedule == "constant" else 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * k / 6))
            for k in range(6)
        ]
        ramp = [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
        assert lrs == pytest.approx([1e-3 * a * r for a, r in zip(after, ramp, strict=True)])
    with pytest.raises(InvalidInputError, match="warmup_steps"):
        TrainConfig(steps=1, warmup_steps=-1)


def test_template_loss_mask_trains_the_mask_head_on_the_face(tmp_path: Path) -> None:
    """The template loss_mask counts the face only and teaches the decoder's mask head where
    the face is; "none" counts the whole crop and leaves the mask head untrained."""
    faces = synth.make_dataset(synth.identity_from_seed(3), 16, 64, seed=3)[0]
    template = template_mask(64) > 0.5
    ious = {}
    for mode in ("template", "none"):
        work = tmp_path / mode
        spec = JobSpec(
            mode="pretrain",
            datasets=["ann"],
            steps=25,
            batch_size=8,
            lr=2e-3,
            log_every=20,
            loss_mask=mode,
        )
        prepare_work_dir(work, spec, {"ann": faces})
        result = run_job(work)
        assert result["status"] == "succeeded"
        encoder, _ = checkpoint.load_encoder((work / result["encoder"]).read_bytes())
        decoder, _ = checkpoint.load_decoder((work / result["decoders"]["ann"]).read_bytes())
        with torch.no_grad():
            x = torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 255
            mask = decoder(encoder(x))[1]
        assert mask is not None
        pred = mask.mean(0)[0].numpy() > 0.5
        ious[mode] = (pred & template).sum() / max((pred | template).sum(), 1)
    assert ious["template"] > 0.8 > ious["none"], ious
    with pytest.raises(InvalidInputError, match="loss_mask"):
        JobSpec(mode="pretrain", datasets=["ann"], loss_mask="hair").validate()


def test_landmark_loss_masks_follow_each_face(tmp_path: Path) -> None:
    """loss_mask "landmarks": a face with 68 points gets its own outline, closer to its true
    face region than the template's ellipse across poses; a face with 5 points or none gets
    the template exactly; the job says how many faces were outlined."""
    from facemux.models.pretrain import face_loss_masks

    person = synth.identity_from_seed(3)
    faces = [synth.render(person, s, 64) for s in synth.make_states(12, seed=3)]
    marks: list[Any] = [f.landmarks68 for f in faces[:10]] + [faces[10].landmarks5, None]
    masks = face_loss_masks(marks, len(faces), 64).numpy()
    template = (template_mask(64) * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(masks[10], template) and np.array_equal(masks[11], template)

    def iou(a: np.ndarray, b: np.ndarray) -> float:
        return float((a & b).sum() / max((a | b).sum(), 1))

    own = [iou(masks[i] > 127, faces[i].mask > 127) for i in range(10)]
    ellipse = [iou(template > 127, faces[i].mask > 127) for i in range(10)]
    assert np.mean(own) > 0.8 and np.mean(own) > np.mean(ellipse) + 0.05, (own, ellipse)

    data = np.stack([f.image for f in faces])
    spec = JobSpec(mode="pretrain", datasets=["ann"], steps=2, batch_size=4, loss_mask="landmarks")
    prepare_work_dir(tmp_path, spec, {"ann": data}, landmarks={"ann": marks})
    assert run_job(tmp_path)["status"] == "succeeded"
    notes = [e.get("message", "") for e in read_events(tmp_path)[0]]
    assert any("loss mask: 10 of 12 faces outlined" in m for m in notes), notes


def test_identity_checkpoint_leaves_out_the_frozen_encoder_and_resumes_exactly(
    tmp_path: Path,
) -> None:
    cfg = get_preset("tiny")
    enc_bytes, _ = checkpoint.encoder_to_bytes(build_encoder(cfg, seed=1), cfg)
    faces = synth.make_dataset(synth.identity_from_seed(4), 12, 64, seed=4)[0]
    spec = JobSpec(
        mode="identity",
        identity="ann",
        datasets=["ann"],
        steps=12,
        batch_size=4,
        checkpoint_every=6,
        log_every=3,
    )
    outputs = {}
    for run in ("straight", "paused"):
        work = tmp_path / run
        prepare_work_dir(work, spec, {"ann": faces}, enc_bytes)

        def pause_at_six(p: Progress, work: Path = work, run: str = run) -> None:
            if run == "paused" and p.step >= 6:
                (work / "pause").touch()

        result = run_job(work, pause_at_six)
        if run == "paused":
            assert result == {"status": "paused", "step": 6}
            state = torch.load(work / "checkpoint.pt", weights_only=True)
            assert "encoder" not in state and set(state["decoders"]) == {"ann"}
            (work / "pause").unlink()
            result = run_job(work)
        assert result["status"] == "succeeded" and result["step"] == 12
        decoder, _ = checkpoint.load_decoder((work / result["decoders"]["ann"]).read_bytes())
        outputs[run] = decoder.state_dict()
    for key, value in outputs["straight"].items():
        assert torch.equal(outputs["paused"][key], value), key


def test_pretrain_checkpoint_keeps_the_critic_and_resumes_exactly(tmp_path: Path) -> None:
    """A paused pretraining job with the latent critic resumes to bit-identical weights: the
    checkpoint carries the critic and its optimiser, not only the encoder and decoders."""
    data = {
        n: synth.make_dataset(synth.identity_from_seed(seed), 12, 64, seed=seed)[0]
        for n, seed in (("ann", 6), ("ben", 7))
    }
    spec = JobSpec(
        mode="pretrain",
        datasets=["ann", "ben"],
        steps=12,
        batch_size=4,
        checkpoint_every=6,
        log_every=3,
        latent_adversary=1.0,
    )
    outputs = {}
    for run in ("straight", "paused"):
        work = tmp_path / run
        prepare_work_dir(work, spec, data)

        def pause_at_six(p: Progress, work: Path = work, run: str = run) -> None:
            if run == "paused" and p.step >= 6:
                (work / "pause").touch()

        result = run_job(work, pause_at_six)
        if run == "paused":
            assert result == {"status": "paused", "step": 6}
            state = torch.load(work / "checkpoint.pt", weights_only=True)
            assert {"critic", "critic_optimizer", "encoder"} <= set(state)
            (work / "pause").unlink()
            result = run_job(work)
        assert result["status"] == "succeeded" and result["step"] == 12
        assert result["summary"]["latent_adversary"] == 1.0
        nets = [checkpoint.load_encoder((work / result["encoder"]).read_bytes())[0]]
        for name in sorted(result["decoders"]):
            blob = (work / result["decoders"][name]).read_bytes()
            nets.append(checkpoint.load_decoder(blob)[0])
        outputs[run] = [checkpoint.fingerprint(net) for net in nets]
    assert outputs["paused"] == outputs["straight"]

    # A job started before the critic existed (spec without the field, checkpoint without a
    # critic) resumes as it started: without one.
    old = tmp_path / "paused"
    spec_json = json.loads((old / "spec.json").read_text())
    del spec_json["latent_adversary"]
    assert JobSpec.from_dict(spec_json).latent_adversary == 0.0
    # A checkpoint without the critic, under a spec with one, resumes with a fresh critic.
    state = torch.load(old / "checkpoint.pt", weights_only=True)
    for key in ("critic", "critic_optimizer"):
        del state[key]
    torch.save(state, old / "checkpoint.pt")
    result = run_job(old)
    assert result["status"] == "succeeded" and result["summary"]["latent_adversary"] == 1.0


def test_checkpoint_min_seconds_spaces_checkpoints_out(tmp_path: Path) -> None:
    faces = synth.make_dataset(synth.identity_from_seed(5), 8, 64, seed=5)[0]
    counts = {}
    for min_s in (0.0, 3600.0):
        work = tmp_path / str(min_s)
        spec = JobSpec(
            mode="pretrain",
            datasets=["ann"],
            steps=6,
            batch_size=2,
            checkpoint_every=2,
            checkpoint_min_seconds=min_s,
            log_every=2,
        )
        prepare_work_dir(work, spec, {"ann": faces})
        assert run_job(work)["status"] == "succeeded"
        events, _ = read_events(work)
        counts[min_s] = [e["step"] for e in events if e["type"] == "checkpoint"]
    # Every 2 steps (the end publishes, it does not checkpoint); with an hour's floor, never.
    assert counts == {0.0: [2, 4], 3600.0: []}


def test_emphasis_weights_ride_with_the_faces(
    cfg: ModelConfig, faces: dict[str, torch.Tensor]
) -> None:
    """Per-face loss weights (eyes and mouth from landmarks) go through the same augmentation
    as the faces: all-ones weights train exactly as none; an emphasis map changes the loss;
    bad weights are refused."""
    masks = {"alice": (faces["alice"][..., 0] > 150).to(torch.uint8) * 255}
    n = faces["alice"].shape[0]
    lm = synth.render(synth.identity_from_seed(1), synth.FaceState(), 64).landmarks68
    emphasis = landmark_weight_map(np.repeat(lm[None], n, axis=0), 64)[:, 0]
    losses = {}
    for name, weights in (
        ("none", None),
        ("ones", {"alice": torch.ones(n, 64, 64)}),
        ("eyes", {"alice": emphasis}),
    ):
        enc, decs = _models(cfg, ["alice"])
        trainer = Trainer(
            enc,
            decs,
            {"alice": faces["alice"]},
            TrainConfig(steps=3, batch_size=4, seed=7),
            masks=masks,
            weights=weights,
        )
        losses[name] = [trainer.step()["total"] for _ in range(3)]
    np.testing.assert_allclose(losses["ones"], losses["none"], rtol=1e-5)
    assert not np.allclose(losses["eyes"], losses["none"], rtol=1e-3)
    enc, decs = _models(cfg, ["alice"])
    with pytest.raises(InvalidInputError, match="weights for 'alice' must be float and >= 0"):
        Trainer(
            enc, decs, {"alice": faces["alice"]}, TrainConfig(steps=1), weights={"alice": -emphasis}
        )
    with pytest.raises(InvalidInputError, match="weights given for unknown identities"):
        Trainer(
            enc, decs, {"alice": faces["alice"]}, TrainConfig(steps=1), weights={"bob": emphasis}
        )


def test_face_emphasis_from_68_or_5_points_or_the_template() -> None:
    from facemux.models.faces import template_landmarks
    from facemux.models.pretrain import face_emphasis

    face = synth.render(synth.identity_from_seed(2), synth.FaceState(yaw=20), 64)
    lm68 = face.landmarks68
    lm5 = face.landmarks5
    w = face_emphasis([lm68, lm5, None], 3, 64)
    assert w.shape == (3, 64, 64)
    torch.testing.assert_close(w[0], landmark_weight_map(lm68, 64)[0, 0])
    torch.testing.assert_close(w[2], landmark_weight_map(template_landmarks(64, 68), 64)[0, 0])
    # From 5 points (no mouth among them), the fitted template still weighs both eyes 3x
    # where this face's eyes are, and a mouth 2x below them.
    for x, y in lm5[:4]:
        assert w[1, round(float(y)), round(float(x))] == 3.0
    assert (w[1] == 2.0).any() and w[1].min() == 1.0
