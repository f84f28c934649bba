"""``cervl serve``: a FastAPI + uvicorn server for a trained run (see :mod:`cervl.serve.app`).

Imports: everything up to ``explain`` and ``evaluate``; not ``scale``, ``train`` or ``cli``."""

from __future__ import annotations

import ipaddress
import logging
import socket

from cervl.core.errors import InvalidInput, MissingResource

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None, insecure_no_auth: bool) -> None:
    """Refuse a non-loopback ``host`` without an API key (unless ``insecure_no_auth``): the one place that
    decides it, called by the CLI before the model loads and by :func:`serve` itself."""
    if not is_loopback(host) and not api_key and not insecure_no_auth:
        raise InvalidInput(f"--host {host} is reachable from other machines: set an API key (--api-key-env NAME) "
                           f"or pass --insecure-no-auth")


def serve(predictor, *, host: str = "127.0.0.1", port: int = 8000, settings=None, run_info: dict | None = None,
          insecure_no_auth: bool = False, limit_concurrency: int = 512) -> None:
    """Serve ``predictor`` until interrupted. Off loopback, an API key is required unless ``insecure_no_auth``."""
    try:
        import uvicorn

        from cervl.serve.app import ServeSettings, create_app
    except ImportError as e:
        raise MissingResource(f"the server needs the 'serve' extra: pip install 'cervl[serve]' ({e})") from None
    settings = settings or ServeSettings()
    check_exposure(host, settings.api_key, insecure_no_auth)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:  # fail early, in one line
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise InvalidInput(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    app = create_app(predictor, settings, run_info=run_info)
    # limit_concurrency: past it new connections get 503 instead of exhausting file descriptors;
    # timeout_keep_alive: idle connections are closed, so stalled clients do not pile up.
    uvicorn.run(app, host=host, port=port, log_level="info", limit_concurrency=limit_concurrency,
                timeout_keep_alive=5, h11_max_incomplete_event_size=64 * 1024)


__all__ = ["check_exposure", "is_loopback", "serve"]
