"""A bounded load test on loopback: many concurrent clients over several adapters, zero errors and zero
mismatched answers (embeddings against offline deltatune; generations against offline ``generate``)."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from deltatune.serve import ServeConfig  # noqa: E402
from test_serve import TEXTS, expected, offline, root, running  # noqa: E402,F401
from test_serve_lm import PROMPTS, lm  # noqa: E402,F401
from test_serve_lm import config as lm_config  # noqa: E402
from test_serve_lm import offline as lm_offline  # noqa: E402


def _hammer(url, jobs, clients, send):
    """Run ``send(client, job)`` for every job from ``clients`` threads; returns (results, seconds)."""
    with httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients)) as client:
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda job: send(client, job), jobs))
        return results, time.perf_counter() - start


def test_embedding_load_32_clients_4_models(root, expected):
    want = dict(expected) | {"a3": offline(str(root / "three"), TEXTS)}
    config = ServeConfig(adapters=[("a1", str(root / "run1")), ("a2", str(root / "two")),
                                   ("a3", str(root / "three"))], max_batch_size=64, max_wait_ms=5)
    names = {"minilm-l6": "base", "a1": "a1", "a2": "a2", "a3": "a3"}
    rng = random.Random(0)
    jobs = [(rng.choice(list(names)), rng.randrange(len(TEXTS))) for _ in range(320)]

    def send(client, job):
        model, i = job
        r = client.post("/v1/embeddings", json={"model": model, "input": [TEXTS[i]]})
        return job, r.status_code, r.json()["data"][0]["embedding"] if r.status_code == 200 else r.text, \
            int(r.headers.get("x-deltatune-batch-size", 0))

    with running(config) as (url, _):
        results, seconds = _hammer(url, jobs, 32, send)
    errors = [r for r in results if r[1] != 200]
    assert not errors, errors[:3]
    bad = [job for job, _, emb, _ in results
           if not torch.allclose(torch.tensor(emb), want[names[job[0]]][0][job[1]], atol=1e-5, rtol=0)]
    assert not bad, bad[:5]
    sizes = [size for *_, size in results]
    print(f"\n320 embedding requests, 32 clients, 4 models: {len(jobs) / seconds:.0f} req/s, "
          f"mean batch {sum(sizes) / len(sizes):.1f}, max batch {max(sizes)}")
    assert max(sizes) > 4


def test_generation_load_8_clients_4_models(lm):
    want = {m: lm_offline(lm, m, PROMPTS, max_tokens=8) for m in (None, "one", "two", "three")}
    names = {"llama": None, "one": "one", "two": "two", "three": "three"}
    cfg = lm_config(lm, max_batch_size=16)
    cfg.adapters.append(("three", str(lm[1] / "three")))
    rng = random.Random(1)
    jobs = [(rng.choice(list(names)), rng.randrange(len(PROMPTS))) for _ in range(48)]

    def send(client, job):
        model, i = job
        r = client.post("/v1/completions", json={"model": model, "prompt": PROMPTS[i], "max_tokens": 8,
                                                 "temperature": 0})
        return job, r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text, \
            int(r.headers.get("x-deltatune-batch-size", 0))

    with running(cfg) as (url, _):
        results, seconds = _hammer(url, jobs, 8, send)
    assert not [r for r in results if r[1] != 200]
    bad = [(job, text) for job, _, text, _ in results if text != want[names[job[0]]][job[1]][0]]
    assert not bad, bad[:5]
    print(f"\n48 generation requests (8 tokens), 8 clients, 4 models: {len(jobs) / seconds:.1f} req/s, "
          f"max batch {max(r[3] for r in results)}")
    assert max(r[3] for r in results) > 1
