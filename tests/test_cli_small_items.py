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
from deltatune.cli.data import BUNDLED_TEST, read_rows
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
