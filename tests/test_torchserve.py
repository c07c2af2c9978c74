"""`facemux export torchserve`: two identities in one archive, served by a real TorchServe 0.12
on loopback, called over REST and gRPC, and compared with facemux's own Swap."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from common import Models, decode_png, face_image, make_store, png
from facemux.client import FacemuxClient
from facemux.client.cli import main as cli_main
from facemux.client.torchserve import TorchServeItemError, prediction_image
from facemux.models import watermark as wm
from facemux.models.errors import PreconditionError
from facemux.service.server import ServerThread
from facemux.service.settings import Settings
from ts_server import why_not_available

SKIP_REASON = why_not_available()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(SKIP_REASON), reason=SKIP_REASON)]


MODEL = "swapper"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, models: Models) -> Iterator[dict]:
    from ts_server import TorchServe, grpc_modules

    root = tmp_path_factory.mktemp("torchserve")
    store_dir = root / "store"
    make_store(store_dir, models, ("alice", "bob"))
    mars = root / "model-store"
    # A model name of the operator's (not the default "facemux"): --model-name names the
    # archive and the model TorchServe serves.
    args = ["alice", "bob:1", "--store", str(store_dir), "-o", str(mars), "--json"]
    args += ["--model-name", MODEL]
    assert cli_main(["export", "torchserve", *args, "--batch-size", "4"]) == 0
    ts = TorchServe(mars, root / "ts", {MODEL: f"{MODEL}.mar"}).start()
    pb2, pb2_grpc = grpc_modules(root / "ts")
    channel = grpc.insecure_channel(ts.grpc_target)
    try:
        yield {
            "ts": ts,
            "store": store_dir,
            "mar": mars / f"{MODEL}.mar",
            "pb2": pb2,
            "stub": pb2_grpc.InferenceAPIsServiceStub(channel),
        }
    finally:
        channel.close()
        ts.stop()


def _rest(ts: object, body: bytes, identity: str) -> tuple[int, bytes]:
    req = urllib.request.Request(
        f"{ts.rest}/predictions/{MODEL}",  # type: ignore[attr-defined]
        data=body,
        headers={"X-Facemux-Identity": identity, "Content-Type": "application/octet-stream"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _grpc(served: dict, **fields: bytes) -> bytes:
    req = served["pb2"].PredictionsRequest(model_name=MODEL, input=fields)
    return served["stub"].Predictions(req, timeout=60).prediction


def test_archive_carries_consent_fingerprint_and_batching(served: dict, models: Models) -> None:
    with zipfile.ZipFile(served["mar"]) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("facemux-archive.json"))
        config = z.read("model-config.yaml").decode()
    assert {"encoder.safetensors", "decoder-alice.v1.safetensors", "torchserve_handler.py"} <= names
    assert manifest["encoder_fingerprint"] == models.fingerprint
    assert manifest["identities"]["bob"]["consent"]["evidence_ref"] == "TICKET-1"
    assert "batchSize: 4" in config and "maxBatchDelay: 10" in config
    described = served["ts"].management_get(f"/models/{MODEL}")[0]
    assert described["batchSize"] == 4


def test_rest_and_grpc_draw_facemuxs_pixels(served: dict) -> None:
    """The same crop through TorchServe (REST and gRPC) and through facemux's Swap with the
    same request id (so the same watermark payload): at most 1 grey level apart."""
    crop = face_image(3)
    rid = "parity-" + uuid.uuid4().hex[:8]
    settings = Settings(port=0, auth="off", store=served["store"], provenance="watermark-only")
    with ServerThread(settings) as srv, FacemuxClient(srv.target, timeout=30) as client:
        client.wait_ready(30)
        ours = decode_png(client.swap_faces([png(crop)], "bob", request_id=rid).faces[0])
    via_grpc = prediction_image(
        _grpc(served, data=png(crop), identity=b"bob", request_id=rid.encode())
    )
    status, body = _rest(served["ts"], png(crop), "bob")
    assert status == 200
    via_rest = decode_png(prediction_image(body))
    theirs = decode_png(via_grpc)
    assert int(np.abs(theirs.astype(int) - ours.astype(int)).max()) <= 1
    # REST got no request id of ours: other watermark payload, the same face underneath.
    assert float(np.abs(via_rest.astype(int) - ours.astype(int)).mean()) < 2.0
    # The archive's outputs carry facemux's watermark (a 64 px crop rarely yields its
    # payload: README, Provenance).
    found, _, _ = wm.detect_watermark(theirs)
    assert found
    # Raw pixels work too, and so does the other identity in the same archive.
    raw = _grpc(served, data=crop.tobytes(), width=b"64", height=b"64", identity=b"alice")
    assert decode_png(prediction_image(raw)).shape == (64, 64, 3)


def test_a_bad_item_in_a_batch_is_visible_to_its_caller(served: dict) -> None:
    """TorchServe's gRPC path answers a refused item with status OK: the body says so, and
    prediction_image raises. REST carries the status as well."""
    good = png(face_image(5))
    calls = [
        {"data": good, "identity": b"alice"},
        {"data": b"not an image", "identity": b"alice"},
        {"data": good, "identity": b"mallory"},
        {"data": good, "identity": b"bob"},
    ]
    # Concurrent, so TorchServe batches them (batchSize 4, maxBatchDelay 10 ms).
    with ThreadPoolExecutor(len(calls)) as pool:
        bodies = list(pool.map(lambda f: _grpc(served, **f), calls))
    assert bodies[0].startswith(b"\x89PNG") and bodies[3].startswith(b"\x89PNG")
    with pytest.raises(TorchServeItemError) as bad:
        prediction_image(bodies[1])
    assert bad.value.code == "INVALID_ARGUMENT"
    with pytest.raises(TorchServeItemError) as unknown:
        prediction_image(bodies[2])
    assert unknown.value.code == "NOT_FOUND" and "alice" in unknown.value.message
    status, body = _rest(served["ts"], b"not an image", "bob")
    assert status == 400 and json.loads(body)["error"]["code"] == "INVALID_ARGUMENT"
    # The worker survived: the next call works.
    assert prediction_image(_grpc(served, data=good, identity=b"bob")).startswith(b"\x89PNG")


def test_each_batch_reports_its_size(served: dict) -> None:
    """The handler's FacemuxBatchSize metric: one line per batch in model_metrics.log, the
    sizes adding up to the requests served (how bench/serving_compare.py reads TorchServe's
    mean batch)."""
    ts = served["ts"]
    before = len(ts.batch_sizes())
    good = png(face_image(6))
    calls = [{"data": good, "identity": b"alice"}] * 6 + [{"data": b"junk", "identity": b"bob"}]
    with ThreadPoolExecutor(len(calls)) as pool:
        list(pool.map(lambda f: _grpc(served, **f), calls))
    deadline = time.monotonic() + 10
    sizes = ts.batch_sizes()[before:]
    # The frontend writes the worker's metric lines on its own schedule.
    while sum(sizes) < len(calls) and time.monotonic() < deadline:
        time.sleep(0.1)
        sizes = ts.batch_sizes()[before:]
    assert sum(sizes) == len(calls)
    assert all(1 <= n <= 4 for n in sizes)  # the archive's batchSize
    assert ts.worker_torch_threads() >= 1


def test_export_refuses_revoked_consent(tmp_path: Path, models: Models) -> None:
    from facemux.service.export_torchserve import export_torchserve

    store = make_store(tmp_path / "store", models, ("alice",))
    store.revoke_consent("alice", "withdrawn")
    with pytest.raises(PreconditionError, match="revoked"):
        export_torchserve(store, ["alice"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_torchserve_stops_cleanly(served: dict) -> None:
    """The module's last test, on the server the tests above used: stopped, every process of
    its group (the frontend and its Python workers) is gone afterwards."""
    import os

    ts = served["ts"]
    assert ts.proc is not None and ts.proc.poll() is None
    pgid = ts.proc.pid
    ts.stop()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("TorchServe processes outlived stop()")
