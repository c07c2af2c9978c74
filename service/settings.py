"""Server settings: the only place that reads environment variables and command-line flags.

Precedence: flag > FACEMUX_* environment variable > default. Every field has an
environment variable named FACEMUX_<FIELD> and a flag --<field-with-dashes>.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from facemux.models.errors import InvalidInputError

ENV_PREFIX = "FACEMUX_"


def _help(text: str) -> dict[str, Any]:
    return {"help": text}


@dataclass(frozen=True)
class Settings:
    host: str = field(default="127.0.0.1", metadata=_help("address to listen on ([::] for all)"))
    port: int = field(default=50051, metadata=_help("gRPC port; 0 picks a free one"))
    store: Path = field(default=Path("facemux-store"), metadata=_help("identity store directory"))
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda or cuda:N"))
    encoder: str = field(
        default="", metadata=_help("encoder fingerprint to serve; empty = the store's default")
    )
    max_message_bytes: int = field(
        default=64 * 1024 * 1024, metadata=_help("largest gRPC message accepted or sent")
    )
    max_image_pixels: int = field(
        default=40_000_000, metadata=_help("largest image accepted (width x height)")
    )
    max_request_pixels: int = field(
        default=100_000_000,
        metadata=_help(
            "most decoded pixels of all images in one call, summed from their headers before "
            "anything is decoded"
        ),
    )
    max_inflight_pixels: int = field(
        default=160_000_000,
        metadata=_help(
            "most decoded pixels held at once by all calls together; a call that would pass "
            "it waits, then is RESOURCE_EXHAUSTED"
        ),
    )
    max_inflight_wait_seconds: float = field(
        default=10.0,
        metadata=_help("how long a call waits for max_inflight_pixels (or its deadline)"),
    )
    max_verify_pixels: int = field(
        default=40_000_000, metadata=_help("largest image Verify accepts (width x height)")
    )
    max_faces_per_request: int = field(
        default=256, metadata=_help("most aligned faces or latents in one call")
    )
    max_checkpoint_bytes: int = field(
        default=1024 * 1024 * 1024, metadata=_help("largest decoder checkpoint upload")
    )
    decoder_cache_count: int = field(
        default=16, metadata=_help("most decoders resident on the device at once")
    )
    decoder_cache_bytes: int = field(
        default=0, metadata=_help("most bytes of resident decoders; 0 = no byte bound")
    )
    batching: bool = field(
        default=True, metadata=_help("batch model work across concurrent requests")
    )
    max_batch_size: int = field(default=32, metadata=_help("most faces in one model batch"))
    max_batch_wait_ms: float = field(
        default=2.0,
        metadata=_help(
            "longest a forming batch waits without an arrival, for requests already on "
            "their way (never for a lone caller)"
        ),
    )
    max_queue_faces: int = field(
        default=2048, metadata=_help("faces waiting for the model before RESOURCE_EXHAUSTED")
    )
    detector: str = field(
        default="hog",
        metadata=_help(
            "face detector: hog (dlib, CPU), blazeface (torch, on the model's device; "
            "Apache-2.0 weights) or yunet (operator's ONNX file)"
        ),
    )
    detector_landmarks: str = field(
        default="dlib",
        metadata=_help(
            "blazeface: dlib = the landmark model predicts inside its boxes (closer on real "
            "photos); detector = its own keypoints, fitted to the template, no dlib step"
        ),
    )
    detector_tiles: int = field(
        default=2,
        metadata=_help(
            "blazeface: 1 looks at each frame whole (faces from ~1/10 of its long side); "
            "n adds an n x n tile grid for smaller faces"
        ),
    )
    detector_batching: bool = field(
        default=True,
        metadata=_help(
            "blazeface: detect the frames of concurrent calls together, one network pass "
            "(a lone frame never waits for company)"
        ),
    )
    detector_max_batch: int = field(
        default=16, metadata=_help("blazeface: most frames in one detection batch")
    )
    detector_max_wait_ms: float = field(
        default=2.0,
        metadata=_help(
            "blazeface: longest a forming detection batch waits without an arrival, for "
            "frames already being decoded"
        ),
    )
    detector_model: str = field(
        default="", metadata=_help("ONNX model file for the yunet detector")
    )
    detector_threshold: float = field(
        default=0.3,
        metadata=_help("HOG detector score threshold; higher = fewer false faces"),
    )
    detector_max_side: int = field(
        default=640, metadata=_help("frames are downscaled to this longest side to detect")
    )
    detector_processes: int = field(
        default=-1,
        metadata=_help(
            "HOG detection worker processes (dlib holds the GIL, so one process detects one "
            "frame at a time): -1 = auto, half the usable cores when there are 4 or more, "
            "else 0 = in the server's process"
        ),
    )
    landmark_points: int = field(
        default=5, metadata=_help("landmark model: 5 (CC0) or 68 (non-commercial data)")
    )
    max_faces_per_frame: int = field(
        default=8, metadata=_help("most faces swapped in one frame (largest first)")
    )
    detect_every: int = field(
        default=5, metadata=_help("in streams, run the detector every N frames and track between")
    )
    frame_pipeline: str = field(
        default="auto",
        metadata=_help("pixel ops for full frames: auto (tensor on CUDA), opencv or tensor"),
    )
    gpu_jpeg: str = field(
        default="auto",
        metadata=_help(
            "JPEG frames decoded/encoded by nvjpeg on the GPU: auto (when the tensor frame "
            "pipeline runs on CUDA and torchvision is installed), on (fail at start without "
            "it) or off"
        ),
    )
    precision: str = field(
        default="auto", metadata=_help("auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16")
    )
    compile: str = field(
        default="off",
        metadata=_help("torch.compile on CUDA: off, default, reduce-overhead (CUDA graphs)"),
    )
    cpu_layout: str = field(
        default="auto",
        metadata=_help(
            "memory layout of the model on CPU: auto (both timed at load, the faster kept), "
            "nchw or channels_last"
        ),
    )
    warmup_batch_sizes: str = field(
        default="1", metadata=_help("batch sizes run once at load, comma-separated")
    )
    batch_buckets: str = field(
        default="auto",
        metadata=_help(
            "batch sizes the model runs at, each batch padded with blank rows up to the next "
            "(a compiled model is traced once per bucket, and every bucket is warmed up at "
            "load): auto (1, 2, 4, ... up to max_batch_size when compile is on, none when "
            "off), off, or sizes like 1,8,32 up to max_batch_size, ending at it"
        ),
    )
    torch_threads: int = field(
        default=0,
        metadata=_help(
            "intra-op threads of the thread that runs the model's batches (the server's other "
            "threads use one); 0 = torch's default: OMP_NUM_THREADS, else one per core"
        ),
    )
    processes: int = field(
        default=1,
        metadata=_help(
            "server processes sharing the gRPC port (SO_REUSEPORT; needs a fixed port), each "
            "with its own model copy, decoders, event loop and /metrics (metrics_port + i): "
            "for a GPU whose host side one Python process cannot keep busy. The kernel "
            "spreads connections, not calls, over them"
        ),
    )
    reuse_port: bool = field(
        default=False,
        metadata=_help(
            "bind the gRPC and health ports with SO_REUSEPORT, beside other processes that "
            "do (processes > 1 sets it for its own); off, a second server on a taken port "
            "fails to start instead of sharing it"
        ),
    )
    grace_seconds: float = field(
        default=10.0, metadata=_help("how long in-flight calls may finish on shutdown")
    )
    auth: str = field(
        default="tokens",
        metadata=_help("tokens (bearer tokens), mtls (client certificates) or off (explicitly)"),
    )
    auth_tokens_file: str = field(
        default="", metadata=_help("JSON-lines file of callers: name, hashed token, roles")
    )
    auth_reload_seconds: float = field(
        default=1.0,
        metadata=_help(
            "how often a call may look at auth_tokens_file for changes (added, re-keyed or "
            "removed callers apply within this time)"
        ),
    )
    tls_cert: str = field(default="", metadata=_help("server certificate (PEM); reloaded live"))
    tls_key: str = field(default="", metadata=_help("server private key (PEM)"))
    tls_client_ca: str = field(
        default="", metadata=_help("CA (PEM) that client certificates must chain to (mTLS)")
    )
    audit_log: str = field(
        default="-", metadata=_help("audit trail: - = stdout, a path = rotating file, empty = off")
    )
    audit_max_bytes: int = field(
        default=100 * 1024 * 1024, metadata=_help("audit file size before it rotates")
    )
    audit_backups: int = field(default=10, metadata=_help("rotated audit files kept"))
    rate_limit_per_second: float = field(
        default=0.0, metadata=_help("calls per second per caller; 0 = no rate limit")
    )
    rate_limit_burst: int = field(
        default=0, metadata=_help("calls a caller may burst; 0 = twice the rate (at least 1)")
    )
    max_streams_per_caller: int = field(
        default=16, metadata=_help("concurrent streaming calls per caller; 0 = unbounded")
    )
    max_concurrent_rpcs: int = field(
        default=64,
        metadata=_help(
            "calls in progress at once, over all callers, before new ones get "
            "RESOURCE_EXHAUSTED; 0 = unbounded"
        ),
    )
    allow_insecure_tokens: bool = field(
        default=False,
        metadata=_help(
            "accept bearer tokens without TLS on a non-loopback host (only where something "
            "else encrypts the traffic, e.g. a service mesh)"
        ),
    )
    auth_attempts_per_second: float = field(
        default=1.0,
        metadata=_help(
            "failed token checks per second per client address (3x per claimed caller name) "
            "before RESOURCE_EXHAUSTED; 0 = unlimited"
        ),
    )
    auth_attempt_burst: int = field(
        default=10, metadata=_help("failed token checks a client address may burst (3x per name)")
    )
    auth_max_pending_checks: int = field(
        default=32, metadata=_help("new (unverified) tokens being checked at once, in all")
    )
    health_port: int = field(
        default=-1,
        metadata=_help(
            "extra plain-text port that serves only grpc.health.v1 (probes of a TLS server); "
            "-1 = off"
        ),
    )
    max_upload_bytes: int = field(
        default=1024 * 1024 * 1024, metadata=_help("largest dataset upload (bytes)")
    )
    max_dataset_faces: int = field(
        default=100_000, metadata=_help("most face images in one dataset")
    )
    provenance: str = field(
        default="on",
        metadata=_help(
            "marks on outputs: on (C2PA manifest + watermark), watermark-only, or off (explicitly)"
        ),
    )
    provenance_key: str = field(
        default="", metadata=_help("C2PA signing key (PEM); empty = a generated test key")
    )
    provenance_cert: str = field(
        default="", metadata=_help("C2PA certificate chain (PEM, leaf first) for provenance_key")
    )
    log_level: str = field(default="INFO", metadata=_help("logging level"))
    max_running_jobs: int = field(
        default=1, metadata=_help("training jobs running at once (one process each)")
    )
    max_queued_jobs: int = field(
        default=16, metadata=_help("training jobs waiting before Train is RESOURCE_EXHAUSTED")
    )
    training_threads: int = field(
        default=0, metadata=_help("torch threads of each training process; 0 = one per core")
    )
    training_log_every: int = field(
        default=10, metadata=_help("training steps between progress events")
    )
    training_scan_seconds: float = field(
        default=2.0,
        metadata=_help(
            "how often a server looks in the store for jobs other replicas submitted or "
            "gave up (replicas sharing one store)"
        ),
    )
    training_lease_seconds: float = field(
        default=60.0,
        metadata=_help(
            "replicas sharing a store: how long a job's claim may go unrenewed before another "
            "replica takes the job over (longer than the volume's attribute caching)"
        ),
    )
    metrics_port: int = field(
        default=9090,
        metadata=_help("Prometheus /metrics HTTP port (same host); 0 = any free port, -1 = off"),
    )
    metrics_max_identities: int = field(
        default=100,
        metadata=_help("identities with their own metrics label; the rest count as (other)"),
    )

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"port {self.port} is not in 0..65535")
        if not -1 <= self.metrics_port <= 65535:
            problems.append(f"metrics_port {self.metrics_port} is not in -1..65535")
        if self.metrics_max_identities < 0:
            problems.append("metrics_max_identities must be >= 0")
        for name in (
            "max_message_bytes",
            "max_image_pixels",
            "max_request_pixels",
            "max_inflight_pixels",
            "max_verify_pixels",
            "max_faces_per_request",
            "max_checkpoint_bytes",
            "decoder_cache_count",
            "max_batch_size",
            "max_queue_faces",
            "detector_max_side",
            "detector_max_batch",
            "max_faces_per_frame",
            "detect_every",
            "max_running_jobs",
            "max_queued_jobs",
            "training_log_every",
        ):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if (
            min(
                self.decoder_cache_bytes,
                self.torch_threads,
                self.grace_seconds,
                self.max_batch_wait_ms,
                self.detector_max_wait_ms,
                self.training_threads,
            )
            < 0
        ):
            problems.append(
                "decoder_cache_bytes, torch_threads, grace_seconds, max_batch_wait_ms, "
                "detector_max_wait_ms and training_threads must be >= 0"
            )
        for name in ("max_upload_bytes", "max_dataset_faces", "audit_max_bytes"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if min(self.rate_limit_per_second, self.rate_limit_burst, self.max_streams_per_caller) < 0:
            problems.append(
                "rate_limit_per_second, rate_limit_burst and max_streams_per_caller must be >= 0"
            )
        if min(self.max_concurrent_rpcs, self.auth_attempts_per_second) < 0:
            problems.append("max_concurrent_rpcs and auth_attempts_per_second must be >= 0")
        if min(self.auth_attempt_burst, self.auth_max_pending_checks) < 1:
            problems.append("auth_attempt_burst and auth_max_pending_checks must be >= 1")
        if not (math.isfinite(self.auth_reload_seconds) and self.auth_reload_seconds >= 0):
            problems.append(f"auth_reload_seconds must be >= 0, got {self.auth_reload_seconds}")
        if not -1 <= self.health_port <= 65535:
            problems.append(f"health_port {self.health_port} is not in -1..65535")
        if self.max_image_pixels > self.max_request_pixels:
            problems.append("max_image_pixels must be <= max_request_pixels")
        if max(self.max_image_pixels, self.max_verify_pixels) > self.max_inflight_pixels:
            # A call holds one full-size image at a time; a larger one could never run.
            problems.append("max_image_pixels and max_verify_pixels must be <= max_inflight_pixels")
        if not (
            math.isfinite(self.max_inflight_wait_seconds) and self.max_inflight_wait_seconds >= 0
        ):
            problems.append("max_inflight_wait_seconds must be >= 0")
        if self.auth not in ("tokens", "mtls", "off"):
            problems.append(f"auth {self.auth!r} must be tokens, mtls or off")
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("tls_cert and tls_key go together: set both or neither")
        if self.tls_client_ca and not self.tls_cert:
            problems.append("tls_client_ca (mTLS) needs tls_cert and tls_key")
        if self.provenance not in ("on", "watermark-only", "off"):
            problems.append(f"provenance {self.provenance!r} must be on, watermark-only or off")
        if bool(self.provenance_key) != bool(self.provenance_cert):
            problems.append("provenance_key and provenance_cert go together: set both or neither")
        if self.detector not in ("hog", "yunet", "blazeface"):
            problems.append(f"detector {self.detector!r} must be hog, yunet or blazeface")
        if self.detector_landmarks not in ("dlib", "detector"):
            problems.append(
                f"detector_landmarks {self.detector_landmarks!r} must be dlib or detector"
            )
        if not 1 <= self.detector_tiles <= 4:
            problems.append(f"detector_tiles must be in 1..4, got {self.detector_tiles}")
        if not (math.isfinite(self.training_scan_seconds) and self.training_scan_seconds > 0):
            problems.append(f"training_scan_seconds must be > 0, got {self.training_scan_seconds}")
        if not (math.isfinite(self.training_lease_seconds) and self.training_lease_seconds >= 5):
            problems.append(
                f"training_lease_seconds must be >= 5, got {self.training_lease_seconds}"
            )
        if not 1 <= self.processes <= 64:
            problems.append(f"processes must be in 1..64, got {self.processes}")
        if self.metrics_port > 0 and self.metrics_port + self.processes - 1 > 65535:
            problems.append(f"metrics ports {self.metrics_port}+{self.processes} pass 65535")
        if self.processes > 1 and self.port == 0:
            problems.append("processes > 1 needs a fixed port: the processes share it")
        if not -1 <= self.detector_processes <= 64:
            problems.append(f"detector_processes must be in -1..64, got {self.detector_processes}")
        if self.detector == "yunet" and not self.detector_model:
            problems.append("the yunet detector needs detector_model (an ONNX file)")
        if self.frame_pipeline not in ("auto", "opencv", "tensor"):
            problems.append(
                f"frame_pipeline {self.frame_pipeline!r} must be auto, opencv or tensor"
            )
        if self.gpu_jpeg not in ("auto", "on", "off"):
            problems.append(f"gpu_jpeg {self.gpu_jpeg!r} must be auto, on or off")
        if self.cpu_layout not in ("auto", "nchw", "channels_last"):
            problems.append(f"cpu_layout {self.cpu_layout!r} must be auto, nchw or channels_last")
        if self.precision not in ("auto", "fp32", "bf16"):
            problems.append(f"precision {self.precision!r} must be auto, fp32 or bf16")
        if self.compile not in ("off", "default", "reduce-overhead", "max-autotune"):
            problems.append(
                f"compile {self.compile!r} must be off, default, reduce-overhead or max-autotune"
            )
        try:
            [int(b) for b in self.warmup_batch_sizes.split(",") if b.strip()]
        except ValueError:
            problems.append(f"warmup_batch_sizes {self.warmup_batch_sizes!r} must be like 1,8,32")
        if self.batch_buckets.strip() not in ("auto", "off"):
            try:
                sizes = self.listed_buckets()
            except ValueError:
                sizes = ()
            if not sizes or sizes[-1] != self.max_batch_size:
                problems.append(
                    f"batch_buckets {self.batch_buckets!r} must be auto, off or batch sizes "
                    f"from 1 to max_batch_size, the largest {self.max_batch_size} (like "
                    f"1,8,{self.max_batch_size})"
                )
        if self.landmark_points not in (5, 68):
            problems.append(f"landmark_points must be 5 or 68, not {self.landmark_points}")
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            problems.append(f"device {dev!r} must be auto, cpu, cuda or cuda:N")
        if problems:
            raise InvalidInputError("invalid settings: " + "; ".join(problems))

    @property
    def address(self) -> str:
        host = self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"

    def listed_buckets(self) -> tuple[int, ...]:
        """batch_buckets as sizes, ascending (ValueError for auto, off, or a size that is
        not a whole number from 1 to max_batch_size)."""
        sizes = set()
        for part in self.batch_buckets.split(","):
            b = part.strip()
            if not b:
                continue
            if not b.isdigit() or not 1 <= int(b) <= self.max_batch_size:
                raise ValueError(f"batch size {b!r}")
            sizes.add(int(b))
        return tuple(sorted(sizes))

    def detector_process_count(self) -> int:
        """detector_processes with auto resolved for this machine."""
        if self.detector_processes >= 0:
            return self.detector_processes
        cores = usable_cores()
        return min(16, cores // 2) if cores >= 4 else 0

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            env = ENV_PREFIX + f.name.upper()
            parser.add_argument(
                flag,
                dest=f.name,
                default=None,
                help=f"{f.metadata.get('help', '')} (env {env}, default {f.default})",
            )

    @classmethod
    def load(
        cls,
        args: argparse.Namespace | None = None,
        environ: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw: Any = None
            if args is not None and getattr(args, f.name, None) is not None:
                raw = getattr(args, f.name)
            elif ENV_PREFIX + f.name.upper() in env:
                raw = env[ENV_PREFIX + f.name.upper()]
            if f.name in overrides:
                raw = overrides[f.name]
            if raw is not None:
                values[f.name] = _coerce(f.name, raw, f.default)
        return cls(**values)


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may use: its CPU affinity, lowered to its cgroup's CPU quota (a
    Kubernetes CPU limit), which affinity does not show."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    quota = period = 0
    try:  # cgroup v2: "max 100000" or "400000 100000"
        q, p = (cgroup / "cpu.max").read_text().split()[:2]
        quota, period = (0 if q == "max" else int(q)), int(p)
    except (OSError, ValueError):
        try:  # cgroup v1: -1 = no limit
            quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
            period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            pass
    if quota > 0 and period > 0:
        cores = min(cores, max(1, math.ceil(quota / period)))
    return cores


def _coerce(name: str, raw: Any, default: Any) -> Any:
    """Convert a flag or environment string to the type of the field's default."""
    try:
        if isinstance(default, bool):
            return (
                raw
                if isinstance(raw, bool)
                else str(raw).strip().lower() in ("1", "true", "yes", "on")
            )
        if isinstance(default, Path):
            return Path(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        return str(raw)
    except (TypeError, ValueError) as exc:
        kind = type(default).__name__
        raise InvalidInputError(f"setting {name}={raw!r} is not a valid {kind}") from exc


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="facemux serve")
    Settings.add_arguments(parser)
    return Settings.load(parser.parse_args(argv))
