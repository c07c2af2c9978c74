"""Networks to ONNX: the shared encoder and per-identity decoders as standalone graphs.

Other runtimes (ONNX Runtime, Triton) get the same arithmetic as facemux's own server, with
the conventions written into every file's metadata so a model carries its own contract:

    encoder  input  "faces"    float32 (N, 3, R, R), RGB in [0, 1]
             output "latents"  float32 (N, *latent_shape)
    decoder  input  "latents"  float32 (N, *latent_shape)
             output "faces"    float32 (N, 3, R, R), RGB in [0, 1]
                    "masks"    float32 (N, 1, R, R) in [0, 1]   (presets with a mask head)

The batch dimension is dynamic. Needs the `export` extra (onnx, onnxscript; onnxruntime to
check parity).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from facemux.models.config import ModelConfig
from facemux.models.errors import PreconditionError
from facemux.models.networks import Decoder, Encoder
from torch import Tensor, nn

# Opset of the exporter's own default era: ONNX Runtime 1.16+ and Triton 23.x+ run it.
OPSET = 18
# Largest batch the exported graphs promise to handle; Triton configs stay at or below it.
MAX_EXPORT_BATCH = 4096
METADATA_PREFIX = "facemux."


@dataclass(frozen=True)
class GraphIO:
    """Names and per-item shapes (without the batch dimension) of one exported graph."""

    inputs: dict[str, tuple[int, ...]]
    outputs: dict[str, tuple[int, ...]]


def encoder_io(config: ModelConfig) -> GraphIO:
    r = config.resolution
    return GraphIO({"faces": (3, r, r)}, {"latents": tuple(config.latent_shape)})


def decoder_io(config: ModelConfig) -> GraphIO:
    r = config.resolution
    outputs: dict[str, tuple[int, ...]] = {"faces": (3, r, r)}
    if config.mask_head:
        outputs["masks"] = (1, r, r)
    return GraphIO({"latents": tuple(config.latent_shape)}, outputs)


class _DecoderGraph(nn.Module):
    """The decoder with a fixed output arity (ONNX has no optional outputs)."""

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, z: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        rgb, mask = self.decoder(z)
        return rgb if mask is None else (rgb, mask)


def _require_onnx() -> Any:
    try:
        import onnx
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError as exc:
        raise PreconditionError(
            f"ONNX export needs the export extra: pip install 'facemux[export]' ({exc.name} "
            "is missing)"
        ) from None
    return onnx


def _export(module: nn.Module, io: GraphIO, path: Path, metadata: Mapping[str, str]) -> None:
    onnx = _require_onnx()
    module = module.eval().float().to("cpu")
    ((name, shape),) = io.inputs.items()
    # Batch 2 traces the batch dimension as a symbol, not a specialised 1.
    example = torch.zeros((2, *shape))
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=[name],
            output_names=list(io.outputs),
            dynamic_shapes=({0: batch},),
            opset_version=OPSET,
            verbose=False,
        )
    assert program is not None
    model = program.model_proto
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + key, value
    model.producer_name = "facemux"
    onnx.checker.check_model(model)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save_model(model, str(tmp))
    tmp.replace(path)


def encoder_to_onnx(
    encoder: Encoder, config: ModelConfig, fingerprint: str, path: Path
) -> dict[str, str]:
    """Write the encoder graph; returns the metadata stored in it."""
    meta = {
        "kind": "encoder",
        "preset": config.name,
        "resolution": str(config.resolution),
        "encoder_fingerprint": fingerprint,
        "latent_shape": json.dumps(list(config.latent_shape)),
        "input": "faces: float32 NCHW RGB in [0,1]",
    }
    _export(encoder, encoder_io(config), path, meta)
    return meta


def decoder_to_onnx(
    decoder: Decoder,
    config: ModelConfig,
    path: Path,
    *,
    encoder_fingerprint: str,
    decoder_fingerprint: str,
    identity: str,
    version: int,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Write one identity's decoder graph; returns the metadata stored in it."""
    meta = {
        "kind": "decoder",
        "preset": config.name,
        "resolution": str(config.resolution),
        "encoder_fingerprint": encoder_fingerprint,
        "decoder_fingerprint": decoder_fingerprint,
        "identity": identity,
        "identity_version": str(version),
        "latent_shape": json.dumps(list(config.latent_shape)),
        "output": "faces: float32 NCHW RGB in [0,1]"
        + ("; masks: float32 N1HW in [0,1]" if config.mask_head else ""),
        **dict(extra or {}),
    }
    _export(_DecoderGraph(decoder), decoder_io(config), path, meta)
    return meta


def read_onnx_metadata(path: Path) -> dict[str, str]:
    """facemux's metadata of an exported graph (keys without the prefix)."""
    onnx = _require_onnx()
    model = onnx.load_model(str(path), load_external_data=False)
    return {
        p.key[len(METADATA_PREFIX) :]: p.value
        for p in model.metadata_props
        if p.key.startswith(METADATA_PREFIX)
    }


def onnx_parity(module: nn.Module, path: Path, inputs: np.ndarray) -> float:
    """Largest absolute difference between the torch module and ONNX Runtime (CPU) on the
    same float32 inputs, over every output."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise PreconditionError(
            "checking parity needs onnxruntime: pip install 'facemux[export]'"
        ) from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: inputs.astype(np.float32)})
    with torch.no_grad():
        want = module.eval().float().cpu()(torch.from_numpy(inputs.astype(np.float32)))
    if isinstance(module, Decoder):
        want = tuple(t for t in want if t is not None)
    elif isinstance(want, Tensor):
        want = (want,)
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        worst = max(worst, float(np.abs(np.asarray(g) - w.numpy()).max()))
    return worst
