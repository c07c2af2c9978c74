"""Export stored identities for other runtimes: ONNX files, optionally as a Triton model
repository.

facemux stays the trainer, the registry and the consent gate: an identity is exported only
while its consent is valid, and its consent record and the encoder fingerprint travel with
the files (ONNX metadata and ``manifest.json``). What the exported models give up is listed
in README ("Use facemux models in other runtimes").

Layout written under the output directory::

    encoder.onnx
    decoders/<identity>.v<N>.onnx
    manifest.json
    triton/                          with --triton
      facemux_encoder/config.pbtxt, 1/model.onnx
      facemux_decoder_<identity>/config.pbtxt, <N>/model.onnx
      facemux_swap_<identity>/config.pbtxt, <N>/        ensemble: encoder -> decoder
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from facemux.models import checkpoint
from facemux.models import export as onnx_export
from facemux.models.config import ModelConfig
from facemux.models.errors import InvalidInputError
from facemux.service.consent import check_usable
from facemux.service.store import IdentityRecord, Store, VersionRecord, now_iso, validate_name

# Parity bound of the contract: outputs are in [0, 1], so 1e-3 is a quarter of
# one 8-bit grey level.
PARITY_TOLERANCE = 1e-3
TRITON_MAX_BATCH = 64


@dataclass
class ExportedDecoder:
    identity: str
    version: int
    file: str
    decoder_fingerprint: str
    consent: dict[str, str]
    parity_max_abs_error: float | None = None


@dataclass
class ExportReport:
    out: str
    preset: str
    resolution: int
    encoder_fingerprint: str
    encoder_file: str
    created_at: str
    decoders: list[ExportedDecoder] = field(default_factory=list)
    encoder_parity_max_abs_error: float | None = None
    triton_repository: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_identity_ref(ref: str) -> tuple[str, int]:
    """`name` (its default version) or `name:version`."""
    name, sep, version = ref.partition(":")
    validate_name(name)
    if not sep:
        return name, 0
    if not version.isdigit() or int(version) < 1:
        raise InvalidInputError(
            f"identity {ref!r}: the version after ':' must be a stored version number"
        )
    return name, int(version)


def select(
    store: Store, identities: list[str], encoder: str = ""
) -> tuple[str, bytes, list[tuple[IdentityRecord, VersionRecord]]]:
    """The encoder (fingerprint, checkpoint) and the identity versions to export, after every
    check: consent valid now, version stored, trained against that encoder. Nothing is
    written before this passes, so a refused identity leaves no partial export."""
    if not identities:
        raise InvalidInputError("name at least one identity to export (name or name:version)")
    refs = [parse_identity_ref(r) for r in identities]
    if len({n for n, _ in refs}) != len(refs):
        raise InvalidInputError("an identity is named more than once; export one version each")
    fingerprint, enc_bytes = store.read_encoder(encoder)
    chosen = []
    for name, number in refs:
        rec = store.get(name)
        check_usable(rec)  # revoked or expired consent: nothing leaves the registry
        v = rec.version(number)
        if v.encoder_fingerprint != fingerprint:
            raise InvalidInputError(
                f"identity {name!r} v{v.version} was trained against encoder "
                f"{v.encoder_fingerprint[:12]}, not the exported {fingerprint[:12]}; export "
                "it with --encoder " + v.encoder_fingerprint
            )
        chosen.append((rec, v))
    return fingerprint, enc_bytes, chosen


def export_onnx(
    store: Store,
    identities: list[str],
    out: Path,
    *,
    encoder: str = "",
    triton: bool = False,
    check_parity: bool = True,
    max_batch: int = TRITON_MAX_BATCH,
    on_step: Callable[[str], None] | None = None,
) -> ExportReport:
    """Export the (default or named) encoder and the given identities into `out`.
    `on_step(what)` is called as each part is done: the encoder, each identity, the Triton
    repository (1 + len(identities) + triton calls)."""
    step = on_step or (lambda what: None)
    if not 1 <= max_batch <= onnx_export.MAX_EXPORT_BATCH:
        raise InvalidInputError(f"max batch must be 1..{onnx_export.MAX_EXPORT_BATCH}")
    fingerprint, enc_bytes, chosen = select(store, identities, encoder)
    enc, enc_meta = checkpoint.load_encoder(enc_bytes)
    cfg = enc_meta.config
    out.mkdir(parents=True, exist_ok=True)
    report = ExportReport(
        out=str(out),
        preset=cfg.name,
        resolution=cfg.resolution,
        encoder_fingerprint=fingerprint,
        encoder_file="encoder.onnx",
        created_at=now_iso(),
    )
    onnx_export.encoder_to_onnx(enc, cfg, fingerprint, out / report.encoder_file)
    rng = np.random.default_rng(0)
    if check_parity:
        faces = rng.random((3, 3, cfg.resolution, cfg.resolution), dtype=np.float32)
        report.encoder_parity_max_abs_error = _checked(
            onnx_export.onnx_parity(enc, out / report.encoder_file, faces), "encoder"
        )
    step("encoder")
    for rec, v in chosen:
        dec, dmeta = checkpoint.load_decoder(
            store.read_decoder(rec.name, v.version), expected_encoder_fingerprint=fingerprint
        )
        rel = f"decoders/{rec.name}.v{v.version}.onnx"
        onnx_export.decoder_to_onnx(
            dec,
            dmeta.config,
            out / rel,
            encoder_fingerprint=fingerprint,
            decoder_fingerprint=v.decoder_fingerprint,
            identity=rec.name,
            version=v.version,
            extra={"consent": json.dumps(rec.consent, sort_keys=True)},
        )
        item = ExportedDecoder(rec.name, v.version, rel, v.decoder_fingerprint, dict(rec.consent))
        if check_parity:
            z = rng.standard_normal((3, *cfg.latent_shape)).astype(np.float32)
            item.parity_max_abs_error = _checked(
                onnx_export.onnx_parity(dec, out / rel, z), f"decoder {rec.name}"
            )
        report.decoders.append(item)
        step(f"{rec.name} v{v.version}")
    if triton:
        report.triton_repository = "triton"
        write_triton_repository(out / "triton", out, report, cfg, max_batch)
        step("triton")
    (out / "manifest.json").write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    return report


def _checked(error: float, what: str) -> float:
    if not error <= PARITY_TOLERANCE:
        raise RuntimeError(
            f"ONNX Runtime's {what} differs from torch by {error:.2e} (over "
            f"{PARITY_TOLERANCE:g}); the export is not trustworthy"
        )
    return error


# -- Triton ------------------------------------------------------------------------------


def _dims(shape: tuple[int, ...]) -> str:
    return "[ " + ", ".join(str(d) for d in shape) + " ]"


def _tensor_block(kind: str, tensors: dict[str, tuple[int, ...]]) -> str:
    items = [
        f'  {{\n    name: "{name}"\n    data_type: TYPE_FP32\n    dims: {_dims(shape)}\n  }}'
        for name, shape in tensors.items()
    ]
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def onnx_model_config(name: str, io: onnx_export.GraphIO, max_batch: int) -> str:
    """config.pbtxt of one ONNX Runtime model, dynamic batching on."""
    return (
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch}\n"
        + _tensor_block("input", io.inputs)
        + _tensor_block("output", io.outputs)
        + "dynamic_batching {\n  max_queue_delay_microseconds: 2000\n}\n"
        + "instance_group [\n  {\n    kind: KIND_AUTO\n  }\n]\n"
    )


def ensemble_config(
    name: str,
    encoder_model: str,
    decoder_model: str,
    decoder_version: int,
    enc: onnx_export.GraphIO,
    dec: onnx_export.GraphIO,
    max_batch: int,
) -> str:
    """config.pbtxt of a swap ensemble: faces -> encoder -> latents -> decoder -> faces."""
    dec_outputs = "\n".join(
        f'      output_map {{\n        key: "{o}"\n        value: "{o}"\n      }}'
        for o in dec.outputs
    )
    return (
        f'name: "{name}"\n'
        'platform: "ensemble"\n'
        f"max_batch_size: {max_batch}\n"
        + _tensor_block("input", enc.inputs)
        + _tensor_block("output", dec.outputs)
        + "ensemble_scheduling {\n  step [\n"
        + "    {\n"
        + f'      model_name: "{encoder_model}"\n      model_version: 1\n'
        + '      input_map {\n        key: "faces"\n        value: "faces"\n      }\n'
        + '      output_map {\n        key: "latents"\n        value: "latents"\n      }\n'
        + "    },\n    {\n"
        + f'      model_name: "{decoder_model}"\n      model_version: {decoder_version}\n'
        + '      input_map {\n        key: "latents"\n        value: "latents"\n      }\n'
        + dec_outputs
        + "\n    }\n  ]\n}\n"
    )


def triton_name(identity: str, kind: str) -> str:
    # Triton model names are directory names; identity names are already safe for that,
    # '.' aside, which Triton reads as part of a name without harm.
    return f"facemux_{kind}_{identity}"


def write_triton_repository(
    repo: Path, exported: Path, report: ExportReport, cfg: ModelConfig, max_batch: int
) -> None:
    if repo.exists():
        shutil.rmtree(repo)
    enc_io, dec_io = onnx_export.encoder_io(cfg), onnx_export.decoder_io(cfg)
    enc_name = "facemux_encoder"
    (repo / enc_name / "1").mkdir(parents=True)
    shutil.copyfile(exported / report.encoder_file, repo / enc_name / "1" / "model.onnx")
    (repo / enc_name / "config.pbtxt").write_text(onnx_model_config(enc_name, enc_io, max_batch))
    for d in report.decoders:
        dec_name = triton_name(d.identity, "decoder")
        vdir = repo / dec_name / str(d.version)
        vdir.mkdir(parents=True)
        shutil.copyfile(exported / d.file, vdir / "model.onnx")
        (repo / dec_name / "config.pbtxt").write_text(
            onnx_model_config(dec_name, dec_io, max_batch)
        )
        swap = triton_name(d.identity, "swap")
        # Ensembles have no files of their own, but Triton wants the version directory.
        (repo / swap / str(d.version)).mkdir(parents=True)
        (repo / swap / "config.pbtxt").write_text(
            ensemble_config(swap, enc_name, dec_name, d.version, enc_io, dec_io, max_batch)
        )
