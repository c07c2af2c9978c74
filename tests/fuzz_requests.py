"""atheris harness over the same targets as tests/test_fuzz.py, for long coverage-guided runs.

    python tests/fuzz_requests.py latent -max_total_time=3600
    mkdir -p corpus/png
    python tests/fuzz_requests.py encoded_image corpus/png -max_total_time=600
    python tests/fuzz_requests.py all -runs=20000        # every target, round robin

A finding stops the run with the input saved as crash-<sha1> (libFuzzer's own behaviour).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import atheris
import cv2  # noqa: F401  (heavy dependencies load uninstrumented: coverage is ours)
import numpy  # noqa: F401
import torch  # noqa: F401

with atheris.instrument_imports(include=["facemux", "fuzz_targets"]):
    from fuzz_targets import TARGETS, run_one, seeds

NAMES = sorted(TARGETS)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in (*NAMES, "all"):
        sys.exit(f"usage: fuzz_requests.py {{{'|'.join(NAMES)}|all}} [libFuzzer flags]")
    which = sys.argv.pop(1)
    seeds()  # built before fuzzing starts (imports torch, renders seeds)
    corpus = [Path(a) for a in sys.argv[1:] if not a.startswith("-")]
    if corpus and which != "all" and not any(corpus[0].iterdir()):
        # Start from valid inputs: mutations of a real PNG or checkpoint reach deeper code.
        from test_fuzz import SEED_FOR, _seed

        for name in SEED_FOR.get(which, ()):
            (corpus[0] / f"seed-{name}").write_bytes(_seed(name))

    def one(data: bytes) -> None:
        if which == "all":
            if not data:
                return
            run_one(NAMES[data[0] % len(NAMES)], data[1:])
        else:
            run_one(which, data)

    atheris.Setup(sys.argv, one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
