"""The ``deltatune`` command line: the main job on the embedded model, merge, inspect, ab, DDP, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import cli_bert
from deltatune.cli import main
from deltatune.cli.data import BUNDLED_TEST, read_rows
from deltatune.cli.train import embedded_model_dir

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The Quickstart's main job, run exactly with its defaults (real MiniLM-L6, bundled data)."""
    folder = tmp_path_factory.mktemp("runs") / "default"
    assert main(["train", "--output", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Tiny BERT classifier and GPT-2 LM folders sharing the MiniLM tokenizer (no downloads)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("models")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    bert = cli_bert(tokenizer.vocab_size)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    for name, model in (("bert", bert), ("gpt2", gpt2)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rows = read_rows(BUNDLED_TEST)
    (root / "small.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:48]))
    (root / "text.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows[:40]))
    return root


def test_main_job_beats_the_head_only_baseline(default_run):
    metrics = json.loads((default_run / "metrics.json").read_text())
    baseline = metrics["baseline"]["final"]["eval_accuracy"]
    adapter = metrics["adapter"]["final"]["eval_accuracy"]
    assert adapter >= baseline + 0.1, (baseline, adapter)
    assert adapter >= 0.9
    assert metrics["adapter"]["file_bytes"] < 5 * 2**20 < metrics["full_model"]["file_bytes"]
    assert metrics["adapter"]["trainable_params"] < 0.05 * metrics["full_model"]["params"]
    assert len(metrics["adapter"]["history"]) == 5 and all("train_loss" in r for r in metrics["adapter"]["history"])
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "training.png", "config.json"):
        assert (default_run / name).is_file(), name
    assert (default_run / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any(p.name.startswith("default.partial") for p in default_run.parent.iterdir())


def test_run_config_repeats_the_run(default_run, tiny_models, tmp_path):
    """``deltatune train --config <run>/config.json`` trains the same adapter again: same tensors, same
    per-epoch metrics. A short run with non-default options (so each must come from the file)."""
    from safetensors.torch import load_file

    from deltatune.cli.options import read_config_file

    recorded = read_config_file(str(default_run / "config.json"))
    assert recorded["r"] == 8 and recorded["method"] == "lora" and "output" not in recorded

    first, again = tmp_path / "first", tmp_path / "again"
    assert main(["train", "--model", str(tiny_models / "bert"), "--data", str(tiny_models / "small.jsonl"),
                 "--epochs", "2", "--r", "4", "--alpha", "8", "--dropout", "0.1", "--lr", "2e-3", "--seed", "3",
                 "--batch-size", "8", "--no-baseline", "--output", str(first)]) == 0
    assert main(["train", "--config", str(first / "config.json"), "--output", str(again)]) == 0
    assert json.loads((again / "config.json").read_text()) == json.loads((first / "config.json").read_text())
    a = load_file(str(first / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(again / "adapter" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert a["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"].shape[0] == 4
    history = [json.loads((run / "metrics.json").read_text())["adapter"]["history"] for run in (first, again)]
    assert len(history[0]) == 2 and history[0] == history[1]


def test_merge_gives_a_plain_transformers_model(default_run, tmp_path):
    merged = tmp_path / "merged"
    assert main(["merge", str(default_run), "--output", str(merged)]) == 0
    texts = [r["text"] for r in read_rows(BUNDLED_TEST)[:6]]
    # Reload the merged folder in a fresh interpreter where deltatune cannot be imported.
    script = (
        "import sys, json, torch; sys.modules['deltatune'] = None\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        f"path = {str(merged)!r}; texts = {texts!r}\n"
        "tok = AutoTokenizer.from_pretrained(path); model = AutoModelForSequenceClassification.from_pretrained(path).eval()\n"
        "with torch.no_grad(): print(json.dumps(model(**tok(texts, padding=True, return_tensors='pt')).logits.tolist()))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, check=True,
                         timeout=300)
    merged_logits = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from deltatune import PeftModel

    labels = json.loads((default_run / "metrics.json").read_text())["dataset"]["labels"]
    base = AutoModelForSequenceClassification.from_pretrained(embedded_model_dir(), num_labels=len(labels))
    adapted = PeftModel.from_pretrained(base, str(default_run / "adapter")).eval()
    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    with torch.no_grad():
        want = adapted(**tok(texts, padding=True, return_tensors="pt")).logits
    assert (merged_logits - want).abs().max() <= 1e-5


def test_inspect_and_peft_reads_the_adapter(default_run, capsys):
    assert main(["inspect", str(default_run)]) == 0
    out = capsys.readouterr().out
    assert "method:       LORA" in out and "peft format:  yes" in out and "36 adapted modules" in out
    import peft

    config = peft.PeftConfig.from_pretrained(str(default_run / "adapter"))
    assert config.r == 8 and config.task_type == "SEQ_CLS"


BAD_INPUTS = [
    ("missing model folder", ["--model", "/nonexistent/model"], "model folder '/nonexistent/model' does not exist"),
    ("missing column", ["--data", "{missing_label}"], "missing column(s) ['label']"),
    ("unknown label", ["--data", "{train}", "--test-data", "{unknown_label}"], "unknown label(s) ['refund']"),
    ("empty file", ["--data", "{empty}"], "is empty"),
    ("bad json", ["--data", "{bad_json}"], "line 2: not valid JSON"),
    ("unknown method", ["--method", "magic"], "unknown method 'magic'"),
    ("bad rank", ["--r", "0"], "--r must be an integer >= 1"),
]


@pytest.mark.parametrize("name,args,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_line_and_leaves_no_run_folder(name, args, message, tmp_path, tiny_models):
    files = {
        "missing_label": '{"text": "hello"}\n{"text": "bye"}\n',
        "train": '{"text": "a", "label": "billing"}\n{"text": "b", "label": "shipping"}\n',
        "unknown_label": '{"text": "c", "label": "refund"}\n',
        "empty": "",
        "bad_json": '{"text": "a", "label": "x"}\n{oops\n',
    }
    paths = {}
    for key, text in files.items():
        paths[key] = tmp_path / f"{key}.jsonl"
        paths[key].write_text(text)
    args = [a.format(**paths) for a in args]
    output = tmp_path / "run"
    cmd = [sys.executable, "-m", "deltatune", "train", "--model", str(tiny_models / "bert"), "--output", str(output), *args]
    if name == "missing model folder":
        cmd = [sys.executable, "-m", "deltatune", "train", "--output", str(output), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("deltatune: error:") and message in lines[0], result.stderr
    assert not output.exists() and not any(p.name.startswith("run.partial") for p in tmp_path.iterdir())


def test_yaml_config_and_causal_lm(tmp_path, tiny_models, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {tiny_models / 'gpt2'}\ndata: {tiny_models / 'text.jsonl'}\ntask: causal-lm\n"
                      "epochs: 1\nr: 4\nbatch-size: 8\n")
    output = tmp_path / "lm"
    assert main(["train", "--config", str(config), "--epochs", "2", "--output", str(output)]) == 0
    recorded = json.loads((output / "config.json").read_text())
    assert recorded["epochs"] == 2 and recorded["r"] == 4 and recorded["task"] == "causal-lm"  # flag > file
    metrics = json.loads((output / "metrics.json").read_text())
    history = metrics["adapter"]["history"]
    assert metrics["baseline"] is None and len(history) == 2 and "eval_perplexity" in history[-1]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    adapter_config = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "CAUSAL_LM" and adapter_config["target_modules"] == "all-linear"
    assert "perplexity" in capsys.readouterr().out


def test_ab_table(tmp_path, tiny_models, capsys):
    output = tmp_path / "ab"
    args = ["ab", "--model", str(tiny_models / "bert"), "--data", str(tiny_models / "small.jsonl"),
            "--seeds", "0", "1", "--epochs", "1", "--output", str(output)]
    assert main(args) == 0
    table = (output / "ab.md").read_text()
    assert "| head-only" in table and "| lora" in table and "| dora" in table and "+-" in table
    results = json.loads((output / "ab.json").read_text())["results"]
    assert len(results["lora"]["metric"]) == 2 and results["lora"]["bytes"][0] > 0
    assert results["dora"]["bytes"][0] > results["lora"]["bytes"][0]  # + the magnitude vectors


def test_ddp_two_processes_match_one(tmp_path, tiny_models):
    common = ["train", "--model", str(tiny_models / "bert"), "--data", str(tiny_models / "small.jsonl"),
              "--epochs", "2", "--batch-size", "8", "--dropout", "0", "--no-baseline", "--test-fraction", "0.3333"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    subprocess.run([sys.executable, "-m", "deltatune", *common, "--output", str(single)], env=ENV, check=True,
                   capture_output=True, timeout=300)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "deltatune", *common, "--output", str(ddp)], env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    from safetensors.torch import load_file

    a = load_file(str(single / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(ddp / "adapter" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-3  # the adapter did train


def test_vision_backbone_example():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import vision_backbone
    finally:
        sys.path.pop(0)
    result = vision_backbone.main()
    assert result["last_loss"] < result["first_loss"] and result["accuracy"] >= 0.9
    assert result["reload_diff"] == 0 and result["merge_diff"] <= 1e-5


def test_bundled_dataset_is_reproducible():
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_dataset.py"), "--check"], check=True,
                   capture_output=True)


def test_ia3_method(tmp_path, tiny_models):
    output = tmp_path / "ia3"
    args = ["train", "--model", str(tiny_models / "bert"), "--data", str(tiny_models / "small.jsonl"),
            "--method", "ia3", "--epochs", "1", "--lr", "3e-3", "--no-baseline", "--output", str(output)]
    assert main(args) == 0
    config = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["feedforward_modules"]
    from safetensors.torch import load_file

    keys = load_file(str(output / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("output.dense.ia3_l") and v.shape[0] == 1 for k, v in keys.items())  # input scaling
    assert any(k.endswith("attention.self.key.ia3_l") and v.shape[1] == 1 for k, v in keys.items())


@pytest.mark.parametrize("method", ["ia3", "adalora", "prompt"])
def test_inspect_recognises_every_method(method, tmp_path, capsys):
    import deltatune as dt
    from conftest import tiny_llama

    config = {"ia3": dt.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
              "adalora": dt.AdaLoraConfig(target_modules=["q_proj"], init_r=4, target_r=2, total_step=10),
              "prompt": dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)}[method]
    dt.get_peft_model(tiny_llama(), config).save_pretrained(str(tmp_path))
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "peft format:  yes" in out and config.peft_type.value in out


@pytest.mark.parametrize("method,peft_type,key", [("loha", "LOHA", "hada_w1_a"), ("lokr", "LOKR", "lokr_w1")])
def test_lycoris_methods(method, peft_type, key, tmp_path, tiny_models):
    output = tmp_path / method
    args = ["train", "--model", str(tiny_models / "bert"), "--data", str(tiny_models / "small.jsonl"),
            "--method", method, "--r", "4", "--alpha", "8", "--epochs", "1", "--no-baseline", "--output", str(output)]
    assert main(args) == 0
    config = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type and config["r"] == 4 and config["alpha"] == 8
    from safetensors.torch import load_file

    assert any(key in k for k in load_file(str(output / "adapter" / "adapter_model.safetensors")))
