"""ONNX export: files onnxruntime runs with facemux's own pixels, a consent gate, and Triton
configurations that Triton's own schema accepts."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from common import Models, face_image, make_store
from facemux.client import FacemuxClient
from facemux.client.cli import main as cli_main
from facemux.models.errors import InvalidInputError, NotFoundError, PreconditionError
from facemux.service.server import ServerThread
from facemux.service.store import LocalStore

onnx = pytest.importorskip("onnx", reason="the export extra (onnx) is not installed")
ort = pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime) is not installed")


@dataclass
class ExportRun:
    store: Path
    out: Path
    stdout: str
    stderr: str


from facemux.models.export import read_onnx_metadata  # noqa: E402
from facemux.service.export import export_onnx  # noqa: E402


@pytest.fixture(scope="module")
def export_run(tmp_path_factory: pytest.TempPathFactory, models: Models) -> ExportRun:
    """alice (default version) and bob:1 exported through the CLI, with a Triton repository,
    its stdout and stderr kept (not a terminal: a pipe or a log, as in a CI job)."""
    root = tmp_path_factory.mktemp("export")
    make_store(root / "store", models, ("alice", "bob"))
    out = root / "out"
    args = ["alice", "bob:1", "--store", str(root / "store"), "-o", str(out), "--triton"]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = cli_main(["export", "onnx", *args, "--max-batch", "32"])
    assert rc == 0, stderr.getvalue()
    return ExportRun(root / "store", out, stdout.getvalue(), stderr.getvalue())


@pytest.fixture(scope="module")
def exported(export_run: ExportRun) -> tuple[Path, Path]:
    return export_run.store, export_run.out


def test_export_draws_no_bar_when_stderr_is_not_a_terminal(export_run: ExportRun) -> None:
    # tests/test_progress.py runs the same command on a terminal, where the bar is drawn.
    assert "alice v1" in export_run.stdout
    assert not any(mark in export_run.stderr for mark in ("%|", "\r")), export_run.stderr


def _run(session: Any, x: np.ndarray) -> list[np.ndarray]:  # an onnxruntime session
    return session.run(None, {session.get_inputs()[0].name: x})


def test_exported_models_carry_their_contract(exported: tuple[Path, Path], models: Models) -> None:
    _, out = exported
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["encoder_fingerprint"] == models.fingerprint
    assert [(d["identity"], d["version"]) for d in manifest["decoders"]] == [
        ("alice", 1),
        ("bob", 1),
    ]
    assert manifest["encoder_parity_max_abs_error"] <= 1e-3
    assert all(d["parity_max_abs_error"] <= 1e-3 for d in manifest["decoders"])
    enc_meta = read_onnx_metadata(out / "encoder.onnx")
    assert enc_meta["kind"] == "encoder"
    assert enc_meta["encoder_fingerprint"] == models.fingerprint
    assert (enc_meta["preset"], enc_meta["resolution"]) == ("tiny", "64")
    dec_meta = read_onnx_metadata(out / "decoders" / "bob.v1.onnx")
    assert (dec_meta["identity"], dec_meta["identity_version"]) == ("bob", "1")
    assert dec_meta["encoder_fingerprint"] == models.fingerprint
    assert json.loads(dec_meta["consent"])["evidence_ref"] == "TICKET-1"
    # Dynamic batch: one graph serves any batch size.
    enc = ort.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"])
    assert enc.get_inputs()[0].shape[1:] == [3, 64, 64]
    for n in (1, 7):
        (z,) = _run(enc, np.zeros((n, 3, 64, 64), np.float32))
        assert z.shape == (n, *models.config.latent_shape)


@pytest.mark.unmarked_outputs
def test_onnxruntime_draws_the_pixels_facemux_serves(
    exported: tuple[Path, Path], tmp_path: Path
) -> None:
    """encoder.onnx -> bob's decoder in onnxruntime, against a real server's Swap of the same
    crops (provenance off: the watermark changes pixels by design): at most 1 grey level."""
    store_dir, out = exported
    from facemux.service.settings import Settings

    settings = Settings(port=0, auth="off", store=store_dir, provenance="off", metrics_port=-1)
    crops = [face_image(i) for i in range(4)]
    with ServerThread(settings) as srv, FacemuxClient(srv.target, timeout=30) as client:
        client.wait_ready(30)
        served = client.swap_faces(crops, "bob", output_format="raw")
    served_px = np.stack(
        [np.frombuffer(f.raw.data, np.uint8).reshape(64, 64, 3) for f in served.response.faces]
    )
    enc = ort.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(
        str(out / "decoders" / "bob.v1.onnx"), providers=["CPUExecutionProvider"]
    )
    x = np.stack(crops).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    (z,) = _run(enc, x)
    rgb = _run(dec, z)[0]
    ours = np.clip(rgb, 0, 1).transpose(0, 2, 3, 1) * 255.0
    ours_px = np.round(ours).astype(np.int16)
    assert int(np.abs(ours_px - served_px.astype(np.int16)).max()) <= 1


def test_triton_repository_parses_against_tritons_schema(exported: tuple[Path, Path]) -> None:
    mc = pytest.importorskip(
        "tritonclient.grpc.model_config_pb2", reason="tritonclient is not installed"
    )
    from google.protobuf import text_format

    _, out = exported
    repo = out / "triton"
    configs = {}
    for path in sorted(repo.glob("*/config.pbtxt")):
        cfg = text_format.Parse(path.read_text(), mc.ModelConfig())
        assert cfg.name == path.parent.name  # Triton requires name == directory
        configs[cfg.name] = cfg
    assert set(configs) == {
        "facemux_encoder",
        "facemux_decoder_alice",
        "facemux_decoder_bob",
        "facemux_swap_alice",
        "facemux_swap_bob",
    }
    enc = configs["facemux_encoder"]
    assert enc.platform == "onnxruntime_onnx" and enc.max_batch_size == 32
    assert enc.HasField("dynamic_batching")
    # Each config's tensors match the ONNX graph it describes (batch dimension aside).
    for name in ("facemux_encoder", "facemux_decoder_bob"):
        cfg = configs[name]
        (version_dir,) = [p for p in (repo / name).iterdir() if p.is_dir()]
        session = ort.InferenceSession(
            str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        graph_in = {i.name: i.shape[1:] for i in session.get_inputs()}
        graph_out = {o.name: o.shape[1:] for o in session.get_outputs()}
        assert {i.name: list(i.dims) for i in cfg.input} == graph_in
        assert {o.name: list(o.dims) for o in cfg.output} == graph_out
    swap = configs["facemux_swap_bob"]
    assert swap.platform == "ensemble"
    steps = swap.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["facemux_encoder", "facemux_decoder_bob"]
    assert steps[1].model_version == 1 and (repo / "facemux_decoder_bob" / "1").is_dir()
    assert dict(steps[0].output_map) == {"latents": "latents"}
    assert dict(steps[1].input_map) == {"latents": "latents"}
    assert {o.name for o in swap.output} == set(steps[1].output_map.values())


def test_export_refuses_revoked_consent_and_bad_references(tmp_path: Path, models: Models) -> None:
    store = make_store(tmp_path / "store", models, ("alice", "bob"))
    store.revoke_consent("alice", "withdrawn")
    out = tmp_path / "out"
    with pytest.raises(PreconditionError, match="revoked"):
        export_onnx(store, ["bob", "alice"], out)
    assert not out.exists()  # refused before anything was written
    with pytest.raises(NotFoundError):
        export_onnx(store, ["bob:7"], out)
    for ref in ("bob:0", "bob:x", "../etc", "bob\n"):
        with pytest.raises(InvalidInputError):
            export_onnx(store, [ref], out)
    with pytest.raises(InvalidInputError, match="more than once"):
        export_onnx(store, ["bob", "bob:1"], out)
    assert not out.exists()
    # The CLI says why, with a non-zero exit and no traceback.
    rc = cli_main(["export", "onnx", "alice", "--store", str(tmp_path / "store"), "-o", str(out)])
    assert rc == 2


def test_export_refuses_a_decoder_of_another_encoder(tmp_path: Path, models: Models) -> None:
    from facemux.models import checkpoint
    from facemux.service.store import VersionRecord

    store = LocalStore(tmp_path / "store")
    store.put_encoder(models.encoder_bytes, models.fingerprint)
    _, meta = checkpoint.read_decoder(models.foreign_decoder)
    store.add_version(
        "mallory",
        models.foreign_decoder,
        VersionRecord.for_decoder(meta),
        consent={"attested_by": "a", "evidence_ref": "b", "granted_at": "2026-01-01"},
    )
    with pytest.raises(InvalidInputError, match="trained against encoder"):
        export_onnx(store, ["mallory"], tmp_path / "out")
