"""Server TLS from settings, with certificates reloaded from disk without a restart.

gRPC asks the fetcher for a new certificate configuration at each TLS handshake; it answers
None (keep the current one) unless a file changed, so renewing a certificate (cert-manager,
an ACME client) takes effect for the next connection.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import grpc
from facemux.models.errors import InvalidInputError

log = logging.getLogger(__name__)


def _stamp(paths: list[Path]) -> tuple[tuple[float, int], ...]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((st.st_mtime, st.st_size))
    return tuple(out)


def _read(cert: Path, key: Path, ca: Path | None) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=ca.read_bytes() if ca is not None else None,
    )


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """Credentials that require client certificates signed by `client_ca` when it is set."""
    paths = [Path(cert), Path(key)] + ([Path(client_ca)] if client_ca else [])
    ca = Path(client_ca) if client_ca else None
    try:
        initial = _read(paths[0], paths[1], ca)
        state = {"stamp": _stamp(paths)}
    except OSError as exc:
        raise InvalidInputError(f"TLS files: {exc.filename}: {exc.strerror}") from None

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        try:
            stamp = _stamp(paths)
            if stamp == state["stamp"]:
                return None
            config = _read(paths[0], paths[1], ca)
        except OSError as exc:
            # Mid-rotation (one file written, not the other): keep serving the old pair.
            log.warning("TLS reload skipped: %s", exc)
            return None
        state["stamp"] = stamp
        log.info("TLS certificate reloaded from %s", paths[0])
        return config

    fetcher: Callable[[], grpc.ServerCertificateConfiguration | None] = fetch
    return grpc.dynamic_ssl_server_credentials(
        initial, fetcher, require_client_authentication=ca is not None
    )
