"""``deltatune train --fsdp``: FSDP2 through the command line, launched by torchrun and by ``accelerate launch``.

A tiny BERT classifier (dropout off, so every process count computes the same thing) trains one epoch in
one process, then sharded over 2 processes (gloo, CPU): the saved adapters must agree within ``TOL`` and
the sharded one must load in deltatune and in peft. ``accelerate launch`` with
``examples/accelerate/fsdp2_cpu.yaml`` starts the same 2 processes (accelerate's own FSDP plugin is not
used on CPU: see ``cli/distributed.py``), so the same run through it must save the same adapter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli_bert
from deltatune.cli import main
from deltatune.cli.data import BUNDLED_TEST, read_rows
from deltatune.cli.distributed import check_fsdp_run, repeated_blocks
from deltatune.cli.options import RunOptions, UsageError
from deltatune.cli.train import embedded_model_dir

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
ACCELERATE_CONFIG = ROOT / "examples" / "accelerate" / "fsdp2_cpu.yaml"
#: Sharded (reduce-scatter of the gradient shards) vs one process (one sum): float32 rounding only.
TOL = 1e-5


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("fsdp-cli")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    cli_bert(tokenizer.vocab_size).save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    (root / "small.jsonl").write_text("".join(json.dumps(r) + "\n" for r in read_rows(BUNDLED_TEST)[:48]))
    return root


def _args(root: Path, output: Path, method: str = "lora") -> list[str]:
    return ["train", "--model", str(root / "bert"), "--data", str(root / "small.jsonl"), "--method", method,
            "--epochs", "1", "--batch-size", "8", "--dropout", "0", "--no-baseline", "--test-fraction", "0.3333",
            "--threads", "1", "--output", str(output)]


def _launch(prefix: list[str], args: list[str]) -> str:
    run = subprocess.run([*prefix, *args], env=ENV, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "deltatune"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIG),
              "--main_process_port", "0", "-m", "deltatune"]


@pytest.fixture(scope="module")
def single(bert):
    output = bert / "single"
    _launch([sys.executable, "-m", "deltatune"], _args(bert, output))
    return load_file(str(output / "adapter" / "adapter_model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_fsdp_run_saves_the_one_process_adapter(launcher, bert, single):
    output = bert / f"fsdp-{launcher}"
    out = _launch(TORCHRUN if launcher == "torchrun" else ACCELERATE, [*_args(bert, output), "--fsdp"])
    # It really was sharded: BertLayer x2 + the root, every parameter (base and adapter) a DTensor shard.
    assert "fsdp: 2 layers and the root sharded over 2 processes" in out
    line = next(l for l in out.splitlines() if l.startswith("fsdp:"))
    shards, total = line.split("(")[1].split(" parameters")[0].split(" of ")
    assert shards == total
    saved = load_file(str(output / "adapter" / "adapter_model.safetensors"))
    assert _max_diff(saved, single) <= TOL
    assert max(float(v.abs().max()) for k, v in single.items() if "lora_B" in k) > 1e-3  # it did train
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["adapter"]["history"][-1]["eval_accuracy"] >= 0  # the per-epoch evaluation ran sharded
    assert not any(p.name.startswith(output.name + ".partial") for p in bert.iterdir())
    _loads_in_deltatune_and_peft(bert, output / "adapter")


def _loads_in_deltatune_and_peft(bert: Path, folder: Path) -> None:
    """The sharded run's folder computes the 1-process adapter's outputs, loaded by deltatune and by peft."""
    import peft
    from transformers import AutoModelForSequenceClassification

    import deltatune as dt

    labels = json.loads((bert / "single" / "metrics.json").read_text())["dataset"]["labels"]
    ids = torch.randint(5, 1000, (2, 12), generator=torch.Generator().manual_seed(3))

    def logits(lib, adapter: Path) -> torch.Tensor:
        base = AutoModelForSequenceClassification.from_pretrained(bert / "bert", num_labels=len(labels),
                                                                  ignore_mismatched_sizes=True)
        with torch.no_grad():  # (the head comes from the adapter's modules_to_save)
            return lib.PeftModel.from_pretrained(base, str(adapter)).eval()(input_ids=ids).logits

    want = logits(dt, bert / "single" / "adapter")
    assert float((logits(dt, folder) - want).abs().max()) <= TOL
    assert float((logits(peft, folder) - want).abs().max()) <= TOL


def test_fsdp_refusals(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", "--fsdp", "--no-baseline", "--output", str(tmp_path / "x")]) == 2
    assert "--fsdp shards the model over processes" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="--fsdp supports the methods"):
        check_fsdp_run(RunOptions(fsdp=True, method="not-checked"), chat=False)
    with pytest.raises(UsageError, match="not supported for chat data"):
        check_fsdp_run(RunOptions(fsdp=True), chat=True)
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    with pytest.raises(UsageError, match="fsdp_cpu_ram_efficient_loading: false"):
        check_fsdp_run(RunOptions(fsdp=True), chat=False)
    check_fsdp_run(RunOptions(fsdp=False), chat=True)  # no --fsdp: nothing to check
    assert main(["train", "--task", "image-cls", "--fsdp"]) == 2
    assert "--fsdp is a switch for --task seq-cls or causal-lm" in capsys.readouterr().err


def test_repeated_blocks_are_the_layers():
    from conftest import tiny_gpt2_lm, tiny_llama

    llama, gpt2, bert = tiny_llama(), tiny_gpt2_lm(), cli_bert(100)
    assert repeated_blocks(llama) == list(llama.model.layers)
    assert repeated_blocks(gpt2) == list(gpt2.transformer.h)
    assert repeated_blocks(bert) == list(bert.bert.encoder.layer)
