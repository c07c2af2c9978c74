"""`facemux export torchserve`: the shared encoder and chosen identities in one TorchServe
model archive (.mar), served by facemux's own handler (service/torchserve_handler.py).

The archive holds the safetensors checkpoints as stored (no re-serialisation: the same
weights, the same fingerprints), a manifest with the encoder fingerprint and each identity's
consent record, and TorchServe's model-config.yaml with its batching settings. Making the
archive needs `torch-model-archiver` (the `torchserve` extra); serving it needs TorchServe
with facemux installed beside it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from facemux.models.errors import InvalidInputError, PreconditionError
from facemux.service.export import select
from facemux.service.store import Store, now_iso
from facemux.service.torchserve_handler import ARCHIVE_MANIFEST

# TorchServe model names end up in URLs (/predictions/<name>) and file names.
_MODEL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
HANDLER = Path(__file__).with_name("torchserve_handler.py")


@dataclass
class TorchServeArchive:
    mar: str
    model_name: str
    size_bytes: int
    encoder_fingerprint: str
    identities: dict[str, int]
    batch_size: int
    max_batch_delay_ms: int
    c2pa_signed: bool
    created_at: str
    consent: dict[str, dict[str, str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _model_config(batch_size: int, delay_ms: int, workers: int, timeout_s: int) -> str:
    # TorchServe reads these when the archive is registered; written by hand, the file is
    # five flat keys, so no YAML library is needed to make it.
    return (
        f"minWorkers: {workers}\n"
        f"maxWorkers: {workers}\n"
        f"batchSize: {batch_size}\n"
        f"maxBatchDelay: {delay_ms}\n"
        f"responseTimeout: {timeout_s}\n"
    )


def export_torchserve(
    store: Store,
    identities: list[str],
    out: Path,
    *,
    model_name: str = "facemux",
    encoder: str = "",
    batch_size: int = 8,
    max_batch_delay_ms: int = 10,
    workers: int = 1,
    max_image_pixels: int = 4_000_000,
    c2pa_cert: Path | None = None,
    c2pa_key: Path | None = None,
    on_step: Callable[[str], None] | None = None,
) -> TorchServeArchive:
    """Write `<out>/<model_name>.mar`; every check runs before anything is written.
    `on_step(what)` is called as each part is done: the encoder, each identity, the archive
    (2 + len(identities) calls)."""
    step = on_step or (lambda what: None)
    if not _MODEL_NAME.fullmatch(model_name):
        raise InvalidInputError(
            f"model name {model_name[:80]!r}: use a letter, then up to 63 letters, digits, "
            "'_' or '-'"
        )
    if not 1 <= batch_size <= 1024 or not 0 <= max_batch_delay_ms <= 60_000:
        raise InvalidInputError("batch size must be 1..1024 and max batch delay 0..60000 ms")
    if not 1 <= workers <= 64 or max_image_pixels < 1:
        raise InvalidInputError("workers must be 1..64 and max image pixels positive")
    if (c2pa_cert is None) != (c2pa_key is None):
        raise InvalidInputError("C2PA signing needs both a certificate chain and its key")
    if importlib.util.find_spec("model_archiver") is None:
        raise PreconditionError(
            "making a TorchServe archive needs torch-model-archiver: pip install "
            "'facemux[torchserve]'"
        )
    fingerprint, enc_bytes, chosen = select(store, identities, encoder)
    report = TorchServeArchive(
        mar=str(out / f"{model_name}.mar"),
        model_name=model_name,
        size_bytes=0,
        encoder_fingerprint=fingerprint,
        identities={rec.name: v.version for rec, v in chosen},
        batch_size=batch_size,
        max_batch_delay_ms=max_batch_delay_ms,
        c2pa_signed=c2pa_cert is not None,
        created_at=now_iso(),
        consent={rec.name: dict(rec.consent) for rec, _ in chosen},
    )
    with tempfile.TemporaryDirectory(prefix="facemux-mar-") as tmp:
        stage = Path(tmp)
        files = [stage / "encoder.safetensors"]
        files[0].write_bytes(enc_bytes)
        step("encoder")
        manifest: dict[str, Any] = {
            "model_name": model_name,
            "encoder": files[0].name,
            "encoder_fingerprint": fingerprint,
            "max_image_pixels": max_image_pixels,
            "exported_at": report.created_at,
            "identities": {},
        }
        for rec, v in chosen:
            path = stage / f"decoder-{rec.name}.v{v.version}.safetensors"
            path.write_bytes(store.read_decoder(rec.name, v.version))
            files.append(path)
            manifest["identities"][rec.name] = {
                "version": v.version,
                "file": path.name,
                "decoder_fingerprint": v.decoder_fingerprint,
                "consent": rec.consent,
            }
            step(f"{rec.name} v{v.version}")
        if c2pa_cert is not None and c2pa_key is not None:
            for src, name in ((c2pa_cert, "c2pa-cert.pem"), (c2pa_key, "c2pa-key.pem")):
                shutil.copyfile(src, stage / name)
                files.append(stage / name)
            manifest["c2pa"] = {"cert": "c2pa-cert.pem", "key": "c2pa-key.pem"}
        (stage / ARCHIVE_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        files.append(stage / ARCHIVE_MANIFEST)
        config = stage / "model-config.yaml"
        config.write_text(_model_config(batch_size, max_batch_delay_ms, workers, 120))
        handler = stage / HANDLER.name
        shutil.copyfile(HANDLER, handler)
        out.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "model_archiver.model_packaging",
            "--model-name",
            model_name,
            "--version",
            "1.0",
            "--handler",
            str(handler),
            "--extra-files",
            ",".join(str(f) for f in files),
            "--config-file",
            str(config),
            "--export-path",
            str(out),
            "--force",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"torch-model-archiver failed ({done.returncode}): {done.stderr.strip()[-500:]}"
            )
        step("archive")
    report.size_bytes = Path(report.mar).stat().st_size
    return report
