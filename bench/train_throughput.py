"""Training throughput of the full job path against the bare training step.

    python bench/train_throughput.py [--mode identity] [--steps 300] [--batch 16]

Bare: the job's own Trainer (facemux.models.pretrain.make_trainer: the same schedule,
gradient clipping and loss mask) over pre-made tensors, `fit()` with no callbacks, one host
sync at the end. Job: the same model, batch, data and step count through the training
service's job manager: a spawned worker process running facemux.models.pretrain (work
directory, progress events, atomic checkpoints every --checkpoint-every steps), reaped and
registered. Reported are the job's
in-loop rate (what it sustains while training, as its events report it) and its end-to-end
rate (from submit to registered, with process start, loading and publishing). Target: the
in-loop ratio >= 0.8.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from facemux.models import checkpoint, synth
from facemux.models.config import get_preset
from facemux.models.networks import build_decoder, build_encoder
from facemux.models.pretrain import JobSpec, make_trainer
from facemux.service.training.jobs import SUCCEEDED, JobManager, JobRecord


def make_spec(
    mode: str,
    names: list[str],
    steps: int,
    batch: int,
    seed: int,
    every: int,
    threads: int,
    preset: str,
    device: str,
) -> JobSpec:
    return JobSpec(
        mode=mode,
        datasets=names,
        identity="bench" if mode == "identity" else "",
        preset=preset,
        steps=steps,
        batch_size=batch,
        lr=1e-4,
        checkpoint_every=every,
        log_every=10,
        seed=seed,
        device=device,
        threads=threads,
    )


def bare(spec: JobSpec, data: dict[str, Any], enc_bytes: bytes) -> float:
    """The job's own step (pretrain.make_trainer: same schedule, clipping and loss mask) in a
    loop over tensors already in memory, with one host sync at the end."""
    cfg = get_preset(spec.preset)
    if spec.mode == "identity":
        encoder, _ = checkpoint.load_encoder(enc_bytes)
    else:
        encoder = build_encoder(cfg, seed=spec.seed)
    decoders = {n: build_decoder(cfg, seed=spec.seed + 1 + i) for i, n in enumerate(data)}
    tensors = {n: torch.from_numpy(a) for n, a in data.items()}
    trainer = make_trainer(spec, encoder, decoders, tensors, spec.device)
    for _ in range(3):  # warm-up, as the job's first steps also are
        trainer.step()
    trainer.config.steps = spec.steps + 3
    trainer.config.log_every = trainer.config.steps
    sync(spec.device)
    start = time.perf_counter()
    trainer.fit()
    sync(spec.device)
    return spec.steps * spec.batch_size * len(data) / (time.perf_counter() - start)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def job(spec: JobSpec, data: dict[str, Any], enc_bytes: bytes) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        finished: dict[str, Any] = {}

        def finish(rec: JobRecord, work: Path, result: dict[str, Any]) -> tuple[int, str]:
            finished.update(result)
            return 0, str(result.get("encoder_fingerprint", ""))

        jobs = JobManager(Path(tmp), finish, worker_threads=spec.threads)
        start = time.perf_counter()
        rec = jobs.submit(
            spec,
            data,
            enc_bytes if spec.mode == "identity" else None,
            spec.identity,
            {},
            {},
        )
        while jobs.get(rec.id).state not in ("succeeded", "failed", "cancelled"):
            jobs.wait_changed(0.2)
        wall = time.perf_counter() - start
        final = jobs.get(rec.id)
        jobs.close()
        if final.state != SUCCEEDED:
            raise SystemExit(f"job {final.state}: {final.error}")
        in_loop = float(json.loads(json.dumps(finished["summary"]))["examples_per_s"])
        return in_loop, spec.steps * spec.batch_size * len(data) / wall


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--mode", choices=["identity", "pretrain"], default="identity")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--faces", type=int, default=64)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument(
        "--checkpoint-min-seconds",
        type=float,
        default=0.0,
        help="also at most one checkpoint per this many seconds (Train's default: 10)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    names = ["ann"] if args.mode == "identity" else ["ann", "ben"]
    cfg = get_preset(args.preset)
    size = cfg.resolution
    data = {
        n: synth.make_dataset(synth.identity_from_seed(10 + i), args.faces, size, seed=i)[0]
        for i, n in enumerate(names)
    }
    enc_bytes, _ = checkpoint.encoder_to_bytes(build_encoder(cfg, seed=args.seed), cfg)

    # Bare before and after the job, averaged: on a shared machine the load drifts, and
    # bracketing the job keeps that drift out of the ratio as far as one run can.
    spec = make_spec(
        args.mode,
        names,
        args.steps,
        args.batch,
        args.seed,
        args.checkpoint_every,
        threads,
        args.preset,
        args.device,
    )
    spec.checkpoint_min_seconds = args.checkpoint_min_seconds
    before = bare(spec, data, enc_bytes)
    rate_loop, rate_e2e = job(spec, data, enc_bytes)
    after = bare(spec, data, enc_bytes)
    rate_bare = (before + after) / 2
    print(
        f"{args.preset} preset on {args.device}, {args.mode} mode, batch {args.batch}/identity, "
        f"{args.steps} steps,"
    )
    floor = f" (at most one per {args.checkpoint_min_seconds:g} s)" * bool(
        args.checkpoint_min_seconds
    )
    print(f"{threads} torch thread(s), checkpoint every {args.checkpoint_every} steps{floor}")
    print(
        f"  bare training step       {rate_bare:8.1f} examples/s  "
        f"({before:.1f} before the job, {after:.1f} after)"
    )
    print(
        f"  job, in the loop         {rate_loop:8.1f} examples/s  ratio {rate_loop / rate_bare:.2f}"
    )
    print(
        f"  job, submit->registered  {rate_e2e:8.1f} examples/s  ratio {rate_e2e / rate_bare:.2f}"
    )
    verdict = "meets" if rate_loop / rate_bare >= 0.8 else "misses"
    print(f"summary: job/bare = {rate_loop / rate_bare:.2f} ({verdict} the 0.8 target)")


if __name__ == "__main__":
    main()
