"""``deltatune serve`` as a command: a real process, its flags, one-line errors, graceful SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from deltatune.cli import main  # noqa: E402
from test_serve import TEXTS, expected, root  # noqa: E402,F401  (module fixtures shared with test_serve)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv,words", [
    (["--adapter", "no-equals-sign"], "NAME=PATH"),
    (["--adapter", "a1=/does/not/exist"], "does not exist"),
    (["--adapter", "a.b=."], "invalid adapter name"),
    (["--model", "/does/not/exist"], "could not load a model"),
    (["--max-batch-size", "0"], "--max-batch-size 0 is out of range"),
    (["--max-loaded-adapters", "0", "--request-timeout", "-1"], "--request-timeout -1.0 is out of range"),
])
def test_serve_command_errors_are_one_line_exit_2(argv, words, capsys):
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deltatune: error:") and words in err and "\n" not in err


def test_serve_process_answers_then_sigterm_finishes_in_flight_requests_and_exits_0(root, expected):
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # A long batching wait keeps the last request in flight while SIGTERM arrives.
    proc = subprocess.Popen([sys.executable, "-m", "deltatune", "serve", "--adapter", f"a1={root / 'run1'}",
                             "--port", str(port), "--max-wait-ms", "1500", "--api-key", "k"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k"}
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        result = {}

        def ask():
            result["r"] = httpx.post(f"{url}/v1/embeddings", json={"model": "a1", "input": TEXTS[:2]},
                                     headers=headers, timeout=60)

        asker = threading.Thread(target=ask)
        asker.start()
        while 'deltatune_waiting_rows{model="a1"} 2' not in httpx.get(f"{url}/metrics", headers=headers).text:
            assert asker.is_alive() and time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)  # the request is waiting in the batcher now
        asker.join(60)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    _, err = proc.communicate()
    assert code == 0, err[-2000:]
    r = result["r"]
    assert r.status_code == 200, r.text
    emb = torch.tensor([d["embedding"] for d in r.json()["data"]])
    torch.testing.assert_close(emb, expected["a1"][0][:2], atol=1e-5, rtol=0)
    assert '"message": "request"' in err and '"route": "/v1/embeddings"' in err  # structured (JSON) logs


def test_serves_what_deltatune_train_wrote(tmp_path):
    """``deltatune train`` then ``deltatune serve --adapter intents=<run>``: class names from the run,
    probabilities equal to offline deltatune on the same folders."""
    import json

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from conftest import cli_bert
    from deltatune import PeftModel
    from deltatune.cli.data import BUNDLED_TEST, read_rows
    from deltatune.cli.train import embedded_model_dir
    from deltatune.serve import ServeConfig
    from test_serve import running

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    cli_bert(tokenizer.vocab_size).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    rows = read_rows(BUNDLED_TEST)
    (tmp_path / "small.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:48]))
    run = tmp_path / "run"
    assert main(["train", "--model", str(tmp_path / "bert"), "--data", str(tmp_path / "small.jsonl"), "--epochs", "1",
                 "--r", "4", "--batch-size", "16", "--no-baseline", "--output", str(run)]) == 0
    labels = json.loads((run / "metrics.json").read_text())["dataset"]["labels"]
    texts = [r["text"] for r in rows[48:52]]

    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert", num_labels=len(labels),
                                                              ignore_mismatched_sizes=True)
    model = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    with torch.no_grad():
        want = torch.stack([torch.softmax(model(**tokenizer(t, return_tensors="pt")).logits[0], -1) for t in texts])

    with running(ServeConfig(model=str(tmp_path / "bert"), adapters=[("intents", str(run))])) as (url, _):
        r = httpx.post(f"{url}/classify", json={"model": "intents", "input": texts}, timeout=30)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    torch.testing.assert_close(torch.tensor([d["probs"] for d in data]), want, atol=1e-5, rtol=0)
    assert [d["label"] for d in data] == [labels[int(p.argmax())] for p in want]
    assert set(labels) == {r["label"] for r in rows}  # the run's own class names, not LABEL_i
