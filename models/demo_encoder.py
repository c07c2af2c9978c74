"""The shared encoder shipped with facemux for the demo: the `tiny` preset pretrained on
synthetic people who are not the demo's two.

With it, `facemux demo` trains only two decoders against a frozen encoder, which is how a
deployment adds a new identity, instead of learning an encoder from nothing in three minutes.

The file under ``assets/`` was made by this module's own command, ``BUILD_COMMAND``, run
from the repository root; it pretrains through facemux.models.pretrain (the training
service's entry point and recipe: loss mask and emphasis from each face's 68 landmarks,
warm-up, cosine decay, clipping, the latent critic) and records the command in the
checkpoint's summary. The weights' fingerprint is pinned in ``FINGERPRINT``: :func:`read`
and :func:`load` refuse a file whose weights are not exactly those, so a damaged or swapped
asset fails loudly. Rebuilding gives other weights (float reductions differ across CPUs and
thread counts), hence a new fingerprint to pin.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import checkpoint, synth
from .errors import CheckpointError, FingerprintMismatchError, NotFoundError
from .networks import Decoder, Encoder
from .pretrain import JobSpec, prepare_work_dir, run_job

__all__ = [
    "ASSET",
    "BUILD_COMMAND",
    "FINGERPRINT",
    "INPUT_COLOUR",
    "STARTER_DECODER",
    "build",
    "load",
    "pretrain_seeds",
    "read",
    "starter_decoder",
]

ASSET = Path(__file__).parent / "assets" / "demo-encoder-tiny.safetensors"
# One of the pretraining's decoders (the first person's): where a new identity's decoder
# starts, so it adapts a decoder that already draws faces from this encoder's latents.
STARTER_DECODER = Path(__file__).parent / "assets" / "demo-decoder-start-tiny.safetensors"
# sha256 over the weights (facemux.models.checkpoint.fingerprint) of the shipped file.
FINGERPRINT = "23d6b0235ed33984fb4dbc3011aded3757d880ff44d95d05a6e800a16fa3b030"
# The command that made the shipped file (see the module docstring).
BUILD_COMMAND = (
    "python -m facemux.models.demo_encoder build --out models/assets/demo-encoder-tiny.safetensors"
    " --identities 6 --faces 250 --steps 1200 --input-colour 0.6"
)
# Strength of the colour cast on the encoder's inputs only (augment.AugmentConfig), in the
# pretraining and in the demo's decoder training: a decoder must draw its own person's skin
# tone from a latent of someone else's face.
INPUT_COLOUR = 0.6
# Synthetic people the encoder is pretrained on: seeds far from the demo's (service/demo.py
# uses 4 and 5), so the demo's people are new to it, as a user's are.
PRETRAIN_SEEDS_START = 1000


def pretrain_seeds(identities: int) -> list[int]:
    return [PRETRAIN_SEEDS_START + i for i in range(identities)]


def read(path: Path | None = None, expected: str | None = None) -> tuple[bytes, str]:
    """(checkpoint bytes, fingerprint) of the shipped encoder, checked: the file's weights
    must hash to the fingerprint its header records (checkpoint.read_encoder checks that)
    and that fingerprint must be the pinned one."""
    src = ASSET if path is None else Path(path)
    want = FINGERPRINT if expected is None else expected
    try:
        data = src.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(
            f"the shipped demo encoder {src.name} is missing from this install"
        ) from None
    _, meta = checkpoint.read_encoder(data)
    if meta.config.name != "tiny":
        raise CheckpointError(f"{src.name} is a {meta.config.name} encoder, expected tiny")
    if meta.fingerprint != want:
        raise FingerprintMismatchError(
            f"the shipped demo encoder {src.name}", want, meta.fingerprint
        )
    return data, meta.fingerprint


def load(path: Path | None = None, expected: str | None = None) -> tuple[Encoder, bytes, str]:
    """(encoder in eval mode, its checkpoint bytes, its fingerprint), checked as in read."""
    data, fp = read(path, expected)
    encoder, _ = checkpoint.load_encoder(data)
    return encoder.eval(), data, fp


def starter_decoder(encoder_fingerprint: str, path: Path | None = None) -> Decoder:
    """A fresh copy of the shipped starting decoder, in train mode; refused
    (FingerprintMismatchError) unless it was trained against ``encoder_fingerprint``."""
    src = STARTER_DECODER if path is None else Path(path)
    try:
        data = src.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(
            f"the shipped starting decoder {src.name} is missing from this install"
        ) from None
    decoder, _ = checkpoint.load_decoder(data, expected_encoder_fingerprint=encoder_fingerprint)
    return decoder.train()


def build(
    out: Path,
    decoder_out: Path,
    identities: int,
    faces: int,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    threads: int,
    command: str,
    input_colour: float = 0.0,
) -> dict[str, Any]:
    """Pretrain the tiny preset on ``identities`` synthetic people and write the encoder to
    ``out`` with ``command`` in its summary; returns the job's result."""
    people = {f"p{s}": synth.identity_from_seed(s) for s in pretrain_seeds(identities)}
    datasets: dict[str, np.ndarray] = {}
    landmarks: dict[str, list[Any]] = {}
    for i, (name, person) in enumerate(people.items()):
        rendered = [synth.render(person, s, 64) for s in synth.make_states(faces, seed + 7 * i)]
        datasets[name] = np.stack([r.image for r in rendered])
        # 68 points per face: the job's loss mask follows each face's own outline and its
        # emphasis each face's own eyes and mouth.
        landmarks[name] = [r.landmarks68 for r in rendered]
    spec = JobSpec(
        mode="pretrain",
        datasets=list(people),
        preset="tiny",
        steps=steps,
        batch_size=batch,
        lr=lr,
        checkpoint_every=max(100, steps // 10),
        log_every=max(10, steps // 50),
        seed=seed,
        device="cpu",
        threads=threads,
        input_colour=input_colour,
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare_work_dir(work, spec, datasets, landmarks=landmarks)
        result = run_job(work)
        if result.get("status") != "succeeded":
            raise RuntimeError(f"pretraining did not succeed: {result}")
        encoder, meta = checkpoint.load_encoder((work / result["encoder"]).read_bytes())
        first = next(iter(result["decoders"]))
        decoder, dec_meta = checkpoint.load_decoder((work / result["decoders"][first]).read_bytes())
    summary = dict(meta.summary) | {"built_by": command, "pretrain_seeds": list(people)}
    data, meta = checkpoint.encoder_to_bytes(encoder, meta.config, summary)
    dec_data, _ = checkpoint.decoder_to_bytes(
        decoder, meta.config, meta.fingerprint, dec_meta.identity, summary
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write(out, data)
    checkpoint.atomic_write(decoder_out, dec_data)
    return {"fingerprint": meta.fingerprint, "steps": result["step"], "summary": summary}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m facemux.models.demo_encoder",
        description="Build or check the demo's shipped encoder.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="pretrain a tiny encoder on synthetic people")
    b.add_argument("--out", type=Path, default=ASSET)
    b.add_argument("--decoder-out", type=Path, default=STARTER_DECODER)
    b.add_argument("--identities", type=int, default=8)
    b.add_argument("--faces", type=int, default=300, help="faces per identity")
    b.add_argument("--steps", type=int, default=1500)
    b.add_argument("--batch", type=int, default=8, help="faces per identity per step")
    b.add_argument("--lr", type=float, default=1e-3)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    b.add_argument(
        "--input-colour",
        type=float,
        default=0.0,
        help="colour cast on the encoder's inputs only, targets clean (0: off)",
    )
    c = sub.add_parser("check", help="verify a file against the pinned fingerprint")
    c.add_argument("path", type=Path, nargs="?", default=ASSET)
    args = p.parse_args(argv)
    if args.cmd == "check":
        _, fp = read(args.path)
        print(f"ok: {args.path.name} fingerprint {fp}")
        return 0
    flags = list(argv if argv is not None else sys.argv[1:])
    command = "python -m facemux.models.demo_encoder " + shlex.join(flags)
    result = build(
        args.out,
        args.decoder_out,
        args.identities,
        args.faces,
        args.steps,
        args.batch,
        args.lr,
        args.seed,
        args.threads,
        command,
        args.input_colour,
    )
    print(json.dumps({k: v for k, v in result.items() if k != "summary"}, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
