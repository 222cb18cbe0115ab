"""The HTTP routes (FastAPI): OpenAI-compatible embeddings and models, vLLM's classify and adapter
management routes, health and metrics."""

from __future__ import annotations

import base64
import contextlib
import hmac
import logging
import time

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse

from .errors import ServeError
from .schemas import ClassifyRequest, EmbeddingRequest, LoadAdapterRequest, UnloadAdapterRequest, as_list
from .server import DeltaServer

log = logging.getLogger("deltatune.serve")

#: The response header that tells a client the size of the model batch its request ran in.
BATCH_HEADER = "x-deltatune-batch-size"


class _BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets a 413 before any route reads it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, send)
        chunks, size, more = [], 0, True
        while more:  # read it all (bounded by the limit), then hand the route a replay
            message = await receive()
            if message["type"] != "http.request":
                chunks = None
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(scope, send)
            more = message.get("more_body", False)
        if chunks is None:
            return await self.app(scope, receive, send)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, send):
        error = ServeError(413, f"the request body is larger than {self.limit} bytes (--max-body-bytes)")
        await JSONResponse(error.body(), status_code=413)(scope, None, send)


def build_app(server: DeltaServer) -> FastAPI:
    """The FastAPI application for ``server``; starting it (uvicorn) starts the server's worker."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.start()
        try:
            yield
        finally:
            server.stop()

    def authorized(request: Request) -> None:
        key = server.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), key.encode()):  # constant time: no timing hints
            raise ServeError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")

    app = FastAPI(title="deltatune serve", version="1", lifespan=lifespan,
                  description="Many adapters on one base model, OpenAI-compatible.")
    guarded = [Depends(authorized)]

    @app.exception_handler(ServeError)
    async def _serve_error(request, exc: ServeError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request, exc: RequestValidationError):
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            return JSONResponse(ServeError(400, "the request body is not valid JSON").body(), status_code=400)
        parts = []
        for e in exc.errors()[:3]:
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        first = exc.errors()[0].get("loc", ()) if exc.errors() else ()
        param = str(first[1]) if len(first) > 1 else None
        return JSONResponse(ServeError(400, "invalid request: " + "; ".join(parts), param).body(), status_code=400)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "other")
        seconds = time.perf_counter() - start
        server.metrics.request(route, response.status_code, seconds)
        extra = {"method": request.method, "route": route, "status": response.status_code, "seconds": round(seconds, 6)}
        if BATCH_HEADER in response.headers:
            extra["batch_size"] = int(response.headers[BATCH_HEADER])
        log.info("request", extra=extra)
        return response

    @app.get("/health")
    async def health():
        """200 when the model is loaded and the worker runs (no API key needed)."""
        if not server.ready or not server.worker.alive():
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", dependencies=guarded, response_class=PlainTextResponse)
    async def metrics():
        """Counters, latency and batch-size histograms, adapters loaded/waiting/running (Prometheus text)."""
        waiting = {k or server.name: v for k, v in server.worker.waiting().items()}
        running = {k or server.name: v for k, v in getattr(server.worker, "running", dict)().items()}
        d = server.host.dispatcher
        return server.metrics.render(server.host.loaded, server.host.specs, waiting, running, server.host.loads,
                                     d.model_calls, dict(d.modes))

    @app.get("/v1/models", dependencies=guarded)
    async def models():
        """The base model and every adapter it serves (each adapter's ``parent`` is the base)."""
        created = int(server.started)
        data = [{"id": server.name, "object": "model", "created": created, "owned_by": "deltatune",
                 "root": server.model_dir, "parent": None}]
        data += [{"id": s.name, "object": "model", "created": created, "owned_by": "deltatune", "root": s.path,
                  "parent": server.name} for s in list(server.host.specs.values())]
        return {"object": "list", "data": data}

    def _inputs(value, param: str = "input") -> list:
        if server.kind != "encoder":
            raise ServeError(400, "this server serves a causal language model; use /v1/completions")
        items = as_list(value)
        if not items:
            raise ServeError(400, "input is empty", param=param)
        if len(items) > server.config.max_inputs:
            raise ServeError(400, f"{len(items)} inputs; at most {server.config.max_inputs} per request", param=param)
        return server.engine.encode(items, param)

    def _usage(rows: list) -> dict:
        tokens = sum(len(r) for r in rows)
        return {"prompt_tokens": tokens, "total_tokens": tokens}

    @app.post("/v1/embeddings", dependencies=guarded)
    async def embeddings(body: EmbeddingRequest):
        """Sentence embeddings, pooled as the model was trained (float lists or base64 float32)."""
        adapter = server.adapter_for(body.model)
        if server.kind != "encoder":
            raise ServeError(400, "this server serves a causal language model; use /v1/completions")
        if body.dimensions is not None and body.dimensions != server.embedding_size:
            raise ServeError(400, f"this model's embeddings have {server.embedding_size} dimensions; "
                                  f"dimensions={body.dimensions} cannot be served", param="dimensions")
        rows = _inputs(body.input)
        job = await server.run_rows(adapter, rows)
        server.metrics.served(body.model, len(rows), sum(len(r) for r in rows))
        data = [{"object": "embedding", "index": i, "embedding": _encode(emb, body.encoding_format)}
                for i, (emb, _) in enumerate(job.results)]
        return JSONResponse({"object": "list", "data": data, "model": body.model, "usage": _usage(rows)},
                            headers={BATCH_HEADER: str(job.batch_size)})

    @app.post("/classify", dependencies=guarded)
    async def classify(body: ClassifyRequest):
        """Class probabilities and the most likely label per input, from an adapter's classification head."""
        adapter = server.adapter_for(body.model)
        labels = server.labels_for(adapter)
        rows = _inputs(body.input)
        job = await server.run_rows(adapter, rows)
        server.metrics.served(body.model, len(rows), sum(len(r) for r in rows))
        data = []
        for i, (_, probs) in enumerate(job.results):
            values = probs.tolist()
            data.append({"index": i, "label": labels[int(torch.argmax(probs))], "probs": values,
                         "num_classes": len(values)})
        return JSONResponse({"id": f"classify-{time.time_ns():x}", "object": "list", "created": int(time.time()),
                             "model": body.model, "data": data, "usage": _usage(rows)},
                            headers={BATCH_HEADER: str(job.batch_size)})

    @app.post("/v1/load_lora_adapter", dependencies=guarded)
    async def load_lora_adapter(body: LoadAdapterRequest):
        """Load an adapter folder from under ``--adapter-root``; refused with a 4xx (and no change) if it
        is unreadable, leaves the root, does not fit the base or would change weights others share."""
        spec = await server.load_adapter(body.lora_name, body.lora_path)
        return {"object": "lora_adapter", "id": spec.name, "parent": server.name, "root": spec.path,
                "message": f"Success: LoRA adapter '{spec.name}' added successfully."}

    @app.post("/v1/unload_lora_adapter", dependencies=guarded)
    async def unload_lora_adapter(body: UnloadAdapterRequest):
        """Stop serving an adapter and free its tensors."""
        await server.unload_adapter(body.lora_name)
        return {"object": "lora_adapter", "id": body.lora_name,
                "message": f"Success: LoRA adapter '{body.lora_name}' removed successfully."}

    from .routes_gen import add_generation_routes

    add_generation_routes(app, server, guarded, BATCH_HEADER)
    if server.config.max_body_bytes:
        app.add_middleware(_BodyLimit, limit=server.config.max_body_bytes)
    return app


def _encode(embedding: torch.Tensor, fmt: str):
    """An embedding as floats, or as OpenAI's base64 of little-endian float32 (what its client asks for)."""
    if fmt == "base64":
        return base64.b64encode(embedding.float().numpy().astype("<f4").tobytes()).decode("ascii")
    return embedding.tolist()
