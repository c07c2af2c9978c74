"""Swap quality of the training path, against ground truth, on synthetic faces.

    python bench/quality.py [--identities 4] [--pretrain-steps 3000] [--identity-steps 2000]

1. Pretrain (facemux.models.pretrain, pretrain mode) a tiny encoder with one decoder per K
   synthetic identities.
2. Add a new identity in identity mode (frozen encoder) from its faces only.
3. On held-out states, for every ordered pair (A, B) of the K+1 identities, swap A->B and
   compare with the ground truth, B rendered in A's state, inside the face (the synthetic
   mask of the truth): SSIM and PSNR. Two baselines: the unswapped input (A in that state)
   and B's decoder fed a random other state of B (right person, wrong pose/expression).
   A swap "wins" a pair when its mean SSIM and PSNR both beat both baselines.
4. For scale, each identity's own held-out faces through its own decoder (the ceiling a swap
   could reach with this model and budget).

Training goes through the same job entry point as the training service (its loss mask,
cosine schedule, latent critic). The default run takes about 12 minutes on 2 CPU cores; it
prints the table and a summary line.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from facemux.models import checkpoint, pretrain, synth
from facemux.models.pixels import to_uint8
from facemux.models.pretrain import (
    DEFAULT_LATENT_ADVERSARY,
    JobSpec,
    prepare_work_dir,
    run_job,
)
from facemux.models.scores import face_scores


def to_images(x: torch.Tensor) -> np.ndarray:
    return to_uint8(x.permute(0, 2, 3, 1).numpy())


def fit_budget(
    work: Path,
    args: argparse.Namespace,
    names: list[str],
    train: dict[str, np.ndarray],
    common: dict[str, Any],
) -> tuple[int, int]:
    """(pretrain, identity) steps, 3:2, that train for about args.budget_seconds.

    A 100-step pretrain probe measures the in-loop step time; an identity-mode step trains one
    decoder where pretraining trains K, so it is costed at 1/K of a pretrain step.
    """
    probe = JobSpec(
        mode="pretrain",
        preset=args.preset,
        datasets=names,
        steps=100,
        log_every=50,
        seed=args.seed,
        **common,
    )
    prepare_work_dir(work, probe, {n: train[n] for n in names})
    res = run_job(work)
    assert res["status"] == "succeeded", res
    step_s = args.batch * len(names) / float(res["summary"]["examples_per_s"])
    unit = args.budget_seconds / (step_s * (3 + 2 / len(names)))
    print(f"probe: {step_s * 1000:.1f} ms per pretrain step ({args.device} device)")
    return max(100, int(3 * unit)), max(100, int(2 * unit))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--identities", type=int, default=4, help="K identities to pretrain on")
    p.add_argument("--faces", type=int, default=512, help="training faces per identity")
    p.add_argument("--pretrain-steps", type=int, default=3000)
    p.add_argument("--identity-steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--preset", default="tiny")
    p.add_argument(
        "--loss-mask",
        default="landmarks",
        choices=("template", "landmarks", "none"),
        help="the jobs' loss mask; with 5-point landmarks, 'landmarks' is the template",
    )
    p.add_argument("--loss-emphasis", default="eyes_mouth", choices=("eyes_mouth", "none"))
    p.add_argument(
        "--latent-adversary",
        type=float,
        default=DEFAULT_LATENT_ADVERSARY,
        help="pretraining's identity-confusion weight (0: no latent critic)",
    )
    p.add_argument(
        "--landmark-points",
        type=int,
        default=5,
        choices=(5, 68),
        help="landmarks the training faces keep (5: the default server's model)",
    )
    p.add_argument("--held-out", type=int, default=16, help="test states per pair")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="where the jobs train: auto, cpu or cuda")
    p.add_argument(
        "--budget-seconds",
        type=float,
        default=0.0,
        help="instead of the step counts: time a short probe job, then size both jobs "
        "(3:2 steps) to train for about this many seconds together",
    )
    p.add_argument(
        "--keep",
        metavar="DIR",
        help="keep the pretraining job in DIR and reuse it on a later run with the same "
        "settings (to try identity-mode changes without pretraining again)",
    )
    args = p.parse_args(argv)
    if args.keep and args.budget_seconds > 0:
        p.error("--keep needs fixed step counts: --budget-seconds sizes them anew every run")
    t0 = time.perf_counter()
    k = args.identities
    names = [f"id{i}" for i in range(k)]
    new = "newcomer"
    people = {n: synth.identity_from_seed(100 + i) for i, n in enumerate([*names, new])}

    # Faces and their landmarks, as photos uploaded to a server keep them (5 points by
    # default, 68 with --landmark-points 68).
    rendered_train = {
        n: [synth.render(people[n], s, 64) for s in synth.make_states(args.faces, 1000 + i)]
        for i, n in enumerate(people)
    }
    train = {n: np.stack([r.image for r in rs]) for n, rs in rendered_train.items()}
    marks = {
        n: [r.landmarks5 if args.landmark_points == 5 else r.landmarks68 for r in rs]
        for n, rs in rendered_train.items()
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        common = {
            "batch_size": args.batch,
            "lr": args.lr,
            "checkpoint_every": 500,
            "loss_mask": args.loss_mask,
            "loss_emphasis": args.loss_emphasis,
            "latent_adversary": args.latent_adversary,
            "device": args.device,
        }
        if args.budget_seconds > 0:
            args.pretrain_steps, args.identity_steps = fit_budget(
                work / "probe", args, names, train, common
            )
            t0 = time.perf_counter()  # the probe is not part of the training time
        spec = JobSpec(
            mode="pretrain",
            preset=args.preset,
            datasets=names,
            steps=args.pretrain_steps,
            log_every=50,
            seed=args.seed,
            **common,
        )
        pre = work / "pre"
        reused_s: float | None = None
        if args.keep:
            # The training code is part of the key: a change to it must not reuse old runs.
            code = sorted(Path(pretrain.__file__).parent.parent.rglob("*.py"))
            settings = [
                dataclasses.asdict(spec),
                args.faces,
                args.landmark_points,
                [hashlib.sha256(f.read_bytes()).hexdigest() for f in code],
            ]
            digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
            pre = Path(args.keep) / f"pretrain-{digest}"
        done = pre / "result.json"
        if done.exists() and json.loads(done.read_text()).get("status") == "succeeded":
            res = json.loads(done.read_text())
            reused_s = float(res["summary"]["wall_s"])
            print(f"pretraining reused from {pre} (trained in {reused_s:.0f}s)")
        else:
            prepare_work_dir(
                pre, spec, {n: train[n] for n in names}, landmarks={n: marks[n] for n in names}
            )
            res = run_job(pre)
            assert res["status"] == "succeeded", res
        t_pre = time.perf_counter() - t0
        t_id0 = time.perf_counter()
        if reused_s is not None:
            t_pre = reused_s  # the table reports how long the pretraining took to train
        enc_bytes = (pre / res["encoder"]).read_bytes()
        spec = JobSpec(
            mode="identity",
            identity=new,
            datasets=[new],
            steps=args.identity_steps,
            log_every=50,
            seed=args.seed,
            **common,
        )
        prepare_work_dir(work / "id", spec, {new: train[new]}, enc_bytes, {new: marks[new]})
        res_id = run_job(work / "id")
        assert res_id["status"] == "succeeded", res_id
        t_id = time.perf_counter() - t_id0
        encoder, _ = checkpoint.load_encoder(enc_bytes)
        decoders = {
            n: checkpoint.load_decoder((pre / rel).read_bytes())[0]
            for n, rel in res["decoders"].items()
        }
        decoders[new] = checkpoint.load_decoder(
            (work / "id" / res_id["decoders"][new]).read_bytes()
        )[0]

    held = synth.make_states(args.held_out, seed=987_654)  # never used in training
    rng = np.random.default_rng(args.seed)
    rendered = {n: [synth.render(people[n], s, 64) for s in held] for n in people}

    def run(name: str, imgs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
            return to_images(decoders[name](encoder(x))[0])

    rows = []
    ceiling = {}
    for a in people:
        src = np.stack([r.image for r in rendered[a]])
        own = run(a, src)
        ceiling[a] = np.mean(
            [face_scores(own[i], r.image, r.mask) for i, r in enumerate(rendered[a])], axis=0
        )
        for b in people:
            if a == b:
                continue
            swapped = run(b, src)
            others = rng.permutation(len(held))
            others = np.where(others == np.arange(len(held)), (others + 1) % len(held), others)
            other_state = run(b, np.stack([rendered[b][j].image for j in others]))
            scores = {"swap": [], "input": [], "other_state": []}  # type: dict[str, list]
            for i, truth in enumerate(rendered[b]):
                for key, pred in (
                    ("swap", swapped[i]),
                    ("input", src[i]),
                    ("other_state", other_state[i]),
                ):
                    scores[key].append(face_scores(pred, truth.image, truth.mask))
            mean = {key: np.mean(v, axis=0) for key, v in scores.items()}
            wins = all(
                mean["swap"][m] > mean[base][m] for base in ("input", "other_state") for m in (0, 1)
            )
            rows.append((a, b, mean, wins))

    print(
        f"{args.preset} preset, lr {args.lr:g}, loss mask {args.loss_mask}, emphasis "
        f"{args.loss_emphasis}, {args.landmark_points}-point landmarks, latent adversary "
        f"{args.latent_adversary:g}; pretrain {k} "
        f"identities x {args.faces} faces, {args.pretrain_steps} steps "
        f"({t_pre:.0f}s); {new} added in identity mode, {args.identity_steps} steps ({t_id:.0f}s); "
        f"{args.held_out} held-out states per pair; face-region SSIM / PSNR dB"
    )
    print(f"{'A -> B':22s} {'swap':>14s} {'unswapped':>14s} {'B other state':>14s}  wins")
    for a, b, mean, wins in rows:
        cells = " ".join(
            f"{mean[k][0]:.3f}/{mean[k][1]:5.2f}" for k in ("swap", "input", "other_state")
        )
        print(f"{a + ' -> ' + b:22s} {cells}  {'yes' if wins else 'no'}")
    print(
        "own decoder (ceiling): "
        + ", ".join(f"{n} {v[0]:.3f}/{v[1]:.2f}" for n, v in ceiling.items())
    )
    frac = sum(r[3] for r in rows) / len(rows)
    per_metric = {
        f"{metric}_beats_{base}": round(
            float(np.mean([r[2]["swap"][m] > r[2][base][m] for r in rows])), 3
        )
        for base in ("input", "other_state")
        for m, metric in ((0, "ssim"), (1, "psnr"))
    }
    to_new = [r for r in rows if r[1] == new]
    frac_new = sum(r[3] for r in to_new) / len(to_new)
    avg = {
        key: np.mean([r[2][key] for r in rows], axis=0) for key in ("swap", "input", "other_state")
    }
    summary = {
        "pairs": len(rows),
        "swap_beats_both_fraction": round(frac, 3),
        "to_newcomer_fraction": round(frac_new, 3),
        "mean_ssim": {key: round(float(v[0]), 4) for key, v in avg.items()},
        "mean_psnr": {key: round(float(v[1]), 2) for key, v in avg.items()},
        "own_decoder_mean": [
            round(float(np.mean([v[0] for v in ceiling.values()])), 4),
            round(float(np.mean([v[1] for v in ceiling.values()])), 2),
        ],
        "per_metric": per_metric,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(f"summary: {json.dumps(summary, sort_keys=True)}")


if __name__ == "__main__":
    main()
