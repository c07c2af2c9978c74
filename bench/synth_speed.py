"""How many synthetic faces per second facemux.models.synth renders on one core.

    python bench/synth_speed.py [--size 64] [--n 1000]

Speed lives here rather than in the tests: timings depend on the machine and its load.
The target is at least 200 faces/s at 64 px.
"""

from __future__ import annotations

import argparse
import time

import cv2
from facemux.models.synth import identity_from_seed, make_states, render


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", type=int, default=64, help="crop size in pixels")
    parser.add_argument("--n", type=int, default=1000, help="faces to render")
    parser.add_argument("--identities", type=int, default=20, help="distinct identities")
    args = parser.parse_args(argv)

    # One core: the renderer is single-threaded numpy; keep OpenCV from spreading resizes.
    cv2.setNumThreads(1)
    identities = [identity_from_seed(s) for s in range(args.identities)]
    states = make_states(args.n, seed=0)
    # Warm up: per-identity models are built once and cached; that is not the steady state.
    for ident in identities:
        render(ident, states[0], args.size)

    start = time.perf_counter()
    for i, state in enumerate(states):
        render(identities[i % len(identities)], state, args.size)
    elapsed = time.perf_counter() - start
    print(
        f"synth.render: {args.n / elapsed:.0f} faces/s at {args.size} px "
        f"({1000 * elapsed / args.n:.2f} ms/face, {args.n} faces, 1 OpenCV thread)"
    )


if __name__ == "__main__":
    main()
