"""Pretraining straight into a store, without a server: what the k8s pretraining Job runs
(`torchrun ... -m facemux.models.pretrain --store DIR --preset P`).

The work directory lives in the store (`Store.pretrain_dir`) so a Job restarted by
Kubernetes resumes from its checkpoint. Rank 0 publishes the encoder when it is done; the
servers waiting on an empty store pick it up. No grpc here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from facemux.models.errors import NotFoundError
from facemux.models.pretrain import JobSpec, prepare_work_dir, run_job
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
