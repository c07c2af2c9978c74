"""Distributed training: the job entry point under torchrun, 2 CPU processes with gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from facemux.models import synth
from facemux.models.pretrain import JobSpec, prepare_work_dir, read_events

pytestmark = pytest.mark.slow


def _torchrun(job_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "facemux.models.pretrain",
        f"--job-dir={job_dir}",
    ]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1")


def test_two_ranks_end_with_identical_weights(tmp_path: Path) -> None:
    data = {
        name: synth.make_dataset(synth.identity_from_seed(seed), 16, 64, seed=seed)[0]
        for name, seed in (("ann", 1), ("ben", 2))
    }
    spec = JobSpec(
        mode="pretrain",
        datasets=["ann", "ben"],
        preset="tiny",
        steps=12,
        batch_size=4,
        lr=1e-3,
        checkpoint_every=5,
        log_every=4,
        seed=5,
        device="cpu",
        threads=1,
    )
    prepare_work_dir(tmp_path, spec, data)
    out = subprocess.run(
        _torchrun(tmp_path), env=_env(), capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "succeeded" and result["step"] == 12
    assert result["summary"]["processes"] == 2
    rank0 = json.loads((tmp_path / "out" / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "out" / "rank1.json").read_text())
    # The latent critic (on by default in pretraining) must stay in step across ranks too.
    assert rank0 == rank1 and set(rank0) == {"encoder", "ann", "ben", ":critic"}
    assert rank0["encoder"] == result["encoder_fingerprint"]
    events, _ = read_events(tmp_path)
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [5, 10]
    assert "2 process(es)" in events[0]["message"]
    # The checkpoint holds the bare modules' weights, not DistributedDataParallel's wrappers.
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    names = [
        *state["encoder"],
        *state["critic"],
        *(k for d in state["decoders"].values() for k in d),
    ]
    assert names and not any(k.startswith("module.") for k in names)


def test_two_ranks_agree_when_the_mask_heads_have_nothing_to_learn(tmp_path: Path) -> None:
    """Without loss masks the decoders' mask heads get no gradient: the ranks must still
    average the rest and end equal."""
    data = {
        name: synth.make_dataset(synth.identity_from_seed(seed), 8, 64, seed=seed)[0]
        for name, seed in (("ann", 1), ("ben", 2))
    }
    spec = JobSpec(
        mode="pretrain",
        datasets=["ann", "ben"],
        steps=4,
        batch_size=2,
        log_every=2,
        seed=5,
        device="cpu",
        threads=1,
        loss_mask="none",
    )
    prepare_work_dir(tmp_path, spec, data)
    out = subprocess.run(
        _torchrun(tmp_path), env=_env(), capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "succeeded"
    rank0 = json.loads((tmp_path / "out" / "rank0.json").read_text())
    assert rank0 == json.loads((tmp_path / "out" / "rank1.json").read_text())


def test_out_of_memory_lowers_the_batch_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from facemux.models.pretrain import run_job
    from facemux.models.trainer import Trainer

    real_step = Trainer._train_step

    def step(self: Trainer) -> torch.Tensor:
        # Stands in for a CUDA allocator failure: batches over 2 do not fit.
        if self.config.batch_size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_step(self)

    monkeypatch.setattr(Trainer, "_train_step", step)
    data = {"ann": synth.make_dataset(synth.identity_from_seed(1), 8, 64, seed=1)[0]}
    spec = JobSpec(mode="pretrain", datasets=["ann"], steps=4, batch_size=8, log_every=2)
    prepare_work_dir(tmp_path, spec, data)
    result = run_job(tmp_path)
    assert result["status"] == "succeeded" and result["summary"]["batch_size"] == 2
    notes = [e.get("message", "") for e in read_events(tmp_path)[0]]
    assert "CUDA out of memory: batch size lowered to 4" in notes
    assert "CUDA out of memory: batch size lowered to 2" in notes
