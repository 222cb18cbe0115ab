"""``deltatune train --quantize 4bit|8bit``: QLoRA through bitsandbytes on the CPU, from the command line.

Tiny models from configs whose widths are multiples of 64 (bitsandbytes' CPU blocks): a chat Llama with a
character-level tokenizer (the ``--task causal-lm`` chat path) and a BERT classifier (``seq-cls``).
"""

from __future__ import annotations

import json
import string

import pytest
import torch
from safetensors.torch import load_file

from deltatune.cli import main
from deltatune.cli.train import embedded_model_dir, load_base_model

pytest.importorskip("bitsandbytes")  # installed by the test extra

TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}a:{% endif %}")


def _llama_config(hidden: int = 64):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=2, eos_token_id=3)


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory):
    """A saved tiny chat Llama (hidden 64), a 32-bit twin of it with hidden 32, and 24 chat rows."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("qchat")
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + list(string.printable[:95]))},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = TEMPLATE
    for name, hidden in (("llama", 64), ("llama32", 32)):
        torch.manual_seed(0)
        LlamaForCausalLM(_llama_config(hidden)).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rows = [{"messages": [{"role": "user", "content": f"sort {i % 3}"}, {"role": "assistant", "content": "abc"[i % 3]}]}
            for i in range(24)]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _chat_args(root, output, *extra, model="llama"):
    return ["train", "--task", "causal-lm", "--model", str(root / model), "--data", str(root / "chat.jsonl"),
            "--epochs", "1", "--batch-size", "6", "--lr", "3e-3", "--threads", "1", "--output", str(output), *extra]


@pytest.mark.parametrize("kind,layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_the_loader_quantizes_the_linears_and_keeps_the_head(chat_llama, kind, layer):
    model = load_base_model(str(chat_llama / "llama"), "causal-lm", [], kind)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == layer
    assert type(model.model.layers[1].mlp.down_proj).__name__ == layer
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())  # frozen until the adapter is added


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_quantized_chat_run(chat_llama, tmp_path, kind, capsys):
    output = tmp_path / kind
    assert main(_chat_args(chat_llama, output, "--quantize", kind)) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["quantize"] == kind and json.loads((output / "config.json").read_text())["quantize"] == kind
    float_params = sum(p.numel() for p in load_base_model(str(chat_llama / "llama"), "causal-lm", []).parameters())
    # (the count includes the adapter) counted in weights, not in packed 4-bit storage elements
    assert metrics["full_model"]["params"] == float_params + metrics["adapter"]["trainable_params"]
    assert metrics["peak_memory_bytes"] > 0 and f"base model {kind} (bitsandbytes)" in capsys.readouterr().out
    losses = [loss for _, loss in metrics["adapter"]["steps"]]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    weights = load_file(str(output / "adapter" / "adapter_model.safetensors"))
    assert weights and all("lora_" in k for k in weights) and all(v.dtype == torch.float32 for v in weights.values())
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)  # B starts at 0: it trained


def test_a_quantized_runs_adapter_merges_into_the_float32_base(chat_llama, tmp_path, capsys):
    """The adapter of a 4-bit run is an ordinary float32 LoRA: ``deltatune merge`` puts it into the
    float32 base it names (checking the merged model against the adapter on that base), which gives a plain
    float32 transformers folder (a 4-bit merge would round the merged weights again)."""
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    assert main(_chat_args(chat_llama, run, "--quantize", "4bit")) == 0
    assert main(["merge", str(run), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    base = AutoModelForCausalLM.from_pretrained(str(chat_llama / "llama"))
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)


def test_quantized_classification_keeps_the_head_in_float32(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from deltatune.cli.data import BUNDLED_TEST, read_rows

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=128,
                                             max_position_embeddings=64)).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in read_rows(BUNDLED_TEST)[:30]))
    model = load_base_model(str(tmp_path / "bert"), "seq-cls", ["a", "b"], "4bit")
    assert type(model.bert.encoder.layer[0].attention.self.query).__name__ == "Linear4bit"
    assert type(model.classifier) is torch.nn.Linear
    output = tmp_path / "run"
    assert main(["train", "--model", str(tmp_path / "bert"), "--data", str(tmp_path / "d.jsonl"), "--epochs", "1",
                 "--quantize", "4bit", "--threads", "1", "--output", str(output)]) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["quantize"] == "4bit" and metrics["baseline"] is not None
    head = load_file(str(output / "adapter" / "adapter_model.safetensors"))["base_model.model.classifier.weight"]
    assert head.dtype == torch.float32 and head.shape == (len(metrics["dataset"]["labels"]), 64)


@pytest.mark.parametrize("value", ["3bit", "4"])
def test_bad_quantize_value_is_one_line_exit_2(chat_llama, tmp_path, value, capsys):
    assert main(_chat_args(chat_llama, tmp_path / "run", "--quantize", value)) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"deltatune: error: --quantize must be 4bit or 8bit, got '{value}'"
    assert not (tmp_path / "run").exists()


def test_widths_bitsandbytes_cannot_take_are_refused(chat_llama, tmp_path, capsys):
    assert main(_chat_args(chat_llama, tmp_path / "run", "--quantize", "4bit", model="llama32")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deltatune: error: --quantize: the model's hidden_size is 32, not a multiple of 64")
    assert "\n" not in err and not (tmp_path / "run").exists()
