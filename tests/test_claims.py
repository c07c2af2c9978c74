"""Job claims between servers sharing one store (service/training/claims.py), and what the
job manager does with them, on real files and real processes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from facemux.models import synth
from facemux.models.pretrain import JobSpec
from facemux.service.training.claims import Claims
from facemux.service.training.jobs import JobManager, JobRecord


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_one_owner_at_a_time_and_a_late_takeover_puts_a_fresh_claim_back(tmp_path: Path) -> None:
    a, b = Claims(lease_s=60), Claims(lease_s=60)
    try:
        assert a.claim(tmp_path) and a.holds(tmp_path)
        assert not b.claim(tmp_path)  # a lives (in this process): never stale
        assert a.refresh(tmp_path) and not b.refresh(tmp_path)
        a.release(tmp_path)
        assert Claims.holder(tmp_path) is None
        assert b.claim(tmp_path)
        # A server that judged an earlier owner's claim stale, and renames only after b took
        # it over, must not keep b's claim: it puts it back and gives up.
        assert not a._take_aside(tmp_path, expect_owner="gone:1:x")
        assert b.holds(tmp_path) and not a.holds(tmp_path)
        # Release by a non-holder leaves the holder's claim alone.
        a.release(tmp_path)
        assert b.holds(tmp_path)
    finally:
        a.close()
        b.close()


def test_a_dead_owner_on_this_host_is_replaced_at_once_and_a_remote_one_after_the_lease(
    tmp_path: Path,
) -> None:
    now = [0.0]
    c = Claims(lease_s=60, clock=lambda: now[0])
    try:
        here = json.loads(json.dumps(c._me)) | {"owner": "old", "pid": _dead_pid(), "beat": 3}
        (tmp_path / "claim").write_text(json.dumps(here))
        assert c.claim(tmp_path)  # same machine and PID namespace, process gone
        remote = {"owner": "far", "host": "elsewhere", "pid": 1, "beat": 1}
        (tmp_path / "claim").write_text(json.dumps(remote))
        assert not c.claim(tmp_path)
        now[0] += 30
        assert not c.claim(tmp_path)  # seen unchanged for less than a lease
        remote["beat"] = 2  # the owner beats: the timer starts again
        (tmp_path / "claim").write_text(json.dumps(remote))
        assert not c.claim(tmp_path)
        now[0] += 35
        assert not c.claim(tmp_path)
        now[0] += 35
        assert c.claim(tmp_path) and c.holds(tmp_path)
    finally:
        c.close()


def test_a_run_that_finished_under_a_dead_owner_is_registered_not_rerun(tmp_path: Path) -> None:
    finished: list[tuple[str, str]] = []

    def finish(rec: JobRecord, work: Path, result: dict[str, Any]) -> tuple[int, str]:
        finished.append((rec.id, result["status"]))
        return 1, ""

    faces = synth.make_dataset(synth.identity_from_seed(2), 4, 64, seed=2)[0]
    spec = JobSpec(mode="pretrain", datasets=["ann"], steps=2, batch_size=2)
    root = tmp_path / "jobs"
    dead = JobManager(root, finish, max_running=0)
    rec = dead.submit(spec, {"ann": np.asarray(faces)}, None, "", {}, {})
    dead._stop.set()
    dead._thread.join()
    dead.claims.close()
    work = root / rec.id
    # Its server ran it to the end and died before registering it.
    claim = json.loads((work / "claim").read_text()) | {"pid": _dead_pid()}
    (work / "claim").write_text(json.dumps(claim))
    (work / "result.json").write_text(json.dumps({"status": "succeeded", "step": 2}))
    successor = JobManager(root, finish, poll_s=0.05)
    try:
        deadline = time.monotonic() + 20
        while successor.get(rec.id).state != "succeeded" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert successor.get(rec.id).state == "succeeded"
        assert finished == [(rec.id, "succeeded")]
        assert not (work / "events.jsonl").exists() or all(
            "started" not in line for line in (work / "events.jsonl").read_text().splitlines()
        )
        assert not (work / "claim").exists()
    finally:
        successor.close()
