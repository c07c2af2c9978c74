"""The `facemux` command line against a real server, as a user would type it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from common import CONSENT, Models, decode_png, face_image, png
from facemux.service.server import ServerThread

FACEMUX = str(Path(sys.executable).parent / "facemux")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FACEMUX, *args], capture_output=True, text=True, timeout=120)


def test_identity_commands(server: ServerThread, models: Models, tmp_path: Path) -> None:
    t = ["--target", server.target]
    ckpt = tmp_path / "carol.safetensors"
    ckpt.write_bytes(models.decoders["carol"])
    r = run("identities", "register", "carol", str(ckpt), "--display-name", "Carol", *t)
    assert r.returncode == 2 and "consent record is required" in r.stderr
    consent = json.dumps(CONSENT)
    r = run(
        "identities",
        "register",
        "carol",
        str(ckpt),
        "--display-name",
        "Carol",
        *t,
        "--consent",
        consent,
    )
    assert r.returncode == 0, r.stderr
    assert "registered carol v1" in r.stdout
    r = run("identities", "list", *t)
    assert [line.split("\t")[0] for line in r.stdout.splitlines()] == ["alice", "bob", "carol"]
    r = run("identities", "get", "carol", *t)
    assert json.loads(r.stdout)["displayName"] == "Carol"
    r = run("identities", "delete", "carol", *t)
    assert r.returncode == 0 and "deleted identity carol [1]" in r.stdout
    r = run("identities", "get", "carol", *t)
    assert r.returncode == 2 and "NOT_FOUND" in r.stderr and "carol" in r.stderr


def test_consent_commands(server: ServerThread) -> None:
    t = ["--target", server.target]
    r = run("identities", "revoke", "bob", "--reason", "withdrawn", *t)
    assert r.returncode == 0 and "consent of bob revoked at" in r.stdout, r.stderr
    fresh = json.dumps({**CONSENT, "evidence_ref": "TICKET-9"})
    r = run("identities", "consent", "bob", "--consent", fresh, *t)
    assert r.returncode == 0, r.stderr
    assert "consent of bob recorded: attested by qa@example.com" in r.stdout
    assert "(1 earlier)" in r.stdout
    r = run("identities", "consent", "bob", "--consent", '{"attested_by": "x"}', *t)
    assert r.returncode == 2 and "INVALID_ARGUMENT" in r.stderr and "evidence_ref" in r.stderr


@pytest.mark.unmarked_outputs
def test_swap_encode_decode_commands(server: ServerThread, tmp_path: Path) -> None:
    t = ["--target", server.target]
    inputs = []
    for i in range(2):
        p = tmp_path / f"face{i}.png"
        p.write_bytes(png(face_image(i, 96)))
        inputs.append(str(p))
    out = tmp_path / "out"
    r = run("swap", *inputs, "--identity", "bob", "--aligned", "-o", str(out), *t)
    assert r.returncode == 0, r.stderr
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["face0_swapped.png", "face1_swapped.png"]
    assert decode_png(files[0].read_bytes()).shape == (64, 64, 3)

    single = tmp_path / "one.jpg"
    r = run(
        "swap",
        inputs[0],
        "--identity",
        "bob",
        "--aligned",
        "--format",
        "jpeg",
        "-o",
        str(single),
        *t,
    )
    assert r.returncode == 0 and single.read_bytes()[:3] == b"\xff\xd8\xff"

    lat = tmp_path / "z.npz"
    r = run("encode", *inputs, "-o", str(lat), *t)
    assert r.returncode == 0, r.stderr
    with np.load(lat) as f:
        assert f["latents"].shape[0] == 2
    dec = tmp_path / "dec"
    r = run("decode", str(lat), "--identity", "bob", "-o", str(dec), *t)
    assert r.returncode == 0, r.stderr
    # Decoding the encoded latents gives exactly what swap gave.
    assert (dec / "decoded_0000.png").read_bytes() == files[0].read_bytes()


def test_info_health_and_errors(server: ServerThread) -> None:
    t = ["--target", server.target]
    r = run("info", *t)
    assert r.returncode == 0 and json.loads(r.stdout)["preset"] == "tiny"
    r = run("health", *t)
    assert r.returncode == 0 and r.stdout.strip() == "SERVING"
    r = run("swap", "/nonexistent.png", "--identity", "bob", "--aligned", *t)
    assert r.returncode == 2 and "No such file" in r.stderr


def test_consent_json_mistakes_are_named(
    server: ServerThread, models: Models, tmp_path: Path
) -> None:
    t = ["--target", server.target]
    ckpt = tmp_path / "carol.safetensors"
    ckpt.write_bytes(models.decoders["carol"])
    r = run("identities", "register", "carol", str(ckpt), "--consent", '{"subject": "x"}', *t)
    assert r.returncode == 2
    assert "consent has no field 'subject'; its fields are attested_by, evidence_ref" in r.stderr
    r = run("train", "ds", "--identity", "carol", "--consent", "{attested_by: x}", *t)
    assert r.returncode == 2 and "--consent is not valid JSON" in r.stderr
    r = run("train", "ds", "--identity", "carol", "--consent", '["x"]', *t)
    assert r.returncode == 2 and "--consent must be a JSON object" in r.stderr
