"""Pretraining straight into a store, without a server: what the k8s pretraining Job runs::

    torchrun --nproc-per-node=4 -m facemux.service.training.standalone --store DIR --preset P

The work directory lives in the store (`Store.pretrain_dir`) so a Job restarted by
Kubernetes resumes from its checkpoint. Rank 0 publishes the encoder when it is done; the
servers waiting on an empty store pick it up. No grpc here.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path
from typing import Any

from facemux.models.errors import NotFoundError
from facemux.models.pretrain import DEFAULT_LR, JobSpec, prepare_work_dir, run_job
from facemux.service.settings import Settings
from facemux.service.store import LocalStore
from facemux.service.training.datasets import DatasetStore


def pretrain_into_store(
    store_dir: Path,
    preset: str,
    datasets: list[str],
    steps: int,
    batch_size: int,
    lr: float,
) -> dict[str, Any]:
    rank = int(os.environ.get("RANK", "0"))
    store = LocalStore(store_dir)
    work = store.pretrain_dir(preset)
    if not (work / "spec.json").exists():
        if rank == 0:
            ds = DatasetStore(store.datasets_dir(), Settings(store=store_dir))
            names = datasets or [d.name for d in ds.list_all()]
            if not names:
                raise NotFoundError(f"the store at {store_dir} has no datasets to pretrain on")
            spec = JobSpec(
                mode="pretrain",
                datasets=names,
                preset=preset,
                steps=steps,
                batch_size=batch_size,
                lr=lr,
            )
            prepare_work_dir(
                work,
                spec,
                {n: ds.load(n) for n in names},
                landmarks={n: ds.load_landmarks(n) for n in names},
            )
        else:
            import time

            # Other ranks wait for rank 0 to lay out the shared work directory.
            while not (work / "spec.json").exists():
                time.sleep(1)
    result = run_job(work)
    if rank == 0 and result.get("status") == "succeeded" and result.get("encoder"):
        data = (work / result["encoder"]).read_bytes()
        store.put_encoder(data, result["encoder_fingerprint"], make_default=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m facemux.service.training.standalone",
        description="Pretrain on a store's datasets and publish the encoder there "
        "(torchrun-ready; resumes from <store>/pretrain/<preset>).",
    )
    p.add_argument("--store", required=True, help="the servers' store directory")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--datasets", default="", help="comma-separated; default: all datasets")
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=DEFAULT_LR)
    args = p.parse_args(argv)
    result = pretrain_into_store(
        Path(args.store),
        args.preset,
        [d for d in args.datasets.split(",") if d],
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
    )
    print(json.dumps({k: v for k, v in result.items() if k != "summary"}, sort_keys=True))
    gc.freeze()  # torch's objects outlive the job: the collections at exit need not walk them
    return 0 if result.get("status") in ("succeeded", "paused", "cancelled") else 1


if __name__ == "__main__":
    raise SystemExit(main())
