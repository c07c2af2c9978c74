"""Training data, job runs and signing keys live where the Store says: a store that keeps
them in another directory gets them all there, and nothing under its root; a generated
signing key is made once even when replicas start together, and an existing store's key
is found where it always was."""

from __future__ import annotations

import stat
import threading
import time
from pathlib import Path

import pytest
from common import CONSENT, Models, make_store, png
from facemux.client import FacemuxClient
from facemux.models import synth
from facemux.service import c2pa
from facemux.service.server import ServerThread
from facemux.service.settings import Settings
from facemux.service.store import LocalKeyStore, LocalStore
from facemux.v1 import training_service_pb2 as tpb


class SplitStore(LocalStore):
    """Identities and encoders under `root`, everything else under `aside`: the shape of a
    backend that keeps identities in an object store and the rest on a shared volume."""

    def __init__(self, root: Path, aside: Path) -> None:
        super().__init__(root)
        self.aside = aside
        self._keys = LocalKeyStore(aside / "keys")

    def datasets_dir(self) -> Path:
        return self.aside / "data"

    def jobs_dir(self) -> Path:
        return self.aside / "runs"

    def pretrain_dir(self, preset: str) -> Path:
        return self.aside / "pretraining" / preset


@pytest.mark.slow
def test_training_and_keys_go_where_the_store_says(tmp_path: Path, models: Models) -> None:
    root, aside = tmp_path / "store", tmp_path / "aside"
    make_store(root, models, ("alice",))
    store = SplitStore(root, aside)
    settings = Settings(
        port=0, auth="off", store=root, metrics_port=-1, training_threads=1, provenance="on"
    )
    imgs, _ = synth.make_dataset(synth.identity_from_seed(5), 8, 64, seed=5)
    with (
        ServerThread(settings, store=store) as srv,
        FacemuxClient(srv.target, timeout=30, retries=1) as c,
    ):
        c.wait_ready(30)
        assert c.upload_dataset("gil", [png(i) for i in imgs], aligned=True).accepted == 8
        job = c.train(["gil"], identity="gil", steps=2, batch_size=4, seed=1, consent=CONSENT)
        assert (aside / "runs" / job.id / "job.json").is_file()
        done = list(c.watch_job(job.id, timeout=120))[-1].job
        assert done.state == tpb.JOB_STATE_SUCCEEDED, done.error
        # Registered from the run's directory into the identities, which stay under root.
        assert c.get_identity("gil").versions[0].job_id == job.id
        assert (root / "identities" / "gil" / "v1" / "decoder.safetensors").is_file()
    assert (aside / "data" / "gil" / "dataset.json").is_file()
    chain, key = store.keys.paths(c2pa.TEST_SIGNER)
    assert chain.is_file() and key.is_file()
    assert not {"datasets", "jobs", "provenance", "pretrain"} & {p.name for p in root.iterdir()}


def test_signing_key_made_once_by_racing_replicas(tmp_path: Path) -> None:
    made: list[int] = []
    start = threading.Barrier(6)

    def make() -> tuple[bytes, bytes]:
        made.append(1)
        time.sleep(0.05)  # widens the window a second maker would need
        return b"chain %d" % len(made), b"key %d" % len(made)

    got: list[tuple[bytes, bytes]] = []

    def replica() -> None:
        keys = LocalStore(tmp_path / "store").keys  # each its own store, as replicas
        start.wait()
        got.append(keys.signing_key("signer", make))

    threads = [threading.Thread(target=replica) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and got == [(b"chain 1", b"key 1")] * 6
    chain, key = LocalStore(tmp_path / "store").keys.paths("signer")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600  # the private key: owner only
    assert chain.read_bytes() == b"chain 1"


def test_an_existing_stores_signer_is_kept(tmp_path: Path) -> None:
    # Where stores made before Store.keys keep the generated signer.
    old = tmp_path / "store" / "provenance"
    first = c2pa.generate_test_signer(old)
    assert (old / "test-signer-chain.pem").read_bytes() == first.cert_chain_pem
    assert (old / "test-signer-key.pem").read_bytes() == first.key_pem
    again = c2pa.generated_signer(LocalStore(tmp_path / "store").keys)
    assert again == first and again.test_only
    with pytest.raises(Exception, match="key name"):
        LocalStore(tmp_path / "store").keys.signing_key("../escape", lambda: (b"", b""))
