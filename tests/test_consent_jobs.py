"""Training jobs and consent: a job registers its version only into the identity it was
submitted for, as it was then, and never past a revocation; every version it adds (or is
refused) has an audit line. Real server with tokens, real client, tiny jobs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from common import CONSENT, Models, face_image, make_store, png
from facemux.client import FacemuxClient, FailedPrecondition, NotFound
from facemux.models import synth
from facemux.service import auth
from facemux.service.server import ServerThread
from facemux.service.settings import Settings
from facemux.v1 import identity_service_pb2 as ipb
from facemux.v1 import training_service_pb2 as tpb

pytestmark = pytest.mark.slow

FACE = png(face_image(0))
TINY = {"steps": 2, "batch_size": 2, "learning_rate": 1e-3, "checkpoint_every": 2}


@pytest.fixture
def served(tmp_path: Path, models: Models) -> Iterator[tuple[FacemuxClient, FacemuxClient, Path]]:
    """(admin client, train-role client, audit file); one job runs at a time."""
    make_store(tmp_path / "store", models, ("alice", "bob"))
    tokens, lines = {}, []
    for name, roles in {"trainer": ["train"], "root": ["admin", "swap", "train"]}.items():
        entry, tokens[name] = auth.make_entry(name, roles, scheme="sha256")
        lines.append(json.dumps(entry))
    (tmp_path / "callers.jsonl").write_text("\n".join(lines) + "\n")
    audit = tmp_path / "audit.log"
    settings = Settings(
        port=0,
        store=tmp_path / "store",
        auth="tokens",
        auth_tokens_file=str(tmp_path / "callers.jsonl"),
        audit_log=str(audit),
        metrics_port=-1,
        max_running_jobs=1,
        training_threads=1,
        training_log_every=1,
    )
    with (
        ServerThread(settings) as srv,
        FacemuxClient(srv.target, timeout=30, retries=1, token=tokens["root"]) as admin,
        FacemuxClient(srv.target, timeout=30, retries=1, token=tokens["trainer"]) as trainer,
    ):
        admin.wait_ready(30)
        yield admin, trainer, audit


def _final(c: FacemuxClient, job_id: str) -> tpb.Job:
    events = list(c.watch_job(job_id, timeout=120))
    return events[-1].job


def test_jobs_never_undo_revocation_or_deletion(
    served: tuple[FacemuxClient, FacemuxClient, Path], models: Models
) -> None:
    admin, trainer, audit = served
    for i, name in enumerate(("faces", "erin", "dave")):
        imgs, _ = synth.make_dataset(synth.identity_from_seed(5 + i), 6, 64, seed=5 + i)
        trainer.upload_dataset(name, [png(f) for f in imgs], aligned=True)
    # A long job holds the only slot, so the jobs below stay queued while the admin acts:
    # what each one meets at registration does not depend on timing.
    blocker = trainer.train(["faces"], identity="zed", consent=CONSENT, **{**TINY, "steps": 10**5})
    for ev in trainer.watch_job(blocker.id, timeout=60):
        if ev.job.state == tpb.JOB_STATE_RUNNING:
            break
    revoked = trainer.train(["faces"], identity="alice", **TINY)  # rides on alice's record
    deleted = trainer.train(["faces"], identity="bob", **TINY)
    # Pretraining registers one identity per dataset; neither exists yet.
    both = trainer.train(["erin", "dave"], mode="pretrain", preset="tiny", consent=CONSENT, **TINY)
    for job in (revoked, deleted, both):
        assert trainer.get_job(job.id).state == tpb.JOB_STATE_QUEUED

    admin.revoke_consent("alice", "withdrawn")
    admin.delete_identity("bob")
    admin.register_identity("erin", models.decoders["carol"], consent=CONSENT)
    trainer.cancel_job(blocker.id)

    # alice: the job fails saying why; the revocation stands; nothing swaps; no v2.
    done = _final(trainer, revoked.id)
    assert done.state == tpb.JOB_STATE_FAILED, done
    assert "consent for identity 'alice' was revoked" in done.error
    assert revoked.id in done.error and "RecordConsent" in done.error
    ident = admin.get_identity("alice")
    assert ident.consent.HasField("revoked_at") and [v.version for v in ident.versions] == [1]
    with pytest.raises(FailedPrecondition, match="revoked"):
        admin.swap_faces([FACE], "alice")
    # bob: deleted while the job waited: not created again.
    done = _final(trainer, deleted.id)
    assert done.state == tpb.JOB_STATE_FAILED
    assert "identity 'bob' was deleted" in done.error and "nothing was registered" in done.error
    with pytest.raises(NotFound):
        admin.get_identity("bob")
    # erin did not exist when the job was submitted: the job does not add to the identity
    # an admin created meanwhile. dave, new then and new now, is created with the job's
    # consent record; the job fails so the refusal is seen, naming what it registered.
    done = _final(trainer, both.id)
    assert done.state == tpb.JOB_STATE_FAILED
    assert "identity 'erin' was created" in done.error and "registered: dave v1" in done.error
    assert [v.version for v in admin.get_identity("erin").versions] == [1]
    ident = admin.get_identity("dave")
    assert ident.versions[0].source == ipb.VERSION_SOURCE_TRAINED
    assert ident.versions[0].job_id == both.id
    assert ident.consent.evidence_ref == CONSENT["evidence_ref"]
    # Any later reader sees the final state too.
    assert admin.get_job(revoked.id).state == tpb.JOB_STATE_FAILED

    # Every version a job adds, or is refused, has its audit line, naming who submitted it.
    rows = [json.loads(line) for line in audit.read_text().splitlines()]
    got = {
        (r["job_id"], r["identity"]): (r["status"], r["identity_version"])
        for r in rows
        if r["rpc"] == "TrainJobRegister"
    }
    assert got == {
        (revoked.id, "alice"): ("FAILED_PRECONDITION", 0),
        (deleted.id, "bob"): ("FAILED_PRECONDITION", 0),
        (both.id, "erin"): ("FAILED_PRECONDITION", 0),
        (both.id, "dave"): ("OK", 1),
    }
    # ...and the request id of the Train call that submitted it.
    train_ids = [r["request_id"] for r in rows if r["rpc"] == "Train" and r["status"] == "OK"]
    for r in rows:
        if r["rpc"] == "TrainJobRegister":
            assert r["caller"] == "trainer" and r["request_id"] in train_ids
