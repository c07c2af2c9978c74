"""Intra-op threads: the thread that runs the model's batches keeps the process's OpenMP
team; threads that start computing after it use one, so no second team competes for the
cores (models/inference.own_intra_op_threads)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Run in a child process: the function changes the default of the whole process it runs in.
SCRIPT = """
import json, os, sys, threading, time, torch
from facemux.models import inference

torch.set_num_threads(2)  # the process default, whatever OMP_NUM_THREADS the test runs under
asked = int(sys.argv[1])
seen = {}

def tasks():
    return len(os.listdir("/proc/self/task"))

def settled():
    # Helper threads joined a moment ago may still be leaving /proc/self/task.
    n = tasks()
    while True:
        time.sleep(0.05)
        m = tasks()
        if m == n:
            return n
        n = m

def later():
    seen["later"] = torch.get_num_threads()
    before = settled()
    torch.ones(1 << 21).add_(1)  # large enough that a team of 2 would split it
    seen["later_new_threads"] = tasks() - before
    # Work timed as the batch thread runs (the layout trial, the warm-up): on its threads,
    # in a thread whose team ends with it.
    seen["timed"] = inference.on_threads(2, torch.get_num_threads)
    seen["after_timed"] = inference.default_threads()
    # The timed thread's team leaves as the thread ends, a moment after the join.
    give_up = time.monotonic() + 10
    while tasks() > before and time.monotonic() < give_up:
        time.sleep(0.01)
    seen["tasks_after_timed"] = tasks() - before
    try:
        inference.on_threads(2, lambda: 1 / 0)
    except ZeroDivisionError:
        seen["raised"] = True

def owner():
    seen["given"] = inference.own_intra_op_threads(asked)
    seen["owner"] = torch.get_num_threads()
    t = threading.Thread(target=later)
    t.start()
    t.join()
    seen["owner_after"] = torch.get_num_threads()

o = threading.Thread(target=owner)
o.start()
o.join()
print(json.dumps(seen))
"""


@pytest.mark.parametrize(("asked", "given"), [(0, 2), (3, 3)])
def test_the_batch_thread_keeps_its_team_and_later_threads_compute_alone(
    asked: int, given: int
) -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(asked)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["given"] == seen["owner"] == seen["owner_after"] == given
    assert seen["later"] == 1
    assert seen["later_new_threads"] == 0  # no OpenMP team of its own
    assert seen["timed"] == 2
    assert seen["after_timed"] == 1
    assert seen["tasks_after_timed"] == 0  # the timed thread's team ended with it
    assert seen["raised"] is True
