"""LoRA with ``lora_bias=True`` (a trainable bias on B): outputs, checkpoints and merging as peft, plus mixed
batches and refusals."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import VOCAB, tiny_bert_cls, tiny_convnet

import deltatune as dt
from deltatune.config import ConfigError


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _ids():
    return torch.randint(3, VOCAB - 2, (3, 7), generator=torch.Generator().manual_seed(1))


CASES = {
    "bert": (tiny_bert_cls, dict(target_modules=["query", "value", "dense"], task_type="SEQ_CLS"),
             lambda: {"input_ids": _ids()}),
    "conv": (tiny_convnet, dict(target_modules=["conv", "conv2", "row", "head"]),
             lambda: {"x": torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))}),
}


def _out(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("case", list(CASES))
def test_peft_checkpoints_both_ways_and_merge(case, tmp_path):
    build, kwargs, make_inputs = CASES[case]
    inputs = make_inputs()
    theirs = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, lora_bias=True, **kwargs))
    _randomize(theirs)
    theirs.eval()
    assert any("lora_B" in n and n.endswith("bias") for n, _ in theirs.named_parameters())
    theirs.save_pretrained(tmp_path / "peft")
    ours = dt.PeftModel.from_pretrained(build(), tmp_path / "peft")
    expected = _out(theirs, inputs)
    torch.testing.assert_close(_out(ours, inputs), expected, atol=1e-5, rtol=0)
    with ours.disable_adapter():  # the bias matters: without the adapter the outputs differ
        assert (_out(ours, inputs) - expected).abs().max() > 1e-3

    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    torch.testing.assert_close(_out(back, inputs), expected, atol=1e-5, rtol=0)

    biases = {n: p.clone() for n, p in ours.named_parameters() if n.endswith("base_layer.bias")}
    ours.merge_adapter()
    torch.testing.assert_close(_out(ours, inputs), expected, atol=1e-4, rtol=0)
    ours.unmerge_adapter()
    for n, p in ours.named_parameters():
        if n in biases:
            torch.testing.assert_close(p, biases[n], atol=1e-6, rtol=0)
    merged = ours.merge_and_unload()
    torch.testing.assert_close(_out(merged, inputs), expected, atol=1e-4, rtol=0)


def test_training_reaches_the_bias_and_mixed_batches_route_it():
    model = dt.get_peft_model(tiny_bert_cls(), dt.LoraConfig(r=4, lora_bias=True, target_modules=["query", "value"],
                                                              task_type="SEQ_CLS"), "b")
    model.add_adapter("plain", dt.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    _randomize(model)
    model.train()
    model(input_ids=_ids()).logits.sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if n.endswith("lora_B_bias")]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    model.eval()
    names = ["plain", "b", "__base__"]
    ids = _ids()
    rows = []
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for i, n in enumerate(names):
            if n == "__base__":
                with model.disable_adapter():
                    rows.append(model(input_ids=ids[i:i + 1]).logits)
            else:
                model.set_adapter(n)
                rows.append(model(input_ids=ids[i:i + 1]).logits)
    torch.testing.assert_close(mixed, torch.cat(rows), atol=1e-5, rtol=0)


def test_refusals():
    with pytest.raises(ConfigError, match="use_dora"):
        dt.LoraConfig(r=2, lora_bias=True, use_dora=True, target_modules=["q"])
    with pytest.raises(ConfigError, match="init_lora_weights"):
        dt.LoraConfig(r=2, lora_bias=True, init_lora_weights="gaussian", target_modules=["q"])
    with pytest.raises(TypeError, match="lora_bias"):
        dt.get_peft_model(tiny_bert_cls(), dt.LoraConfig(r=2, lora_bias=True, target_modules=["word_embeddings"]))
    no_bias = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False))
    model = dt.get_peft_model(no_bias, dt.LoraConfig(r=2, lora_bias=True, target_modules=["0"]))
    before = model.base_model.model[0].base_layer.weight.clone()
    with pytest.raises(ValueError, match="no bias"):
        model.merge_adapter()
    assert torch.equal(model.base_model.model[0].base_layer.weight, before)
    model.add_adapter("other", dt.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="lora_bias"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "blend", combination_type="cat")
