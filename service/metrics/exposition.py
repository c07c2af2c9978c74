"""The registry over HTTP."""

from __future__ import annotations

import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

# serve_forever looks for a shutdown request this often: prometheus-client's own server
# uses the default 0.5 s, which every server stop (and every test's server) waited out.
_POLL_S = 0.05


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds would flood the server's log


class MetricsServer:
    """/metrics over HTTP on its own port and thread (a threaded WSGI server around
    prometheus-client's app), so a scrape never waits on the gRPC event loop."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        addr = host.strip("[]") or "0.0.0.0"
        server_class = _Server6 if ":" in addr else _Server
        self._httpd = make_server(
            addr, port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler
        )
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": _POLL_S},
            name="metrics-http",
            daemon=True,
        )
        self._thread.start()
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
