"""pytest hooks. The fixtures live in common.py, registered here only in processes that run
tests: pytest-xdist's controller runs none, and would otherwise import torch and build
nothing with it before it starts the workers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's, absent without it
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (pyproject's addopts): one worker more than the cores. Many tests spend
    part of their time waiting on sockets, child processes and sleeps, and a third worker
    on 2 cores fills that: 119-123 s for the suite against 126-130 s with two, back to
    back on an idle 2-core machine."""
    return len(os.sched_getaffinity(0)) + 1 if hasattr(os, "sched_getaffinity") else 3


def pytest_configure(config: pytest.Config) -> None:
    controller = bool(config.getoption("numprocesses", None)) and not os.environ.get(
        "PYTEST_XDIST_WORKER"
    )
    if not controller:
        pytest.register_assert_rewrite("common")
        config.pluginmanager.import_plugin("common")


def pytest_unconfigure(config: pytest.Config) -> None:
    # The test process (each xdist worker too) exits without walking torch's objects in the
    # interpreter's last collections, as facemux's own entry points do (client/cli.py).
    import gc

    gc.freeze()


# The longest modules first (their tests' summed durations on 2 cores, longest first):
# pytest-xdist hands whole modules to its workers in collection order (--dist loadscope,
# with --no-loadscope-reorder: its own reordering, by number of tests, put the longest
# modules last), and a long module handed out last leaves one worker running it alone
# after the others have finished.
LONGEST_FIRST = (
    "test_training",
    "test_trainer",
    "test_ddp",
    "test_demo",
    "test_frames",
    "test_provenance",
    "test_faults",
    "test_auth_hardening",
    "test_load",
    "test_metrics",
    "test_faces",
    "test_scheduler",
    "test_progress",
    "test_store_races",
    "test_shutdown",
    "test_torchserve",
    "test_memory",
    "test_processes",
    "test_consent_jobs",
    "test_cli",
    "test_lifecycle",
    "test_tensor_path",
    "test_export",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    # A stable sort: within a module, and among the modules not named, the order stays.
    items.sort(key=lambda item: rank.get(Path(item.nodeid.split("::")[0]).stem, len(rank)))
