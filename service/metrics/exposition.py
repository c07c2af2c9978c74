"""The registry over HTTP."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer


class MetricsServer:
    """/metrics over HTTP on its own port and thread (prometheus-client's WSGI server),
    so a scrape never waits on the gRPC event loop."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        self._httpd: WSGIServer
        self._thread: threading.Thread
        addr = host.strip("[]") or "0.0.0.0"
        self._httpd, self._thread = start_http_server(port, addr=addr, registry=registry)
        self.port = int(self._httpd.server_port)
        self.host = addr

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
