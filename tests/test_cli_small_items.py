"""The command line's small items of issue 18: SIGTERM during training, a warning when a run learnt nothing,
plain-text corpora for ``--task causal-lm``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli_bert
from deltatune.cli.data import BUNDLED_TEST, BUNDLED_TRAIN, read_rows
from deltatune.cli.train import embedded_model_dir

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
       "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """The command-line tests' tiny BERT classifier with the MiniLM tokenizer, and a 32-row data file."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("models")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    cli_bert(tokenizer.vocab_size).save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    rows = read_rows(BUNDLED_TEST)
    (root / "small.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:32]))
    return root


def test_sigterm_during_training_leaves_no_folder(bert_dir, tmp_path):
    """A real ``deltatune train`` process sent SIGTERM mid-training exits 143 and leaves nothing behind."""
    out = tmp_path / "runs" / "stopped"
    err = tmp_path / "stderr.txt"
    command = [sys.executable, "-m", "deltatune", "train", "--model", str(bert_dir / "bert"),
               "--data", str(bert_dir / "small.jsonl"), "--epochs", "500", "--no-baseline", "--output", str(out)]
    with open(err, "w") as err_file:
        process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=err_file, text=True)
        try:
            for line in process.stdout:  # the run banner is printed just before trainer.train()
                if line.startswith("== lora"):
                    break
            else:
                pytest.fail(f"the run ended before training: {err.read_text()[-2000:]}")
            assert list((tmp_path / "runs").glob("stopped.partial-*")), "the temporary folder should exist now"
            time.sleep(1.0)  # well inside the 500 epochs
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 128 + signal.SIGTERM, err.read_text()[-2000:]
    assert list((tmp_path / "runs").iterdir()) == []
    assert "stopped by SIGTERM" in err.read_text()


# ---------------------------------------------------------------------------- a run that learnt nothing
@pytest.fixture(scope="module")
def small_custom(tmp_path_factory):
    """A 40-row custom dataset (bundled training rows, shuffled with seed 0): 32 train / 8 held out."""
    import random

    rows = read_rows(BUNDLED_TRAIN)
    random.Random(0).shuffle(rows)
    path = tmp_path_factory.mktemp("data") / "small40.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:40]))
    return path


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("deltatune: warning:")]


def test_defaults_on_40_rows_warn_and_name_the_flags(small_custom, tmp_path, capsys):
    """The embedded model with the defaults on 40 rows: 10 optimizer steps, the loss barely moves; the run
    still succeeds, but says so and names the flags to try."""
    from deltatune.cli import main

    out = tmp_path / "run"
    assert main(["train", "--data", str(small_custom), "--no-baseline", "--output", str(out)]) == 0
    warnings = _warnings(capsys.readouterr().err)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [f"deltatune: warning: {w}" for w in metrics["warnings"]] == warnings
    assert any("training loss barely fell" in w for w in warnings), warnings
    assert any("not clearly above chance" in w and "--test-data" in w for w in warnings), warnings
    assert all("--epochs 10 --lr 0.003" in w and "--batch-size" in w for w in warnings)


def test_the_suggested_flags_learn_and_do_not_warn(small_custom, tmp_path, capsys):
    """The flags the warning names fix the run: the loss falls, accuracy on the bundled 100-row test set is
    well above chance (0.2), and no warning is printed."""
    from deltatune.cli import main

    out = tmp_path / "run"
    assert main(["train", "--data", str(small_custom), "--test-data", str(BUNDLED_TEST), "--no-baseline",
                 "--epochs", "10", "--lr", "3e-3", "--output", str(out)]) == 0
    assert _warnings(capsys.readouterr().err) == []
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["warnings"] == [] and metrics["adapter"]["final"]["eval_accuracy"] > 0.5


def test_advice_checks():
    from deltatune.cli import advice

    assert advice.binomial_tail(0, 8, 0.3) == 1.0
    assert advice.binomial_tail(8, 8, 0.5) == pytest.approx(0.5 ** 8)
    assert advice.binomial_tail(2, 3, 0.5) == pytest.approx(0.5)
    falling = [{"train_loss": 1.6}, {"train_loss": 1.2}]
    flat = [{"train_loss": 1.6}, {"train_loss": 1.57}]
    assert advice.loss_did_not_fall(falling) is None and advice.loss_did_not_fall(flat) == (1.6, 1.57)
    assert advice.loss_did_not_fall(flat[:1]) is None  # one epoch: nothing to compare
    test = [{"label": "a"}] * 30 + [{"label": "b"}] * 70
    assert advice.chance_accuracy(test) == (0.7, "b")
    learnt = [{"train_loss": 1.6}, {"train_loss": 0.4, "eval_accuracy": 0.9}]
    assert advice.run_warnings("seq-cls", learnt, test, 400, 5, 16, 5e-4) == []
    at_chance = [{"train_loss": 1.6}, {"train_loss": 0.4, "eval_accuracy": 0.72}]
    assert len(advice.run_warnings("seq-cls", at_chance, test, 400, 5, 16, 5e-4)) == 1
    assert advice.run_warnings("causal-lm", at_chance, [{"text": "x"}], 400, 5, 16, 5e-4) == []


# ---------------------------------------------------------------------------- plain-text corpora (causal-lm)
CORPUS_LINES = [f"the {animal} sat on the {thing} near the {place}." for animal, thing, place in
                [("cat", "mat", "door"), ("dog", "rug", "fire"), ("fox", "log", "river"), ("owl", "branch", "barn"),
                 ("hen", "fence", "field"), ("pig", "hay", "pen"), ("cow", "grass", "hill"), ("bat", "beam", "roof"),
                 ("ant", "leaf", "path"), ("bee", "flower", "hive")]]


@pytest.fixture(scope="module")
def llama_with_tokenizer(llama64_dir, tmp_path_factory):
    """The tiny Llama of ``llama64_dir`` with a character-level tokenizer (99 ids < its 128), built offline."""
    import shutil
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("llama-tok") / "llama"
    shutil.copytree(llama64_dir, folder)
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + list(string.printable[:95]))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("layout, documents", [
    ("lines", CORPUS_LINES),
    ("paragraphs", ["\n".join(CORPUS_LINES[i:i + 2]) for i in range(0, 10, 2)]),
])
def test_plain_text_corpus_trains_a_causal_lm(layout, documents, llama_with_tokenizer, tmp_path, capsys):
    """A ``.txt`` corpus: one document per line, or per blank-line-separated paragraph when it has blank
    lines; the run trains and reports a perplexity on the held-out documents."""
    from deltatune.cli import main

    corpus = tmp_path / "corpus.txt"
    separator = "\n\n" if layout == "paragraphs" else "\n"
    corpus.write_text("\n" + separator.join(documents) + "\n\n")  # stray blank lines at both ends
    out = tmp_path / "run"
    assert main(["train", "--task", "causal-lm", "--model", str(llama_with_tokenizer), "--data", str(corpus),
                 "--epochs", "2", "--r", "4", "--output", str(out)]) == 0
    assert f"{len(documents)} documents (one per {layout[:-1]})" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    n_test = round(len(documents) * 0.2)
    assert (metrics["dataset"]["train"], metrics["dataset"]["test"]) == (len(documents) - n_test, n_test)
    assert 1 < metrics["adapter"]["final"]["eval_perplexity"] < 1e4
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_read_rows_splits_text_by_the_documented_rule(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("one\ntwo  \n\n\n")
    assert read_rows(path) == [{"text": "one"}, {"text": "two"}]
    path.write_text("a first\nparagraph\n \nsecond\n")
    assert read_rows(path) == [{"text": "a first\nparagraph"}, {"text": "second"}]


def test_plain_text_for_classification_is_one_line_error(bert_dir, tmp_path, capsys):
    from deltatune.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\nmore text\n")
    out = tmp_path / "run"
    assert main(["train", "--model", str(bert_dir / "bert"), "--data", str(corpus), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("deltatune: error:") and "no labels" in err[-1] and "causal-lm" in err[-1]
    assert not out.exists() and list(tmp_path.iterdir()) == [corpus]
