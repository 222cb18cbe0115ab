"""Prompt tuning against peft: checkpoints both ways, outputs and losses, generation, training, errors."""

from __future__ import annotations

import json

import peft
import pytest
import torch

import deltatune as dt
from conftest import (assert_prompt_and_head_train, greedy_reference, greedy_seq2seq_reference, perturb_trainable,
                      text_inputs, tiny_bert_cls, tiny_gpt2_cls, tiny_gpt2_lm, tiny_llama, train_lm_steps)

CASES = [
    ("llama-causal", tiny_llama, dict(task_type="CAUSAL_LM", num_virtual_tokens=5)),
    ("bert-seq-cls", tiny_bert_cls, dict(task_type="SEQ_CLS", num_virtual_tokens=4)),
    ("gpt2-seq-cls", tiny_gpt2_cls, dict(task_type="SEQ_CLS", num_virtual_tokens=4)),
    ("gpt2-causal", tiny_gpt2_lm, dict(task_type="CAUSAL_LM", num_virtual_tokens=3)),
]


@pytest.mark.parametrize("direction", ["peft->deltatune", "deltatune->peft"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_checkpoints_load_in_the_other_library(case, direction, tmp_path):
    _, build, kwargs = case
    src, dst = (peft, dt) if direction == "peft->deltatune" else (dt, peft)
    source = src.get_peft_model(build(), src.PromptTuningConfig(**kwargs))
    perturb_trainable(source, 0, 0.5)
    source.save_pretrained(str(tmp_path / "a"))
    target = dst.PeftModel.from_pretrained(build(), str(tmp_path / "a"))
    inputs = text_inputs()
    labels = inputs["input_ids"] if kwargs["task_type"] == "CAUSAL_LM" else torch.tensor([0, 2])
    with torch.no_grad():
        want, got = source(**inputs, labels=labels), target(**inputs, labels=labels)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=1e-5)
    target.save_pretrained(str(tmp_path / "b"))
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in "ab")
    assert sorted(a) == sorted(b) and "prompt_embeddings" in a and all(torch.equal(a[k], b[k]) for k in a)
    ja, jb = (json.load(open(tmp_path / d / "adapter_config.json")) for d in "ab")
    assert set(ja) ^ set(jb) <= {"peft_version"}


def test_generate_is_greedy_decoding_with_the_prompt():
    model = dt.get_peft_model(tiny_llama(), dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    perturb_trainable(model, 1, 0.5)
    inputs = text_inputs(batch=1, seq=4)
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(out, greedy_reference(model, inputs, 6))
    with model.disable_adapter():  # and without the prompt it is the base model's generation
        plain = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    base = tiny_llama().generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(plain, base)


def test_training_updates_only_the_prompt_and_the_head():
    model = dt.get_peft_model(tiny_bert_cls(), dt.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    assert_prompt_and_head_train(model)


def test_text_init_uses_the_token_embeddings():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from deltatune.cli.train import embedded_model_dir

    tok_dir = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4))
    config = dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, prompt_tuning_init="TEXT",
                                   prompt_tuning_init_text="classify the intent", tokenizer_name_or_path=tok_dir)
    model = dt.get_peft_model(base, config)
    ids = tokenizer("classify the intent", add_special_tokens=False)["input_ids"]
    ids = (ids * 6)[:6]
    want = base.get_input_embeddings().weight[ids]
    assert torch.equal(model.prompt_encoder["default"].embedding.weight, want)


def test_bad_uses_are_clear_errors():
    with pytest.raises(dt.ConfigError, match="num_virtual_tokens"):
        dt.PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(dt.ConfigError, match="tokenizer_name_or_path"):
        dt.PromptTuningConfig(prompt_tuning_init="TEXT", prompt_tuning_init_text="hi")
    model = dt.get_peft_model(tiny_llama(), dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(ValueError, match="cannot share one model"):
        model.add_adapter("lora", dt.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no weights to merge"):
        model.merge_and_unload()
    lora = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="cannot share one model"):
        lora.add_adapter("prompt", dt.PromptTuningConfig(num_virtual_tokens=3))


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
@pytest.mark.parametrize("direction", ["peft->deltatune", "deltatune->peft"])
def test_p_tuning_checkpoints_hold_the_encoder_output(kind, direction, tmp_path):
    src, dst = (peft, dt) if direction == "peft->deltatune" else (dt, peft)
    kwargs = dict(task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=16, encoder_reparameterization_type=kind)
    source = src.get_peft_model(tiny_llama(), src.PromptEncoderConfig(**kwargs))
    perturb_trainable(source, 2, 0.3)
    inputs = text_inputs()
    with torch.no_grad():
        want = source(**inputs).logits
    source.save_pretrained(str(tmp_path))
    target = dst.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(target(**inputs).logits, want, rtol=0, atol=1e-5)
    config = json.load(open(tmp_path / "adapter_config.json"))
    assert config["peft_type"] == "P_TUNING" and config["encoder_reparameterization_type"] == kind


def test_p_tuning_trains_the_reparameterisation():
    model = dt.get_peft_model(tiny_llama(), dt.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                                   encoder_hidden_size=16))
    losses, grads = train_lm_steps(model, 10)
    assert grads and all(n.startswith("prompt_encoder.default.") for n in grads)
    assert any("mlp_head" in n for n in grads)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("config_name", ["PromptTuningConfig", "PromptEncoderConfig"])
@pytest.mark.parametrize("direction", ["peft->deltatune", "deltatune->peft"])
def test_seq2seq_prompts_both_ways(config_name, direction, tmp_path):
    from conftest import t5_inputs, tiny_t5

    src, dst = (peft, dt) if direction == "peft->deltatune" else (dt, peft)
    source = src.get_peft_model(tiny_t5(), getattr(src, config_name)(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3))
    perturb_trainable(source, 5, 0.5)
    inputs = t5_inputs()
    batch = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                 labels=text_inputs(seq=5, seed=7)["input_ids"])
    with torch.no_grad():
        want = source(**batch)
    source.save_pretrained(str(tmp_path))
    assert load_prompt_rows(tmp_path) == 6  # peft's layout: 2 x num_virtual_tokens for encoder-decoder models
    target = dst.PeftModel.from_pretrained(tiny_t5(), str(tmp_path))
    with torch.no_grad():
        got = target(**batch)
        plain = tiny_t5()(**batch)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=1e-5)
    assert (got.logits - plain.logits).abs().max() > 1e-3


def load_prompt_rows(folder) -> int:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))["prompt_embeddings"].shape[0]


def test_seq2seq_generate_is_greedy_decoding_with_the_prompt():
    from conftest import tiny_t5

    model = dt.get_peft_model(tiny_t5(), dt.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3))
    perturb_trainable(model, 6, 2.0)
    inputs = text_inputs(batch=1, seq=6)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert torch.equal(out, greedy_seq2seq_reference(model, inputs, 4))
