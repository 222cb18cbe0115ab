"""The command line's rough edges (issue 18): errors are one line + exit 2, never a traceback; merge and
inspect handle prompt-learning adapters and bases without a tokenizer; run files carry only their keys."""

from __future__ import annotations

import json
import re

from pathlib import Path

import pytest
import torch

import deltatune as dt
from conftest import cli_bert
from deltatune.cli import main
from deltatune.cli.data import BUNDLED_TEST, read_rows
from deltatune.cli.train import embedded_model_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny BERT classifier with the MiniLM tokenizer, the same weights without one, and a small data file."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("models")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    bert = cli_bert(tokenizer.vocab_size)
    bert.save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    bert.save_pretrained(root / "bert-no-tokenizer")
    rows = read_rows(BUNDLED_TEST)
    (root / "small.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:32]))
    return root


def _base(models, name="bert"):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(models / name))


def _one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    # transformers' progress bars ("Loading weights: 100%|...") may come first; nothing else may
    lines = [line for line in err.strip().splitlines() if line.strip() and not re.search(r"\d+%\|", line)]
    assert len(lines) == 1 and lines[0].startswith("deltatune: error:"), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _prompt_adapter(models, folder) -> None:
    config = dt.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4,
                                   base_model_name_or_path=str(models / "bert"))
    dt.get_peft_model(_base(models), config).save_pretrained(str(folder))


def _lora_adapter(models, folder, base="bert") -> None:
    config = dt.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"],
                           base_model_name_or_path=str(models / base))
    model = dt.get_peft_model(_base(models, base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # a non-zero delta, so the merge changes the weights
    model.save_pretrained(str(folder))


def test_inspect_truncated_weights_is_one_line(models, tmp_path, capsys):
    _lora_adapter(models, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()  # drop the setup's progress bars
    assert main(["inspect", str(tmp_path)]) == 2
    _one_error_line(capsys, "adapter_model.safetensors", "not a readable safetensors file")


def test_train_target_matching_nothing_is_one_line(models, tmp_path, capsys):
    output = tmp_path / "run"
    args = ["train", "--model", str(models / "bert"), "--data", str(models / "small.jsonl"), "--epochs", "1",
            "--no-baseline", "--target", "no_such_module", "--output", str(output)]
    capsys.readouterr()
    assert main(args) == 2
    _one_error_line(capsys, "no_such_module")
    assert not output.exists() and not any(p.name.startswith("run.partial") for p in tmp_path.iterdir())


def test_merge_prompt_adapter_is_refused(models, tmp_path, capsys):
    _prompt_adapter(models, tmp_path / "adapter")
    output = tmp_path / "merged"
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "adapter"), "--output", str(output)]) == 2
    _one_error_line(capsys, "PROMPT_TUNING", "no weights to merge")
    assert not output.exists()


@pytest.mark.parametrize("flag", [["--method", "dora"], ["--seed", "5"]])
def test_ab_refuses_single_run_flags(models, tmp_path, flag, capsys):
    """Choice: ``ab`` refuses ``--method``/``--seed`` (argparse error, exit 2) instead of ignoring them;
    it compares ``--methods`` over ``--seeds``, so a single method or seed has no obvious meaning there."""
    args = ["ab", "--model", str(models / "bert"), "--data", str(models / "small.jsonl"), "--epochs", "1",
            "--output", str(tmp_path / "ab"), *flag]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert flag[0] in capsys.readouterr().err
    assert not (tmp_path / "ab").exists()


def test_merge_without_a_tokenizer(models, tmp_path, capsys, monkeypatch):
    """A base folder without tokenizer files merges (no tokenizer is loaded or copied: older transformers
    fail to load one, newer ones build an empty-vocabulary one, simulated by failing here)."""
    from transformers import AutoModelForSequenceClassification

    import deltatune.cli.merge as merge_module
    from deltatune.cli.options import UsageError

    real_load_tokenizer = merge_module.load_tokenizer

    def load_tokenizer(path):
        if not (Path(path) / "tokenizer_config.json").is_file():
            raise UsageError(f"could not load a tokenizer from {path!r}")
        return real_load_tokenizer(path)

    monkeypatch.setattr(merge_module, "load_tokenizer", load_tokenizer)

    _lora_adapter(models, tmp_path / "adapter", base="bert-no-tokenizer")
    output = tmp_path / "merged"
    assert main(["merge", str(tmp_path / "adapter"), "--output", str(output)]) == 0, capsys.readouterr().err
    assert (output / "config.json").is_file()
    assert not any((output / f).exists() for f in ("tokenizer_config.json", "tokenizer.json", "vocab.txt"))
    merged = AutoModelForSequenceClassification.from_pretrained(str(output)).eval()
    adapted = dt.PeftModel.from_pretrained(_base(models, "bert-no-tokenizer"), str(tmp_path / "adapter")).eval()
    ids = torch.arange(1, 17).reshape(2, 8)
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - adapted(input_ids=ids).logits).abs().max() <= 1e-5

    # with a tokenizer in the base folder, it is still copied
    _lora_adapter(models, tmp_path / "adapter2")
    assert main(["merge", str(tmp_path / "adapter2"), "--output", str(tmp_path / "merged2")]) == 0
    assert (tmp_path / "merged2" / "tokenizer_config.json").is_file()


def test_classification_run_files_carry_only_their_keys(models, tmp_path):
    output = tmp_path / "run"
    assert main(["train", "--model", str(models / "bert"), "--data", str(models / "small.jsonl"), "--epochs", "1",
                 "--output", str(output)]) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    for run in (metrics["adapter"], metrics["baseline"]):
        assert "eval_accuracy" in run["final"] and "eval_loss" in run["final"]
        assert not any("perplexity" in key for row in run["history"] for key in row), run["history"]
    config = json.loads((output / "config.json").read_text())
    assert config["method"] == "lora" and "seed" in config
    assert "seeds" not in config and "methods" not in config and "output" not in config


def test_inspect_prompt_adapter_shows_its_fields(models, tmp_path, capsys):
    _prompt_adapter(models, tmp_path)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    fields = dict(line.split(":", 1) for line in out.splitlines())
    assert fields["peft_type"].strip() == "PROMPT_TUNING" and fields["task_type"].strip() == "SEQ_CLS"
    assert fields["num_virtual_tokens"].strip() == "4" and fields["token_dim"].strip() == "32"
    assert "rank(s)" not in fields and "targets" not in fields
    assert "peft format" in fields and fields["peft format"].strip().startswith("yes")


def test_inspect_reads_alpha_of_lycoris_configs(tmp_path, capsys):
    """LoHa/LoKr call it ``alpha``, not ``lora_alpha``: inspect shows it instead of '-'."""
    from conftest import tiny_llama

    dt.get_peft_model(tiny_llama(), dt.LoHaConfig(r=4, alpha=7, target_modules=["q_proj"])).save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    assert "(r=4, alpha=7)" in capsys.readouterr().out
