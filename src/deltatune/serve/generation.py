"""Text generation for a causal LM host: prompts to token ids, one decode step for sequences of many
adapters, sampling, stop strings and incremental text.

Each sequence keeps its own key/value cache (:mod:`.kvcache`), so the running set may change freely
between steps (iteration-level batching) and a row's result does not depend on its batch. Models whose
cache cannot be split per sequence (sliding windows, ...) rerun each whole prefix per step instead.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from . import kvcache
from .errors import ServeError
from .host import ModelHost

log = logging.getLogger("deltatune.serve")


@dataclass
class SamplingParams:
    """How one sequence picks tokens and when it ends (OpenAI's fields)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    logprobs: Optional[int] = None  # log-probabilities of each output token and of its top-N alternatives
    prompt_logprobs: bool = False  # the same for the prompt's tokens (``echo`` with ``logprobs``)


class GenSequence:
    """One prompt being completed: its tokens, its text so far, and where its output goes.

    Args:
        adapter: The adapter it runs (None: the base model).
        prompt: Prompt token ids.
        params: Sampling and stopping.
        emit: ``emit(sequence, delta_text, finished)``, called on the worker thread after each step.
    """

    def __init__(self, adapter: Optional[str], prompt: list[int], params: SamplingParams, emit):
        self.adapter, self.prompt, self.params, self.emit = adapter, list(prompt), params, emit
        self.out: list[int] = []
        self.text, self.sent = "", 0
        self.finish_reason: Optional[str] = None
        self.cancelled = False
        self.batch_size = 0
        self.cache = None  # per layer (key, value) of prompt + out[:-1] (see .kvcache)
        # (log p(token), [(id, log p)] of the top params.logprobs) per output token, when params.logprobs is set
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self.prompt_logprobs: Optional[list] = None  # the same for prompt[1:], once the prompt ran
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator()
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()


class GenerationEngine:
    """Tokenises prompts and runs decode steps for a causal LM host.

    Args:
        host: The model and its adapters.
        tokenizer: The base model's tokenizer.
        max_input_tokens: An extra limit on prompt length (None: the model's positions).
        max_tokens_limit: The largest ``max_tokens`` a request may ask for.
    """

    kind = "causal-lm"

    def __init__(self, host: ModelHost, tokenizer, max_input_tokens: Optional[int] = None,
                 max_tokens_limit: int = 1024):
        self.host, self.tokenizer = host, tokenizer
        config = host.base.config
        self.context = int(getattr(config, "max_position_embeddings", None) or 2048)
        self.max_input = min(self.context, max_input_tokens or self.context)
        self.max_tokens_limit = max_tokens_limit
        self.vocab = int(config.vocab_size)
        eos = getattr(config, "eos_token_id", None)
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.device = next(host.base.parameters()).device
        self._lock = threading.Lock()  # fast tokenizers must not be called from two threads at once
        self.kv_cache: Optional[bool] = None  # whether the model's cache splits per sequence (known after a step)

    @property
    def chat(self) -> bool:
        """Whether the tokenizer has a chat template (``/v1/chat/completions`` needs one)."""
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, prompt, index: int = 0, param: str = "prompt") -> list[int]:
        """Token ids of a prompt (text or ids), checked against the length limit."""
        if isinstance(prompt, str):
            if not prompt:
                raise ServeError(400, f"prompt {index} is an empty string", param=param)
            with self._lock:
                ids = self.tokenizer(prompt)["input_ids"]
        else:
            ids = list(prompt)
            if not ids or any(not 0 <= t < self.vocab for t in ids):
                raise ServeError(400, f"prompt {index} must hold token ids in 0..{self.vocab - 1}", param=param)
        return self._checked(ids, index, param)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a chat, through the tokenizer's template with the assistant's turn opened."""
        if not self.chat:
            raise ServeError(400, "this model's tokenizer has no chat template; use /v1/completions")
        try:
            with self._lock:
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # a template error is about the messages the client sent
            raise ServeError(400, f"the chat template could not format these messages: {exc}",
                             param="messages") from None
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return self._checked(list(ids), 0, "messages")

    def _checked(self, ids: list[int], index: int, param: str) -> list[int]:
        if len(ids) > self.max_input:
            raise ServeError(400, f"prompt {index} has {len(ids)} tokens; this model takes at most {self.max_input}",
                             param=param)
        return ids

    def check_params(self, params: SamplingParams, prompt_len: int) -> None:
        """400 for limits a request breaks (max_tokens, context length, stop strings)."""
        if not 1 <= params.max_tokens <= self.max_tokens_limit:
            raise ServeError(400, f"max_tokens must be between 1 and {self.max_tokens_limit}", param="max_tokens")
        if prompt_len + params.max_tokens > self.context:
            raise ServeError(400, f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                                  f"model's context of {self.context} tokens", param="max_tokens")

    # ------------------------------------------------------------------ worker thread
    def step(self, seqs: Sequence[GenSequence]) -> None:
        """One decode step for every sequence in ``seqs``: pick a token each, update text, emit deltas.

        New sequences run their prompt (prefill) and keep its key/value cache; the others feed only their
        last token on top of their cache. A model whose cache cannot be split per row runs every
        sequence's whole prefix instead."""
        with torch.no_grad():
            if self.kv_cache is False:
                logits = list(self._full(seqs, keep_cache=False))
            else:
                logits = [None] * len(seqs)
                new = [i for i, s in enumerate(seqs) if s.cache is None]
                old = [i for i, s in enumerate(seqs) if s.cache is not None]
                for part, run in ((new, self._prefill), (old, self._decode)):
                    if part:
                        for i, row in zip(part, run([seqs[i] for i in part])):
                            logits[i] = row
        for seq, row in zip(seqs, logits):
            seq.batch_size = max(seq.batch_size, len(seqs))
            row = row.cpu()
            token = self._pick(seq, row)
            if seq.params.logprobs is not None and token not in self.eos:
                lp = torch.log_softmax(row.float(), -1)  # the model's own distribution (before temperature)
                top = lp.topk(seq.params.logprobs)
                seq.logprobs.append((float(lp[token]), list(zip(top.indices.tolist(), top.values.tolist()))))
            self._advance(seq, token)
            if seq.finish_reason is not None:
                seq.cache = None

    def _full(self, seqs: Sequence[GenSequence], keep_cache: bool) -> torch.Tensor:
        """Run every sequence's prompt and output so far (left-padded); last-position logits per row."""
        rows = [s.prompt + s.out for s in seqs]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every row's last token is at the last position
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        model = self.host.model
        # Prompt log-probabilities (echo): per position, log p(next token) and the top-k, not whole
        # vocabulary rows (rows x width x vocab would not fit for a real vocabulary).
        scored = [s for s in seqs if s.params.prompt_logprobs and s.prompt_logprobs is None]
        k = max((s.params.logprobs or 0 for s in scored), default=0)

        def call(index: list[int], adapter_names: Optional[list[str]]):
            extra = {} if adapter_names is None else {"adapter_names": adapter_names}
            sel = torch.tensor(index, device=self.device)
            out = model(input_ids=ids[sel], attention_mask=mask[sel], position_ids=positions[sel],
                        use_cache=keep_cache, **extra)
            first = (out.logits[:, -1].float(),)
            if scored:
                lp = torch.log_softmax(out.logits[:, :-1].float(), -1)
                top = lp.topk(k, -1)
                first += (lp.gather(-1, ids[sel][:, 1:, None])[..., 0], top.values, top.indices)
            layers = kvcache.plain_layers(out.past_key_values) if keep_cache else None
            if layers is None:
                return first
            return (*first, *[l.keys for l in layers], *[l.values for l in layers])

        out = self.host.dispatcher.run([s.adapter for s in seqs], call, "prefill" if keep_cache else "forward")
        if scored:
            _prompt_logprobs(seqs, out[1:4], width)
            out = (out[0], *out[4:])
        if keep_cache:
            if self.kv_cache is None:
                self.kv_cache = len(out) > 1
                log.info("generation %s", "keeps a key/value cache per sequence" if self.kv_cache
                         else "reruns each prefix (the model's cache cannot be split per sequence)")
            if self.kv_cache:
                half = (len(out) - 1) // 2
                caches = kvcache.row_caches(list(out[1:1 + half]), list(out[1 + half:]), [len(r) for r in rows])
                for seq, cache in zip(seqs, caches):
                    seq.cache = cache
        return out[0]

    def _prefill(self, seqs: Sequence[GenSequence]) -> torch.Tensor:
        return self._full(seqs, keep_cache=True)

    def _decode(self, seqs: Sequence[GenSequence]) -> torch.Tensor:
        """Feed each sequence's last token on top of its cache (caches stacked, left-padded)."""
        keys, values, lengths = kvcache.stack([s.cache for s in seqs])
        longest = max(lengths)
        ids = torch.tensor([[s.out[-1]] for s in seqs], device=self.device)
        mask = torch.zeros((len(seqs), longest + 1), dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, longest - n:] = 1
        mask = mask.to(self.device)
        positions = torch.tensor([[n] for n in lengths], device=self.device)
        model = self.host.model

        def call(index: list[int], adapter_names: Optional[list[str]]):
            extra = {} if adapter_names is None else {"adapter_names": adapter_names}
            sel = torch.tensor(index, device=self.device)
            past = kvcache.as_model_cache([k[sel] for k in keys], [v[sel] for v in values])
            out = model(input_ids=ids[sel], attention_mask=mask[sel], position_ids=positions[sel],
                        past_key_values=past, use_cache=True, **extra)
            layers = out.past_key_values.layers
            return (out.logits[:, -1].float(), *[l.keys[:, :, -1:] for l in layers],
                    *[l.values[:, :, -1:] for l in layers])

        out = self.host.dispatcher.run([s.adapter for s in seqs], call, "decode")
        half = (len(out) - 1) // 2
        new_keys, new_values = list(out[1:1 + half]), list(out[1 + half:])
        for i, seq in enumerate(seqs):
            seq.cache = kvcache.append(seq.cache, new_keys, new_values, i)
        return out[0]

    def _pick(self, seq: GenSequence, logits: torch.Tensor) -> int:
        p = seq.params
        if p.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / p.temperature, -1)
        if p.top_p < 1.0:  # keep the smallest set of top tokens whose mass reaches top_p
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < p.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=seq.generator))

    def _advance(self, seq: GenSequence, token: int) -> None:
        p = seq.params
        if token in self.eos:
            seq.finish_reason = "stop"
        else:
            seq.out.append(token)
            seq.text = self.tokenizer.decode(seq.out, skip_special_tokens=True)
            cut = min((i for i in (seq.text.find(s) for s in p.stop if s) if i >= 0), default=-1)
            if cut >= 0:
                seq.text, seq.finish_reason = seq.text[:cut], "stop"
            elif len(seq.out) >= p.max_tokens:
                seq.finish_reason = "length"
        done = seq.finish_reason is not None
        # Hold back what might still become a stop string, or half of a multi-byte character.
        hold = 0 if done else max([len(s) - 1 for s in p.stop if s] + [0])
        ready = seq.text[:len(seq.text) - hold] if hold else seq.text
        if not done:
            ready = ready.rstrip("\ufffd")
        delta = ready[seq.sent:] if len(ready) > seq.sent else ""
        seq.sent += len(delta)
        seq.emit(seq, delta, done)


def _prompt_logprobs(seqs: Sequence[GenSequence], scores: Sequence[torch.Tensor], width: int) -> None:
    """Give each sequence that asked for them the log-probabilities of its prompt tokens after the first.

    ``scores``: (log p of the next token, top-k values, top-k ids), each over positions ``0..width-2`` of
    left-padded rows; a prompt of ``n`` tokens ends at the last position, so its tokens ``1..n-1`` are
    scored at positions ``width-n .. width-2``."""
    chosen, values, indices = (t.cpu() for t in scores)
    for i, seq in enumerate(seqs):
        if not seq.params.prompt_logprobs or seq.prompt_logprobs is not None:
            continue
        k, n = seq.params.logprobs or 0, len(seq.prompt)
        span = range(width - n, width - 1)
        seq.prompt_logprobs = [(float(chosen[i, j]), list(zip(indices[i, j, :k].tolist(), values[i, j, :k].tolist())))
                               for j in span]
