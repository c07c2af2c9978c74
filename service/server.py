"""Building and running the gRPC server."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from dataclasses import dataclass, field, fields

import grpc
from facemux.models.errors import NotFoundError
from facemux.service.audit import AuditLog
from facemux.service.auth import (
    AttemptLimiter,
    Guard,
    GuardInterceptor,
    RateLimiter,
    check_startup,
)
from facemux.service.budget import PixelBudget
from facemux.service.frames import FramePipeline
from facemux.service.identity_servicer import IdentityServicer
from facemux.service.metrics import Metrics, MetricsServer, grpc_type
from facemux.service.provenance import Provenance, ProvenanceServicer
from facemux.service.runtime import Runtime
from facemux.service.scheduler import Scheduler
from facemux.service.settings import Settings
from facemux.service.store import LocalStore, Store
from facemux.service.swap_servicer import SwapServicer
from facemux.service.tls import server_credentials
from facemux.service.training.servicer import Training, TrainingServicer
from facemux.v1 import (
    identity_service_pb2,
    identity_service_pb2_grpc,
    provenance_service_pb2,
    provenance_service_pb2_grpc,
    swap_service_pb2,
    swap_service_pb2_grpc,
    training_service_pb2,
    training_service_pb2_grpc,
)
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    swap_service_pb2.DESCRIPTOR.services_by_name["SwapService"].full_name,
    identity_service_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name,
    training_service_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name,
    provenance_service_pb2.DESCRIPTOR.services_by_name["ProvenanceService"].full_name,
)
# A health service name that is SERVING for as long as the process answers, whether or not
# the model is loaded: the liveness probe asks for it, so a server waiting for its first
# encoder (or draining) is not restarted; readiness asks for "" (model loaded, not draining).
LIVENESS_SERVICE = "liveness"


@dataclass
class App:
    """Everything one server process holds."""

    settings: Settings
    server: grpc.aio.Server
    port: int
    store: Store
    runtime: Runtime
    scheduler: Scheduler
    health: health_aio.HealthServicer
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    metrics: Metrics = field(default_factory=Metrics)
    metrics_server: MetricsServer | None = None  # None when metrics_port is -1
    audit: AuditLog | None = None
    training: Training | None = None  # datasets and training jobs
    frames: FramePipeline | None = None  # full-frame detection (its worker processes)
    health_server: grpc.aio.Server | None = None  # the plain-text health-only port
    health_port: int | None = None
    budget: PixelBudget | None = None  # decoded pixels in flight, shared by every RPC

    @property
    def metrics_port(self) -> int | None:
        """The bound /metrics port (the real one when metrics_port was 0), None if off."""
        return None if self.metrics_server is None else self.metrics_server.port

    async def close(self) -> None:
        """After the server stopped: end background work."""
        for task in self.tasks:
            task.cancel()
        if self.health_server is not None:
            await self.health_server.stop(0)
        await asyncio.to_thread(self.scheduler.stop)
        if self.frames is not None:
            await asyncio.to_thread(self.frames.close)
        if self.training is not None:
            # Running jobs checkpoint and stop; the next start resumes them.
            await asyncio.to_thread(self.training.close)
        # Last, so a final scrape during the drain still sees the in-flight calls finish.
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.close)
        self.metrics.close()
        if self.audit is not None:
            self.audit.close()

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)
        self.metrics.set_serving(serving)


async def _load_model(app: App, poll_seconds: float = 0.5) -> None:
    """Load the encoder; while the store has none yet, keep looking (a server may start
    before its first pretraining finishes), staying NOT_SERVING meanwhile."""
    waiting_logged = False
    while True:
        try:
            await asyncio.to_thread(app.runtime.load)
            break
        except NotFoundError as exc:
            if not waiting_logged:
                log.warning("%s; waiting for an encoder to appear (NOT_SERVING)", exc)
                waiting_logged = True
            await asyncio.sleep(poll_seconds)
        except Exception:
            # Stay up and NOT_SERVING: the operator sees why in the log and in health
            # checks, and identity management still needs a live process to answer.
            log.exception("could not load the encoder; the server stays NOT_SERVING")
            return
    await app.set_serving(True)


async def build_app(settings: Settings, store: Store | None = None) -> App:
    """Create the server, bind its port and start loading the model in the background.

    Must run inside the event loop that will serve (grpc.aio binds to it)."""
    store = store or LocalStore(settings.store)
    metrics = Metrics(
        max_identities=settings.metrics_max_identities,
        max_batch=settings.max_batch_size,
        max_detector_batch=settings.detector_max_batch,
    )
    # Bind the metrics port first: a port clash fails the start before anything else runs,
    # as a clash on the gRPC port does.
    metrics_server = (
        None
        if settings.metrics_port < 0
        else MetricsServer(metrics.registry, settings.host, settings.metrics_port)
    )
    try:
        return await _build_app(settings, store, metrics, metrics_server)
    except BaseException:
        if metrics_server is not None:
            metrics_server.close()
        metrics.close()
        raise


async def _build_app(
    settings: Settings, store: Store, metrics: Metrics, metrics_server: MetricsServer | None
) -> App:
    # Refuse to start on unusable trust settings before anything else starts.
    registry = check_startup(
        settings.auth,
        settings.auth_tokens_file,
        settings.tls_client_ca,
        host=settings.host,
        tls_cert=settings.tls_cert,
        allow_insecure_tokens=settings.allow_insecure_tokens,
        reload_s=settings.auth_reload_seconds,
    )
    credentials = (
        server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        if settings.tls_cert
        else None
    )
    audit = AuditLog(settings.audit_log, settings.audit_max_bytes, settings.audit_backups)
    guard = Guard(
        settings.auth,
        registry,
        RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst),
        settings.max_streams_per_caller,
        audit=audit.hook if audit.enabled else None,
        refusals=audit.refusal if audit.enabled else None,
        attempts=AttemptLimiter(settings.auth_attempts_per_second, settings.auth_attempt_burst),
        max_pending_checks=settings.auth_max_pending_checks,
        max_message_bytes=settings.max_message_bytes,
    )
    runtime = Runtime(settings, store)
    scheduler = Scheduler(
        runtime,
        max_batch=settings.max_batch_size,
        max_wait_s=settings.max_batch_wait_ms / 1000.0,
        max_queue_faces=settings.max_queue_faces,
        batching=settings.batching,
        on_batch=metrics.observe_batch,
    )
    metrics.attach(runtime=runtime, store=store, queue_depth=scheduler.queue_depth)
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", int(settings.reuse_port)),
    ]
    # Metrics outermost, so refused calls (UNAUTHENTICATED, ...) are counted too.
    server = grpc.aio.server(
        options=options,
        interceptors=[metrics.interceptor(), GuardInterceptor(guard)],
        # Bounds memory: each call in progress holds at most one message of its method's
        # limit; over this count gRPC answers RESOURCE_EXHAUSTED before any handler runs.
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None,
    )
    # Signing key loaded (or the test one generated) now: a bad key fails the start.
    provenance = await asyncio.to_thread(Provenance, settings, store)
    # One budget of decoded pixels for every RPC that decodes images (service/budget.py).
    budget = PixelBudget.from_settings(settings)
    swap = SwapServicer(
        settings, runtime, store, scheduler, metrics=metrics, provenance=provenance, budget=budget
    )
    swap_service_pb2_grpc.add_SwapServiceServicer_to_server(swap, server)
    provenance_service_pb2_grpc.add_ProvenanceServiceServicer_to_server(
        ProvenanceServicer(settings, budget), server
    )
    identity_service_pb2_grpc.add_IdentityServiceServicer_to_server(
        IdentityServicer(settings, runtime, store), server
    )
    training = Training(settings, store, runtime, metrics, audit=audit if audit.enabled else None)
    training_service_pb2_grpc.add_TrainingServiceServicer_to_server(
        TrainingServicer(training, budget), server
    )
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    metrics.init_grpc_methods(
        _grpc_methods((*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
    )
    reflection.enable_server_reflection(
        (
            *SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    port = (
        server.add_insecure_port(settings.address)
        if credentials is None
        else server.add_secure_port(settings.address, credentials)
    )
    try:
        if port == 0:
            raise OSError(f"could not bind {settings.address}")
        health_server, health_port = await _health_only(settings, health)
    except OSError:
        await asyncio.to_thread(scheduler.stop)
        await asyncio.to_thread(training.close)
        await asyncio.to_thread(swap.frames.close)
        raise
    app = App(
        settings,
        server,
        port,
        store,
        runtime,
        scheduler,
        health,
        metrics=metrics,
        metrics_server=metrics_server,
        audit=audit,
        training=training,
        frames=swap.frames,
        budget=budget,
        health_server=health_server,
        health_port=health_port,
    )
    await app.set_serving(False)
    app.tasks.append(asyncio.create_task(_load_model(app)))
    return app


async def _health_only(
    settings: Settings, health: health_aio.HealthServicer
) -> tuple[grpc.aio.Server | None, int | None]:
    """The health_port server: grpc.health.v1 alone, in plain text, for probes that cannot
    speak TLS (Kubernetes' native gRPC probes). It answers SERVING or NOT_SERVING, nothing
    else, and accepts no message over 4 KiB."""
    if settings.health_port < 0:
        return None, None
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 4096),
            ("grpc.so_reuseport", int(settings.reuse_port)),
        ],
        maximum_concurrent_rpcs=64,
    )
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = settings.replace(port=settings.health_port).address
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind the health port {address}")
    await server.start()
    return server, port


def _grpc_methods(services: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(grpc_type, service, method) of every method of the named services."""
    pool = descriptor_pool.Default()
    out = []
    for name in services:
        for m in pool.FindServiceByName(name).methods:
            out.append((grpc_type(m.client_streaming, m.server_streaming), name, m.name))
    return out


async def create_server(settings: Settings) -> tuple[grpc.aio.Server, int]:
    """A bound, not yet started server and its port. Health answers NOT_SERVING until the
    encoder is loaded (which starts now, in the background)."""
    app = await build_app(settings)
    return app.server, app.port


async def serve(settings: Settings, ready: asyncio.Event | None = None) -> None:
    """Run until SIGINT/SIGTERM, then drain: NOT_SERVING, refuse new calls, finish the
    ones in flight within the grace period."""
    app = await build_app(settings)
    await app.server.start()
    # The modules, the encoder and the server's own objects live as long as the process:
    # frozen, a full collection while serving (about 0.2 s over torch's objects here, a pause
    # on every call in flight) and the collections at exit no longer walk them.
    gc.freeze()
    log.info("facemux listening on %s (store %s)", f"{settings.host}:{app.port}", settings.store)
    if app.metrics_server is not None:
        log.info("metrics on %s", app.metrics_server.url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("shutting down: draining for up to %.1fs", settings.grace_seconds)
    await app.set_serving(False)
    await app.server.stop(settings.grace_seconds)
    await app.close()
    log.info("stopped")


_DEFAULT_METRICS_PORT = next(f.default for f in fields(Settings) if f.name == "metrics_port")


class ServerThread:
    """A real server on its own event loop in a background thread: for the demo, tests and
    benchmarks that drive it with the (synchronous) client from the main thread.

        with ServerThread(settings) as srv:
            client = FacemuxClient(srv.target)
    """

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        import threading

        # Embedded servers run beside others in one process or on one machine, so one left
        # at the default metrics port takes any free port instead (app.metrics_port says
        # which); an explicit port, or -1, is kept.
        if settings.metrics_port == _DEFAULT_METRICS_PORT:
            settings = settings.replace(metrics_port=0)
        self.settings = settings
        self.store = store  # None: a LocalStore on settings.store
        self.app: App | None = None
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._grace = 1.0
        self._stop_requested: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="facemux-server", daemon=True)

    @property
    def port(self) -> int:
        assert self.app is not None
        return self.app.port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            try:
                self.app = await build_app(self.settings, self.store)
                await self.app.server.start()
            except BaseException as exc:
                self._error = exc
                raise
            finally:
                self._started.set()
            self._stop_requested = asyncio.Event()
            await self._stop_requested.wait()
            await self.app.server.stop(self._grace)
            await self.app.close()

        try:
            self._loop.run_until_complete(main())
        except BaseException:
            if self._error is None:
                raise

    def start(self) -> ServerThread:
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error
        return self

    def stop(self, grace: float = 1.0) -> None:
        self._grace = grace
        if self._thread.is_alive():
            assert self._stop_requested is not None
            self._loop.call_soon_threadsafe(self._stop_requested.set)
        self._thread.join(timeout=grace + 10)
        if self._thread.is_alive():
            raise RuntimeError("facemux server thread did not stop")
        self._loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
