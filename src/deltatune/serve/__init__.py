"""``deltatune serve``: many adapters on one base model over an OpenAI-compatible HTTP API.

:class:`ServeConfig` holds the options, :class:`DeltaServer` the model, adapters and batcher, and
:func:`build_app` the FastAPI routes over it (run it with uvicorn). FastAPI and uvicorn are the ``serve``
extra (``pip install 'deltatune[serve]'``); importing this package does not import them.
"""

from __future__ import annotations

from .errors import ServeError
from .server import DeltaServer, ServeConfig


def build_app(server: DeltaServer):
    """The FastAPI application serving ``server`` (see :mod:`.app`)."""
    from .app import build_app as _build

    return _build(server)


__all__ = ["DeltaServer", "ServeConfig", "ServeError", "build_app"]
