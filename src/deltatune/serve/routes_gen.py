"""``/v1/completions`` and ``/v1/chat/completions`` (with ``stream`` as server-sent events) for a
causal-LM server, in OpenAI's response shapes."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace

from fastapi.responses import JSONResponse, StreamingResponse

from .errors import ServeError
from .generation import SamplingParams
from .schemas import ChatRequest, CompletionRequest, as_list


def _params(body, server, max_tokens) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise ServeError(400, "stop takes at most 4 non-empty strings", param="stop")
    logprobs = getattr(body, "logprobs", None)
    return SamplingParams(max_tokens=16 if max_tokens is None else max_tokens, temperature=body.temperature,
                          top_p=body.top_p, seed=body.seed, stop=stop, logprobs=logprobs,
                          prompt_logprobs=logprobs is not None and getattr(body, "echo", False))


def _logprobs(tokenizer, seq) -> dict:
    """OpenAI's completion ``logprobs`` object for ``seq``: token strings, their log-probabilities, the top
    alternatives per token and each token's character offset in the choice's text (which starts with the
    prompt's tokens when it is echoed; the first of them has no log-probability)."""
    ids, scored = list(seq.out), list(seq.logprobs)
    if seq.params.prompt_logprobs:
        ids, scored = list(seq.prompt) + ids, [None] + list(seq.prompt_logprobs or []) + scored
    piece = lambda t: tokenizer.decode([t])  # noqa: E731
    tokens, offsets, at = [], [], 0
    for t in ids:
        tokens.append(piece(t))
        offsets.append(at)
        at += len(tokens[-1])
    keep = len(ids)
    if seq.finish_reason == "stop" and seq.params.stop:
        # A stop string cut the text: the tokens that start past the cut are not part of the answer.
        end = at - len(tokenizer.decode(list(seq.out), skip_special_tokens=True)) + len(seq.text)
        keep = sum(1 for o in offsets if o < end)
    return {"tokens": tokens[:keep], "token_logprobs": [None if s is None else s[0] for s in scored[:keep]],
            "top_logprobs": [None if s is None else {piece(t): v for t, v in s[1]} for s in scored[:keep]],
            "text_offset": offsets[:keep]}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def add_generation_routes(app, server, guarded, batch_header: str) -> None:
    """Register the generation routes on ``app`` (they answer 400 on an encoder server)."""

    def _ready(model: str):
        if server.kind != "causal-lm":
            raise ServeError(400, "this server serves an encoder; use /v1/embeddings or /classify")
        return server.adapter_for(model)

    async def _run(body, adapter, prompts, params, chat: bool, echo=None):
        created, rid = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        obj = "chat.completion" if chat else "text_completion"
        prompt_tokens = sum(len(p) for p in prompts)  # counted once per prompt, whatever n is
        # n choices per prompt: choice i * n + j is prompt i's j-th; seeded ones draw with seed + j.
        per = [replace(params, seed=None if params.seed is None else params.seed + j) for j in range(body.n)]
        prompts, params = [p for p in prompts for _ in per], [q for _ in prompts for q in per]
        events = server.generate(adapter, prompts, params)

        def usage(outs):
            done = sum(len(s.out) for s in outs)
            server.metrics.served(body.model, len(prompts), prompt_tokens, done)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}

        if not body.stream:
            seqs = {}
            async for seq, _, done in events:
                if done:
                    seqs[seq.index] = seq
            outs = [seqs[i] for i in range(len(prompts))]
            echoed = [echo[i // body.n] if echo else "" for i in range(len(outs))]
            choices = [({"index": s.index, "message": {"role": "assistant", "content": s.text}} if chat else
                        {"index": s.index, "text": e + s.text,
                         "logprobs": None if s.params.logprobs is None else _logprobs(server.tokenizer, s)})
                       | {"finish_reason": s.finish_reason} for s, e in zip(outs, echoed)]
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": body.model,
                                 "choices": choices, "usage": usage(outs)},
                                headers={batch_header: str(max(s.batch_size for s in outs))})

        first = await anext(events, None)  # errors before the first token still get a status code

        async def stream():
            chunk = {"id": rid, "object": "chat.completion.chunk" if chat else obj, "created": created,
                     "model": body.model}
            outs = []
            if chat:
                for i in range(len(prompts)):
                    yield _sse(chunk | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                     "finish_reason": None}]})
            item = first
            try:
                while item is not None:
                    seq, delta, done = item
                    if delta or done:
                        piece = {"delta": {"content": delta} if delta else {}} if chat else {"text": delta,
                                                                                            "logprobs": None}
                        yield _sse(chunk | {"choices": [{"index": seq.index, **piece,
                                                         "finish_reason": seq.finish_reason if done else None}]})
                    if done:
                        outs.append(seq)
                    item = await anext(events, None)
            except ServeError as exc:  # the status line is gone: report it in the stream
                yield _sse(exc.body())
            finally:  # a client that went away: its sequences stop at the next step
                await events.aclose()
            if len(outs) == len(prompts):
                yield _sse(chunk | {"choices": [], "usage": usage(outs)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest):
        """Complete prompts (greedy at temperature 0); ``stream`` sends server-sent events."""
        adapter = _ready(body.model)
        if body.stream and (body.logprobs is not None or body.echo):
            raise ServeError(400, "logprobs and echo are served without stream only", param="stream")
        items = as_list(body.prompt)
        if not items or len(items) > server.config.max_inputs:
            raise ServeError(400, f"prompt must hold 1 to {server.config.max_inputs} prompts", param="prompt")
        prompts = [server.engine.encode(p, i) for i, p in enumerate(items)]
        params = _params(body, server, body.max_tokens)
        for p in prompts:
            server.engine.check_params(params, len(p))
        # echo: the prompt as given (a text), or its tokens' text (token ids)
        echo = [p if isinstance(p, str) else server.tokenizer.decode(ids) for p, ids in zip(items, prompts)] \
            if body.echo else None
        return await _run(body, adapter, prompts, params, chat=False, echo=echo)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatRequest):
        """Answer a chat through the tokenizer's chat template; ``stream`` sends server-sent events."""
        adapter = _ready(body.model)
        prompt = server.engine.encode_chat([m.model_dump() for m in body.messages])
        limit = body.max_completion_tokens or body.max_tokens
        if limit is None:  # as OpenAI's chat: up to the context (and the server's cap), not completions' 16
            limit = max(1, min(server.engine.max_tokens_limit, server.engine.context - len(prompt)))
        params = _params(body, server, limit)
        server.engine.check_params(params, len(prompt))
        return await _run(body, adapter, [prompt], params, chat=True)
