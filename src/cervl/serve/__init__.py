"""A small HTTP server for a trained run (standard library only; binds 127.0.0.1 by default)."""

from cervl.serve.server import make_server, serve

__all__ = ["make_server", "serve"]
