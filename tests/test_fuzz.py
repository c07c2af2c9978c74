"""Bounded fuzzing of request decoding and validation (Hypothesis; seconds in CI).

The same targets run for hours under atheris: `python tests/fuzz_requests.py TARGET
-max_total_time=3600` (see the README's Security section). FACEMUX_FUZZ_EXAMPLES raises the
number of examples per target here.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
from facemux.v1 import types_pb2 as tpb
from fuzz_targets import TARGETS, run_one, seeds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("FACEMUX_FUZZ_EXAMPLES", "120"))

SEED_FOR = {
    "encoded_image": ("png", "jpeg", "webp"),
    "image_message": ("image_message",),
    "latent": ("latent",),
    "decoder_checkpoint": ("decoder",),
    "upload_prefix": ("decoder",),
    "landmarks": ("opts",),
}


def _seed(name: str) -> bytes:
    if name == "image_message":
        return tpb.Image(encoded=seeds()["png"]).SerializeToString()
    return seeds()[name]


@st.composite
def mutated(draw: st.DrawFn, names: tuple[str, ...]) -> bytes:
    """A valid seed with a few edits: byte flips, truncation, insertion, duplication."""
    data = bytearray(_seed(draw(st.sampled_from(names))))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "dup", "int"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "dup":
            data[i:i] = data[i : i + draw(st.integers(1, 64))]
        elif op == "int" and len(data) >= i + 4:  # a length or dimension field gone wild
            data[i : i + 4] = draw(
                st.sampled_from([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\x00\x00"])
            )
    return bytes(data)


@st.composite
def nested_json(draw: st.DrawFn) -> bytes:
    """JSON-ish text nested up to 100 000 deep (a recursive parser's stack overflow),
    brackets hidden in strings, escapes, unbalanced or mixed closers."""
    opener = draw(st.sampled_from([b"[", b'{"a":', b'["[{\\"', b'{"\\"":[']))
    depth = draw(st.sampled_from([1, 63, 64, 65, 999, 100_000]))
    middle = draw(st.sampled_from([b"1", b'"]]]"', b"", b'"\\"', b"{}"]))
    closer = draw(st.sampled_from([b"]", b"}", b"]}"]))
    cut = draw(st.integers(0, 3))
    return (opener * depth + middle + closer * (depth - cut))[: draw(st.integers(1, 1 << 21))]


def _inputs(target: str) -> st.SearchStrategy[bytes]:
    raw = st.binary(max_size=2048)
    if target in ("checkpoint_header", "callers_file"):
        return st.one_of(raw, nested_json())
    if target in SEED_FOR:
        return st.one_of(raw, mutated(SEED_FOR[target]))
    return raw


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_target(target: str) -> None:
    seeds()  # build seeds outside the timed examples

    @settings(
        max_examples=EXAMPLES,
        deadline=timedelta(seconds=5),  # a hang shows up as a deadline failure
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
        derandomize=True,
    )
    @given(_inputs(target))
    def run(data: bytes) -> None:
        run_one(target, data)

    run()
