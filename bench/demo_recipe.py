"""The demo's decoder training under recipe variants, at equal steps, scored as the demo is.

    python bench/demo_recipe.py [--steps 900] [--only NAME ...] [--threads 1] [--out DIR]

Each variant trains fresh copies of the shipped starter decoder for avery and blake from
the shipped encoder, frozen or trained on as the variant says (service/demo.py's data: 1,500
rendered faces each, seed 1), for exactly ``--steps`` steps, its cosine schedule spread over
them, then swaps both ways on held-out states and scores the face region against the ground
truth (models.scores.face_scores): the demo's 8 states per direction and 56 more, directly
through the networks (no server, so no watermark: the figures sit a little above the demo's
own). ``recon`` is each decoder on its own person's held-out faces: what the decoder can
draw at all, against which the swap's gap is what the latent of another person's face
loses. Steps, not seconds, make variants comparable on a shared machine; the wall and CPU
time per step are printed beside. A grid per variant (inputs, swaps, truth; 6 columns) goes
to ``--out``. ``--latent-gap`` instead measures how far the shipped encoder's latents of the
demo's two people lie apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from facemux.models import checkpoint, demo_encoder, synth
from facemux.models.augment import DEFAULT_WARP_SCALE
from facemux.models.pixels import to_uint8
from facemux.models.scores import face_scores
from facemux.service import demo
from facemux.service.demo import DemoRecipe

EYES_MOUTH = (3.0, 1.0, 2.0)  # eyes, brows (1: no emphasis), mouth: the pretraining's map
FEATURES = (3.0, 3.0, 2.0)  # and the brows as strongly as the eyes

# The demo's recipe before the identity shift (frozen encoder); variants below change it.
# "frozen" is the frozen recipe with the shift (the demo's default until the encoder trained
# on, called "after" in earlier results) and "frozen, ..." change that; "default" is today's
# DemoRecipe() (the shipped encoder trained on with the decoders) and "encoder ..." or
# "default, ..." change that.
FROZEN: dict[str, Any] = {
    k: v for k, v in dataclasses.asdict(demo.FROZEN).items() if v != getattr(DemoRecipe(), k)
}
BEFORE: dict[str, Any] = {**FROZEN, "lr": 1e-3, "identity_shift": 0.0, "shift_bank": 0}
SHIFT: dict[str, Any] = {"identity_shift": 1.0, "shift_bank": 6}
CAST: dict[str, Any] = {"input_colour": demo_encoder.INPUT_COLOUR}

VARIANTS: dict[str, dict[str, Any]] = {
    "before": BEFORE,
    "lr 2e-3": {**BEFORE, "lr": 2e-3},
    "lr 3e-3": {**BEFORE, "lr": 3e-3},
    "betas 0.9": {**BEFORE, "betas": (0.9, 0.999)},
    "eyes+mouth emphasis": {**BEFORE, "emphasis": EYES_MOUTH},
    "eyes+brows+mouth emphasis": {**BEFORE, "emphasis": FEATURES},
    "no warp": {**BEFORE, "warp": False},
    "no colour cast": {**BEFORE, "input_colour": 0.0},
    "warmup 30": {**BEFORE, "warmup_steps": 30},
    "colour cast 1.0": {**BEFORE, "input_colour": 1.0},
    "warp x3": {**BEFORE, "warp_scale": 3 * DEFAULT_WARP_SCALE},
    "identity shift": {**BEFORE, "identity_shift": 1.0},
    "identity shift + bank 6": {**BEFORE, **SHIFT},
    "identity shift 1.5 + bank 6": {**BEFORE, **SHIFT, "identity_shift": 1.5},
    "frozen": FROZEN,
    "frozen, eyes+brows+mouth emphasis": {**FROZEN, "emphasis": FEATURES},
    "frozen, batch 16": {**FROZEN, "batch": 16},
    "encoder 2e-4, with the colour cast": {**CAST, "encoder_lr": 2e-4},
    "encoder 5e-4, with the colour cast": {**CAST, "encoder_lr": 5e-4},
    "encoder 2e-3, with the colour cast": {**CAST, "encoder_lr": 2e-3},
    "default": {},
    "default, with the colour cast": CAST,
    "default, no critic, with the colour cast": {**CAST, "latent_adversary": 0.0},
    "default, eyes+brows+mouth emphasis": {"emphasis": FEATURES},
}

# A third person, in neither the demo's training nor the encoder's pretraining: swaps from
# their face say whether a recipe helps any input face or only the other trained person's.
STRANGER, STRANGER_SEED = "casey", 6
HELD_OUT = 64  # per direction; the first 8 are the demo's own


def held_out_states(seed: int, k: int) -> list[synth.FaceState]:
    ours = synth.make_states(8, seed=10_000 + 17 * seed + k)
    return ours + synth.make_states(HELD_OUT - 8, seed=20_000 + 17 * seed + k)


@torch.no_grad()
def decode(encoder: torch.nn.Module, decoder: torch.nn.Module, faces: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 255.0
    rgb, _ = decoder(encoder(x))
    return to_uint8(rgb.permute(0, 2, 3, 1).contiguous()).numpy()


def scores(pred: np.ndarray, truth: np.ndarray, face: np.ndarray) -> tuple[float, float]:
    s, p = np.mean([face_scores(a, b, m) for a, b, m in zip(pred, truth, face, strict=True)], 0)
    return float(s), float(p)


def run_variant(
    name: str,
    recipe: DemoRecipe,
    steps: int,
    data: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    landmarks: dict[str, np.ndarray],
    tests: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]],
    out: Path,
    assets: Path | None = None,
) -> dict[str, Any]:
    encoder, fp, starter = load_assets(assets)
    decoders = {n: demo_encoder.starter_decoder(fp, starter) for n in demo.NAMES}
    trainer = demo.make_trainer(encoder, decoders, data, masks, landmarks, recipe, steps, seed=1)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    summary = trainer.fit()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    row: dict[str, Any] = {
        "variant": name,
        "steps": summary["steps"],
        "wall_ms_per_step": 1e3 * wall / steps,
        "cpu_ms_per_step": 1e3 * cpu / steps,
        "loss": summary["final_losses"].get("total"),
    }
    strips = []
    for (a, b), (src, truth, face) in tests.items():
        swapped = decode(encoder, decoders[b], src)
        if a == STRANGER:
            row[f"{a}->{b} swap"] = scores(swapped, truth, face)
            continue
        own = decode(encoder, decoders[b], truth)
        row[f"{a}->{b} swap"] = scores(swapped, truth, face)
        row[f"{a}->{b} swap (demo 8)"] = scores(swapped[:8], truth[:8], face[:8])
        row[f"{b} recon"] = scores(own, truth, face)
        strips += [src[:6], swapped[:6], truth[:6]]
    grid = np.concatenate([np.concatenate(list(s), axis=1) for s in strips], axis=0)
    grid = cv2.resize(grid, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    slug = name.replace(" ", "_").replace("+", "")
    cv2.imwrite(str(out / f"{slug}_{steps}.png"), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    return row


def load_assets(assets: Path | None) -> tuple[torch.nn.Module, str, Path | None]:
    """(encoder, its fingerprint, starter decoder path): the shipped pair, or a rebuilt pair
    in ``assets`` (as `demo_encoder build` names them), taken at its own fingerprint so a
    candidate can be scored before it is pinned."""
    if assets is None:
        encoder, _, fp = demo_encoder.load()
        return encoder, fp, None
    path = assets / demo_encoder.ASSET.name
    _, meta = checkpoint.read_encoder(path.read_bytes())
    encoder, _, fp = demo_encoder.load(path, expected=meta.fingerprint)
    return encoder, fp, assets / demo_encoder.STARTER_DECODER.name


@torch.no_grad()
def latent_gap(assets: Path | None = None) -> dict[str, float]:
    """How far the shipped encoder puts avery's latents from blake's, state for state, and
    how much of that a shift by the difference of their mean latents closes: the mean
    latents from 256 training-like states, the distances on 64 others."""
    encoder, _, _ = load_assets(assets)
    avery, blake = (synth.identity_from_seed(s) for s in demo.PEOPLE_SEEDS)

    def latents(person: synth.IdentityParams, states: list[synth.FaceState]) -> torch.Tensor:
        faces, _, _ = demo.render_faces(person, states, 64)
        x = torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 255.0
        return encoder(x).flatten(1)

    held = synth.make_states(64, seed=777)
    za, zb = latents(avery, held), latents(blake, held)
    fit = synth.make_states(256, seed=4242)
    mean_a, mean_b = latents(avery, fit).mean(0), latents(blake, fit).mean(0)
    shifted = zb - mean_b + mean_a
    same = torch.arange(len(held))
    return {
        "avery(s) to blake(s)": float((za - zb).norm(dim=1).mean()),
        "blake(s) to blake(s')": float((zb - zb.roll(1, 0)).norm(dim=1).mean()),
        "avery mean to blake mean": float((za.mean(0) - zb.mean(0)).norm()),
        "blake spread around its mean": float((zb - zb.mean(0)).norm(dim=1).mean()),
        "avery latents nearer blake's mean than avery's": float(
            ((za - zb.mean(0)).norm(dim=1) < (za - za.mean(0)).norm(dim=1)).float().mean()
        ),
        "nearest blake latent is the same state": float(
            (torch.cdist(za, zb).argmin(1) == same).float().mean()
        ),
        "avery(s) to shifted blake(s)": float((za - shifted).norm(dim=1).mean()),
        "nearest shifted blake latent is the same state": float(
            (torch.cdist(za, shifted).argmin(1) == same).float().mean()
        ),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--only", nargs="*", default=None, help="variant names (default: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--faces", type=int, default=1500)
    p.add_argument("--out", type=Path, default=Path("demo-recipe"))
    p.add_argument(
        "--latent-gap", action="store_true", help="only measure the encoder's identity gap"
    )
    p.add_argument(
        "--assets",
        type=Path,
        default=None,
        help="a directory with a rebuilt encoder and starter decoder (default: the shipped pair)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.latent_gap:
        print(json.dumps(latent_gap(args.assets), indent=1))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    people = {
        n: synth.identity_from_seed(s) for n, s in zip(demo.NAMES, demo.PEOPLE_SEEDS, strict=True)
    }
    data, masks, landmarks = {}, {}, {}
    for i, (n, person) in enumerate(people.items()):
        states = synth.make_states(args.faces, seed=100 + i)  # the demo's, seed 1
        imgs, msks, lms = demo.render_faces(person, states, 64)
        data[n], masks[n], landmarks[n] = torch.from_numpy(imgs), torch.from_numpy(msks), lms
    people[STRANGER] = synth.identity_from_seed(STRANGER_SEED)
    tests = {}
    pairs = [demo.NAMES, demo.NAMES[::-1], *((STRANGER, n) for n in demo.NAMES)]
    for k, (a, b) in enumerate(pairs):
        states = held_out_states(1, k)
        src, _, _ = demo.render_faces(people[a], states, 64)
        truth, face, _ = demo.render_faces(people[b], states, 64)
        tests[(a, b)] = (src, truth, face)
    names = args.only if args.only else list(VARIANTS)
    for name in names:
        recipe = dataclasses.replace(DemoRecipe(), **VARIANTS[name])
        row = run_variant(
            name, recipe, args.steps, data, masks, landmarks, tests, args.out, args.assets
        )
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
