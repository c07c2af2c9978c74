"""The model as the server holds it: the shared encoder, and decoders resident in an LRU.

All methods here are synchronous and may take a while; the servicer calls them from
worker threads so the event loop never waits on torch.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

import numpy as np
import torch
from facemux.models import checkpoint, inference
from facemux.models import watermark as wm
from facemux.models.config import ModelConfig
from facemux.models.errors import (
    CheckpointError,
    NotFoundError,
    PreconditionError,
    UnavailableError,
)
from facemux.models.inference import Out
from facemux.models.networks import Decoder, Encoder, build_decoder
from facemux.models.pixels import images_to_unit, to_uint8, to_unit
from facemux.service.settings import Settings
from facemux.service.store import IdentityRecord, Store, VersionRecord

log = logging.getLogger(__name__)
M = TypeVar("M", bound=torch.nn.Module)


@dataclass
class ResidentDecoder:
    decoder: Decoder
    version: VersionRecord
    bytes: int


class DecoderCache:
    """LRU of decoders on the device, bounded by count and (optionally) bytes."""

    def __init__(self, max_count: int, max_bytes: int = 0) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, int], ResidentDecoder] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> ResidentDecoder | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: tuple[str, int], item: ResidentDecoder) -> list[tuple[str, int]]:
        """Insert and evict least recently used entries; returns the evicted keys."""
        evicted = []
        with self._lock:
            self._items[key] = item
            self._items.move_to_end(key)
            while len(self._items) > 1 and (
                len(self._items) > self.max_count
                or (self.max_bytes and self.total_bytes() > self.max_bytes)
            ):
                old, _ = self._items.popitem(last=False)
                evicted.append(old)
        return evicted

    def evict(self, name: str, version: int = 0) -> None:
        with self._lock:
            for key in [
                k for k in self._items if k[0] == name and (not version or k[1] == version)
            ]:
                del self._items[key]

    def resident(self) -> list[tuple[str, int]]:
        with self._lock:
            return list(self._items)

    def total_bytes(self) -> int:
        return sum(i.bytes for i in self._items.values())


def _marked(marks: Sequence[bytes | None] | None) -> tuple[list[int], list[bytes]]:
    """The positions of a batch that carry a watermark payload, and those payloads."""
    marked = [i for i, m in enumerate(marks or ()) if m is not None]
    return marked, [m for m in marks or () if m is not None]


class Runtime:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.device = inference.pick_device(settings.device)
        self.cache = DecoderCache(settings.decoder_cache_count, settings.decoder_cache_bytes)
        self._encoder: Encoder | None = None
        self.config: ModelConfig | None = None
        self.fingerprint = ""
        self._face_template: np.ndarray | None = None
        self.load_seconds = 0.0
        self.compute_threads = 0  # the batcher thread's intra-op threads, once it started
        # The model's memory layout: channels_last on CUDA (tensor cores), chosen at load on
        # CPU (settings.cpu_layout).
        self.layout = "channels_last" if self.device.type == "cuda" else "nchw"
        # The batch sizes the model runs at (settings.batch_buckets); () = its own size.
        self.buckets = self._buckets()
        self.padded_faces = 0  # blank rows run to fill buckets, since start
        self._load_lock = threading.Lock()

    def _buckets(self) -> tuple[int, ...]:
        spec = self.settings.batch_buckets.strip()
        compiled = self.device.type == "cuda" and self.settings.compile != "off"
        if spec == "off" or (spec == "auto" and not compiled):
            return ()
        if spec == "auto":
            return inference.power_of_two_buckets(self.settings.max_batch_size)
        return self.settings.listed_buckets()

    def _in_buckets(self, fn: Callable[[torch.Tensor], Out], x: torch.Tensor) -> Out:
        with self._autocast():
            out, padded = inference.in_buckets(fn, x, self.buckets, inference.LAYOUTS[self.layout])
        if padded:  # only batches pad (the batcher's thread); warm-ups run whole buckets
            self.padded_faces += padded
        return out

    def _encoded(self, x: torch.Tensor) -> torch.Tensor:
        encoder = self.encoder()
        return self._in_buckets(lambda t: inference.encode(encoder, t), x)

    def _decoded(
        self, decoder: Decoder, latents: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._in_buckets(lambda t: inference.decode(decoder, t), latents)

    @property
    def ready(self) -> bool:
        return self._encoder is not None

    def load(self) -> None:
        t0 = time.perf_counter()
        fingerprint, data = self.store.read_encoder(self.settings.encoder)
        encoder, meta = checkpoint.load_encoder(data, device=self.device)
        encoder.eval()
        if meta.fingerprint != fingerprint:
            raise CheckpointError(
                f"encoder stored as {fingerprint[:16]} has fingerprint {meta.fingerprint[:16]}"
            )
        self.config = meta.config
        self.fingerprint = meta.fingerprint
        self._face_template = np.asarray(meta.template, dtype=np.float64)

        def ready() -> None:
            if self.device.type == "cpu":
                self.layout = self._cpu_layout(encoder, meta.config)
            self._encoder = self._prepare(encoder)
            self._warm_up()

        if self.device.type == "cpu":
            # Timed and warmed up on as many threads as the batches will run on.
            threads = (
                self.compute_threads or self.settings.torch_threads or inference.default_threads()
            )
            inference.on_threads(threads, ready)
        else:
            ready()
        self.load_seconds = time.perf_counter() - t0
        if self.buckets:
            log.info("batches run padded to one of the sizes %s", ",".join(map(str, self.buckets)))
        log.info(
            "encoder %s (%s, %dpx) loaded on %s in %.2fs",
            self.fingerprint[:16],
            self.config.name,
            self.config.resolution,
            self.device,
            self.load_seconds,
        )

    # -- device fast path -------------------------------------------------------------------

    @property
    def use_bf16(self) -> bool:
        # bf16 only where it is fast: on this project's 2-core CPU it ran 10-35x slower.
        p = self.settings.precision
        return p == "bf16" or (p == "auto" and self.device.type == "cuda")

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.use_bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _cpu_layout(self, encoder: Encoder, config: ModelConfig) -> str:
        if self.settings.cpu_layout != "auto":
            return self.settings.cpu_layout
        # Timed with a decoder of the identities' architecture; its weights do not matter.
        decoder = build_decoder(config).eval()
        batch = min(self.settings.max_batch_size, 8)
        layout, ratio = inference.faster_layout(encoder, decoder, config.resolution, batch)
        log.info(
            "CPU layout %s: channels_last ran a batch of %d in %.2fx the time of nchw",
            layout,
            batch,
            ratio,
        )
        return layout

    def _prepare(self, module: M) -> M:
        """The layout chosen for the device (channels_last on CUDA: tensor cores want NHWC),
        and optional torch.compile on CUDA."""
        inference.set_layout(module, self.layout)
        if self.device.type == "cuda" and self.settings.compile != "off":
            compiled = torch.compile(module, mode=self.settings.compile, dynamic=False)
            return cast(M, compiled)
        return module

    def _warm_up(self) -> None:
        """Run the common batch sizes once so the first real calls do not pay for kernel
        selection, compilation or CUDA graph capture."""
        assert self.config is not None
        # With buckets, every shape the model will see, traced and captured now.
        sizes = self.buckets or [
            int(b) for b in self.settings.warmup_batch_sizes.split(",") if b.strip()
        ]
        res = self.config.resolution
        for n in sizes:
            self.encode_batch(np.zeros((n, res, res, 3), np.uint8))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _warm_decoder(self, decoder: Decoder) -> None:
        """Each bucket once, so a compiled decoder is not compiled on live batches."""
        if not self.buckets:
            return
        assert self.config is not None
        for n in self.buckets:
            self._decoded(decoder, torch.zeros((n, *self.config.latent_shape), device=self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def encoder(self) -> Encoder:
        if self._encoder is None:
            raise UnavailableError("the model is still loading; retry shortly")
        return self._encoder

    def model_config(self) -> ModelConfig:
        self.encoder()
        assert self.config is not None
        return self.config

    def face_template(self) -> np.ndarray:
        """The mean face the model's training crops were aligned to (from its encoder
        checkpoint): frames are aligned to it before they reach the model."""
        self.encoder()
        assert self._face_template is not None
        return self._face_template

    def decoder(
        self, name: str, version: int = 0, record: IdentityRecord | None = None
    ) -> ResidentDecoder:
        """The identity's decoder on the device, loading it from the store on a miss.
        `record`: the identity's record as the caller just read it (not read again)."""
        self.encoder()
        rec = record if record is not None else self.store.get(name)
        v = rec.version(version)
        key = (name, v.version)
        item = self.cache.get(key)
        # Version numbers restart when an identity is deleted and registered again: a
        # resident decoder counts only if it is the one the store now names.
        if item is not None and item.version.decoder_fingerprint == v.decoder_fingerprint:
            return item
        with self._load_lock:
            item = self.cache.get(key)
            if item is not None and item.version.decoder_fingerprint == v.decoder_fingerprint:
                return item
            if v.encoder_fingerprint != self.fingerprint:
                raise PreconditionError(
                    f"identity {name!r} v{v.version} was trained for encoder "
                    f"{v.encoder_fingerprint[:16]}, but this server serves encoder "
                    f"{self.fingerprint[:16]}"
                )
            # NotFoundError if the version was deleted since the lookup above.
            data = self.store.read_decoder(name, v.version)
            decoder, meta = checkpoint.load_decoder(
                data, device=self.device, expected_encoder_fingerprint=self.fingerprint
            )
            if meta.fingerprint != v.decoder_fingerprint:
                raise NotFoundError(
                    f"identity {name!r} v{v.version} was deleted and registered again while "
                    "it was being loaded; retry"
                )
            decoder.eval()
            size = inference.module_bytes(decoder)
            item = ResidentDecoder(self._prepare(decoder), v, size)
            self._warm_decoder(item.decoder)
            for old in self.cache.put(key, item):
                log.info("evicted decoder %s v%d from %s", old[0], old[1], self.device)
            return item

    # -- model primitives for the scheduler (called from its worker thread only) -----------

    def encode_batch(
        self, faces: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor]
    ) -> torch.Tensor:
        """(N,R,R,3) uint8 crops, or the parts of a batch (one per request), which are
        gathered with one host copy: into pinned memory on CUDA, into one array on CPU.
        Parts may also be (N,3,R,R) uint8 tensors already on the device (the frame
        pipeline's aligned crops), which are used where they are."""
        if isinstance(faces, (np.ndarray, torch.Tensor)):
            parts_any: Sequence[np.ndarray | torch.Tensor] = [faces]
        else:
            parts_any = faces
        if any(isinstance(p, torch.Tensor) for p in parts_any):
            x = torch.cat(
                [
                    p.to(self.device)
                    if isinstance(p, torch.Tensor)
                    else torch.from_numpy(np.ascontiguousarray(p))
                    .to(self.device)
                    .permute(0, 3, 1, 2)
                    for p in parts_any
                ]
            )
            x = to_unit(x).contiguous(memory_format=inference.LAYOUTS[self.layout])
            return self._encoded(x)
        parts = cast(Sequence[np.ndarray], parts_any)
        if self.device.type == "cuda":
            n = sum(len(f) for f in parts)
            # Pinned host memory lets the copy to the device run asynchronously.
            x = torch.empty((n, *parts[0].shape[1:]), dtype=torch.uint8, pin_memory=True)
            start = 0
            for f in parts:
                x[start : start + len(f)] = torch.from_numpy(f)
                start += len(f)
            x = x.to(self.device, non_blocking=True)
            x = to_unit(x.permute(0, 3, 1, 2))
            x = x.contiguous(memory_format=torch.channels_last)
        else:
            # One part (a lone request's own array) is used as it is; several are copied once.
            one = parts[0]
            lone = len(parts) == 1 and one.flags.writeable and one.flags.c_contiguous
            x = images_to_unit(torch.from_numpy(one if lone else np.concatenate(parts)))
            x = x.contiguous(memory_format=inference.LAYOUTS[self.layout])  # no-op for nchw
        return self._encoded(x)

    def decode_batch(
        self,
        decoder: Decoder,
        latents: torch.Tensor,
        marks: Sequence[bytes | None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        marked, payloads = _marked(marks)
        if marked and self.device.type == "cuda":
            # Marked on the device, the whole batch in one pass, before the copy to the host.
            faces_t, masks_t = self.decode_batch_t(decoder, latents, marks)
            masks_np = None if masks_t is None else masks_t.cpu().numpy()
            return faces_t.permute(0, 2, 3, 1).cpu().numpy(), masks_np
        rgb, mask = self._decoded(decoder, latents)
        masks = None if mask is None else inference.tensor_to_images(mask.float())
        faces = inference.tensor_to_images(rgb.float())
        if marked:
            faces[marked] = wm.embed_watermark_batch(faces[marked], payloads)
        return faces, masks

    def decode_batch_t(
        self,
        decoder: Decoder,
        latents: torch.Tensor,
        marks: Sequence[bytes | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As decode_batch, but the faces (N,3,R,R) and masks (N,R,R), uint8, stay on the
        device: the frame pipeline masks, colour-corrects and pastes them there."""
        rgb, mask = self._decoded(decoder, latents)
        faces = to_uint8(rgb.float())
        masks = None if mask is None else to_uint8(mask.float())[:, 0]
        marked, payloads = _marked(marks)
        if marked:
            faces[marked] = wm.embed_watermark_batch_t(faces[marked], payloads)
        return faces, masks

    def enter_compute_thread(self) -> None:
        """The batcher's thread owns the process's intra-op threads (torch_threads, 0 =
        torch's default); threads that start computing after it use one
        (inference.own_intra_op_threads says why)."""
        self.compute_threads = inference.own_intra_op_threads(self.settings.torch_threads)
        log.info("batches run on %d intra-op thread(s), other threads on one", self.compute_threads)

    def latents_to_device(self, latents: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(latents, dtype=np.float32)).to(self.device)

    def latents_to_host(self, latents: torch.Tensor) -> np.ndarray:
        return latents.float().cpu().numpy()

    def validate_decoder_upload(self, data: checkpoint.PathOrBytes) -> checkpoint.DecoderMeta:
        """Fully validate an uploaded decoder (parse, shapes, fingerprint) before storing;
        a path is a staged upload file."""
        self.encoder()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            # Read here so that what the caller is told names no path of this server; the
            # checks read every tensor anyway.
            data = Path(data).read_bytes()
        _, meta = checkpoint.load_decoder(
            data, device="cpu", expected_encoder_fingerprint=self.fingerprint
        )
        assert self.config is not None
        # Decoder widths may differ per identity (a bigger decoder for a demanding one);
        # what must match is what the encoder hands over and the size it works at.
        got, want = meta.config, self.config
        if (got.latent_shape, got.resolution) != (want.latent_shape, want.resolution):
            raise CheckpointError(
                f"decoder takes latents {list(got.latent_shape)} at {got.resolution}px but the "
                f"served encoder makes {list(want.latent_shape)} at {want.resolution}px"
            )
        return meta
