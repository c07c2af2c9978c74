"""What each part of the training recipe costs per step, side by side in one run.

    python bench/train_recipe.py [--steps 10] [--rounds 3] [--threads 1] [--profile 5]

The demo's step (tiny preset, 2 identities, batch 8 each, synthetic faces with their masks)
under recipe variants: the plain step, the jobs' recipe (warm-up, clipping, latent critic),
each part alone, without loss masks, without the warp, and with the encoder frozen (how the
demo trains against the shipped encoder). The variants run interleaved, ``--rounds`` times
``--steps`` steps each; the fastest round of each is reported, in wall time and in this
process's CPU time (steadier when other work shares the cores: it does not count the time
the step waited for a core, but it does count threads spinning for each other), each as a
ratio to the plain step. ``--profile N``
adds torch's operator table over N steps of the jobs' recipe and of the frozen-encoder step.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
from facemux.models import synth
from facemux.models.config import get_preset
from facemux.models.networks import build_decoder, build_encoder
from facemux.models.pretrain import DEFAULT_LATENT_ADVERSARY, GRAD_CLIP
from facemux.models.trainer import TrainConfig, Trainer

JOBS = {"warmup_steps": 100, "grad_clip": GRAD_CLIP, "latent_adversary": DEFAULT_LATENT_ADVERSARY}
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "jobs recipe (warm-up + clip + critic)": JOBS,
    "clip only": {"grad_clip": GRAD_CLIP},
    "critic only": {"latent_adversary": DEFAULT_LATENT_ADVERSARY},
    "no loss masks": {"masks": False},
    "no warp": {"warp": False},
    "frozen encoder + warm-up + clip (demo)": {
        "encoder_lr": 0.0,
        "warmup_steps": 100,
        "grad_clip": GRAD_CLIP,
    },
    # torch's default on this machine is one intra-op thread per core; when other processes
    # hold the cores, each op waits for its slowest thread.
    "jobs recipe, 1 thread": {**JOBS, "threads": 1},
    "jobs recipe, 2 threads": {**JOBS, "threads": 2},
}


def make_trainer(
    data: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], variant: dict[str, Any]
) -> Trainer:
    kw = dict(variant)
    masked = kw.pop("masks", True)
    kw.pop("threads", None)
    cfg = get_preset("tiny")
    config = TrainConfig(
        steps=10**6, batch_size=8, lr=1e-3, seed=1, log_every=10**6, lr_schedule="cosine", **kw
    )
    decoders = {n: build_decoder(cfg, seed=2 + i) for i, n in enumerate(data)}
    return Trainer(
        build_encoder(cfg, seed=1), decoders, data, config, masks=masks if masked else None
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--faces", type=int, default=64, help="faces per identity")
    p.add_argument("--profile", type=int, default=0, metavar="N")
    args = p.parse_args()
    threads = args.threads if args.threads > 0 else torch.get_num_threads()
    data, masks = {}, {}
    for i, seed in enumerate((5, 4)):
        person = synth.identity_from_seed(seed)
        faces = [synth.render(person, s, 64) for s in synth.make_states(args.faces, seed=i)]
        data[f"id{i}"] = torch.from_numpy(np.stack([f.image for f in faces]))
        masks[f"id{i}"] = torch.from_numpy(np.stack([f.mask for f in faces]))
    trainers = {k: make_trainer(data, masks, v) for k, v in VARIANTS.items()}
    for k, t in trainers.items():
        torch.set_num_threads(VARIANTS[k].get("threads", threads))
        for _ in range(3):  # allocator and oneDNN warm-up
            t.step()
    times: dict[str, list[float]] = {k: [] for k in trainers}
    cpu: dict[str, list[float]] = {k: [] for k in trainers}
    for _ in range(args.rounds):
        for k, t in trainers.items():
            torch.set_num_threads(VARIANTS[k].get("threads", threads))
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                t.step()
            times[k].append((time.perf_counter() - t0) / args.steps)
            cpu[k].append((time.process_time() - c0) / args.steps)
    torch.set_num_threads(threads)
    base, cpu_base = min(times["plain"]), min(cpu["plain"])
    print(
        f"tiny, 2 identities x batch 8, {threads} thread(s) unless named; fastest of "
        f"{args.rounds} interleaved rounds of {args.steps} steps"
    )
    print(
        f"{'variant':42s} {'wall ms':>8s} {'faces/s':>8s} {'x plain':>8s} {'CPU ms':>8s} "
        f"{'x plain':>8s}"
    )
    for k, v in times.items():
        best, best_cpu = min(v), min(cpu[k])
        print(
            f"{k:42s} {best * 1000:8.1f} {16 / best:8.0f} {best / base:8.2f} "
            f"{best_cpu * 1000:8.1f} {best_cpu / cpu_base:8.2f}"
        )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for key in (
            "jobs recipe (warm-up + clip + critic)",
            "frozen encoder + warm-up + clip (demo)",
        ):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.profile):
                    trainers[key].step()
            print(f"\n{key}, {args.profile} steps")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


if __name__ == "__main__":
    main()
