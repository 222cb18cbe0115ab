"""Mixed-adapter batches (``adapter_names=``): each row equals that row run alone with its adapter active."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (VOCAB, main_output, random_lora, tiny_bert_cls, tiny_convnet, tiny_gpt2_lm, tiny_llama)
from torch import nn

import deltatune as dt
from deltatune.methods.lora import mixed

BASE = "__base__"


def _llama_three(dropout=0.0):
    """LoRA r=4 (all linear), DoRA r=8 (q/v only), rsLoRA r=16 (all linear) on a tiny Llama."""
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                           lora_dropout=dropout, task_type="CAUSAL_LM"), "a")
    model.add_adapter("b", dt.LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True,
                                         lora_dropout=dropout, task_type="CAUSAL_LM"))
    model.add_adapter("c", dt.LoraConfig(r=16, lora_alpha=16, use_rslora=True, target_modules="all-linear",
                                         lora_dropout=dropout, task_type="CAUSAL_LM"))
    random_lora(model, seed=3)
    with torch.no_grad():  # magnitudes away from the norms, so DoRA's rescaling shows
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.5)
    model.eval()
    return model


def _row_by_row(model, names, fn):
    """``fn(model, i)`` for each row ``i``, run alone with its adapter active (the base model for BASE)."""
    outs = []
    for i, n in enumerate(names):
        if n == BASE:
            with model.disable_adapter():
                outs.append(fn(model, i))
        else:
            model.set_adapter(n)
            outs.append(fn(model, i))
    return outs


def _random_biases(model, seed=11):
    """Non-zero biases (transformers initialises them to zero; DoRA's rows treat the bias apart)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _ids(batch, seq, seed=1):
    return torch.randint(3, VOCAB - 2, (batch, seq), generator=torch.Generator().manual_seed(seed))


NAMES = ["a", "b", BASE, "c", "a", "c"]


@pytest.mark.parametrize("seq", [7, 64])  # 64 tokens per row: the gathered route (see the route test)
def test_forward_equals_row_by_row(seq):
    model = _llama_three()
    ids = _ids(len(NAMES), seq)
    with torch.no_grad():
        mixed_out = model(input_ids=ids, adapter_names=NAMES).logits
        again = model(input_ids=ids, adapter_names=NAMES).logits  # (from the cached stacks)
        refs = _row_by_row(model, NAMES, lambda m, i: m(input_ids=ids[i:i + 1]).logits)
    ref = torch.cat(refs)
    assert (ref[0] - ref[3]).abs().max() > 0.1 and (ref[1] - ref[2]).abs().max() > 0.1  # rows do differ
    torch.testing.assert_close(mixed_out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, ref, atol=1e-5, rtol=0)
    with torch.enable_grad():  # the differentiable route
        torch.testing.assert_close(model(input_ids=ids, adapter_names=NAMES).logits, ref, atol=1e-5, rtol=0)


def test_both_routes_are_taken(monkeypatch):
    """7 tokens per row: one product over the concatenated factors; 64: gathered per-row factors."""
    model = _llama_three()
    seen = []
    real = mixed._gathers_pay
    monkeypatch.setattr(mixed, "_gathers_pay", lambda *a: seen.append(real(*a)) or seen[-1])
    with torch.no_grad():
        model(input_ids=_ids(6, 7), adapter_names=NAMES)
        assert seen and not any(seen)
        seen.clear()
        model(input_ids=_ids(6, 64), adapter_names=NAMES)
        assert any(seen)


def test_generate_greedy_beam_and_sampling():
    model = _llama_three()
    ids = _ids(len(NAMES), 5)
    greedy = dict(max_new_tokens=6, do_sample=False)
    beams = dict(max_new_tokens=5, do_sample=False, num_beams=3, num_return_sequences=2)
    with torch.no_grad():
        for kwargs in (greedy, beams):
            out = model.generate(input_ids=ids, adapter_names=NAMES, **kwargs)
            refs = _row_by_row(model, NAMES, lambda m, i: m.generate(input_ids=ids[i:i + 1], **kwargs))
            assert torch.equal(out, torch.cat(refs))
        # sampling: a batch naming one adapter per row draws what the same batch under set_adapter draws
        model.set_adapter("c")
        torch.manual_seed(0)
        ref = model.generate(input_ids=ids[:3], max_new_tokens=6, do_sample=True, top_k=20)
        torch.manual_seed(0)
        out = model.generate(input_ids=ids[:3], adapter_names=["c"] * 3, max_new_tokens=6, do_sample=True, top_k=20)
        assert torch.equal(out, ref)
        torch.manual_seed(0)
        assert model.generate(input_ids=ids, adapter_names=NAMES, max_new_tokens=4, do_sample=True).shape == (6, 9)


def test_training_gradients_reach_each_rows_adapter():
    model = _llama_three()
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    ids = _ids(len(NAMES), 9)

    def loss_of(m, rows, **kw):
        return m(input_ids=ids[rows], labels=ids[rows], **kw).logits.pow(2).mean(-1).sum()

    model.zero_grad()
    loss_of(model, slice(None), adapter_names=NAMES).backward()
    mixed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference = copy.deepcopy(model)
    reference.zero_grad()
    for i, n in enumerate(NAMES):
        if n == BASE:
            continue
        reference.set_adapter(n)
        for name, p in reference.named_parameters():
            p.requires_grad_("lora_" in name)
        loss_of(reference, slice(i, i + 1)).backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert set(mixed_grads) == set(ref_grads)
    assert any(".b." in n and "magnitude" in n for n in mixed_grads)  # DoRA's m trains too
    for name, g in ref_grads.items():
        torch.testing.assert_close(mixed_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_training_dropout_per_row():
    """Each row gets its adapter's dropout: a row whose adapter has p=0 is deterministic, others are not."""
    model = _llama_three(dropout=0.5)
    model.add_adapter("nodrop", dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                              task_type="CAUSAL_LM"))
    model.train()
    ids = _ids(2, 6)
    outs = [model(input_ids=ids, adapter_names=["a", "nodrop"]).logits for _ in range(2)]
    assert (outs[0][0] - outs[1][0]).abs().max() > 1e-3
    torch.testing.assert_close(outs[0][1], outs[1][1])
    model.eval()
    model.set_adapter("nodrop")
    with torch.no_grad():
        torch.testing.assert_close(outs[0][1], model(input_ids=ids[1:]).logits[0], atol=1e-5, rtol=0)


def test_stacks_follow_weight_changes():
    """The cached no-grad stacks see an in-place update of an adapter (as an optimizer step makes)."""
    model = _llama_three()
    ids = _ids(3, 5)
    names = ["a", "c", "b"]
    with torch.no_grad():
        model(input_ids=ids, adapter_names=names)
        for name, p in model.named_parameters():
            if ".c." in name and "lora_B" in name:
                p.mul_(-2.0)
        out = model(input_ids=ids, adapter_names=names).logits
        model.set_adapter("c")
        torch.testing.assert_close(out[1], model(input_ids=ids[1:2]).logits[0], atol=1e-5, rtol=0)


def test_half_precision_base():
    model = _llama_three().to(torch.bfloat16)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    ids = _ids(4, 6)
    names = ["c", "a", BASE, "b"]
    with torch.no_grad():
        out = model(input_ids=ids, adapter_names=names).logits.float()
        ref = torch.cat(_row_by_row(model, names, lambda m, i: m(input_ids=ids[i:i + 1]).logits.float()))
    torch.testing.assert_close(out, ref, atol=0.05, rtol=0)


@pytest.mark.parametrize("gathered", [False, True])
def test_classification_heads_per_row(gathered, monkeypatch):
    """modules_to_save: each row through its own adapter's classification head (BERT: biases, DoRA)."""
    if gathered:  # every linear layer with two adapters takes the gathered route
        monkeypatch.setattr(mixed, "_GATHER_COST", 0)
    model = dt.get_peft_model(_random_biases(tiny_bert_cls()), dt.LoraConfig(r=4, target_modules=["query", "value"],
                                                              task_type="SEQ_CLS"), "x")
    model.add_adapter("y", dt.LoraConfig(r=8, target_modules=["query", "key", "dense"], use_dora=True,
                                         task_type="SEQ_CLS"))
    random_lora(model, seed=5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.5)
    model.eval()
    ids = _ids(5, 8)
    names = ["y", BASE, "x", "y", "x"]
    with torch.no_grad():
        out = model(input_ids=ids, adapter_names=names).logits
        ref = torch.cat(_row_by_row(model, names, lambda m, i: m(input_ids=ids[i:i + 1]).logits))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert (ref[0] - ref[1]).abs().max() > 0.05


class _EmbedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16, padding_idx=0)
        self.proj = nn.Linear(16, 8)

    def forward(self, input_ids):
        return self.proj(self.emb(input_ids))


@pytest.mark.parametrize("kind", ["embedding", "conv", "conv1d", "conv1d-gathered"])
def test_layer_kinds(kind, monkeypatch):
    if kind.endswith("gathered"):
        monkeypatch.setattr(mixed, "_GATHER_COST", 0)
    if kind == "embedding":
        torch.manual_seed(0)
        base, targets, inputs = _EmbedNet(), ["emb", "proj"], {"input_ids": _ids(4, 5)}
    elif kind == "conv":
        base, targets = tiny_convnet(), ["conv", "conv2", "row", "head"]
        inputs = {"x": torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))}
    else:  # transformers' Conv1D (GPT-2)
        base, targets, inputs = _random_biases(tiny_gpt2_lm()), ["c_attn", "c_fc"], {"input_ids": _ids(4, 6)}
    model = dt.get_peft_model(base, dt.LoraConfig(r=2, target_modules=targets), "p")
    seen = []
    real = mixed._gathers_pay
    monkeypatch.setattr(mixed, "_gathers_pay", lambda *a: seen.append(real(*a)) or seen[-1])
    model.add_adapter("q", dt.LoraConfig(r=6, target_modules=targets[:1], use_dora=True))
    random_lora(model, seed=7)
    model.eval()
    names = ["q", "p", BASE, "p"]
    with torch.no_grad():
        out = main_output(model(**inputs, adapter_names=names))
        ref = torch.cat(_row_by_row(model, names, lambda m, i: main_output(m(**{k: v[i:i + 1] for k, v in inputs.items()}))))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert any(seen) == kind.endswith("gathered")


def test_bad_requests_are_refused_and_change_nothing():
    model = _llama_three()
    ids = _ids(3, 4)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    cases = {
        "unknown adapter": (["a", "zzz", "b"], "unknown adapter"),
        "length": (["a", "b"], "2 names for a batch of 3"),
        "string": ("a", "non-empty list"),
        "empty": ([], "non-empty list"),
    }
    for label, (names, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            model(input_ids=ids, adapter_names=names)
    prompted = dt.get_peft_model(tiny_llama(), dt.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="prompt-learning"):
        prompted(input_ids=ids, adapter_names=["default", BASE, "default"])
    with pytest.raises(ValueError, match="prompt-learning"):
        prompted.generate(input_ids=ids, adapter_names=[BASE] * 3, max_new_tokens=2)
    both = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"), "l")
    both.add_adapter("ia3", dt.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                         task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match=r"'ia3' \(IA3\) cannot run in a mixed-adapter batch"):
        both(input_ids=ids, adapter_names=["l", "ia3", "l"])
    both.set_adapter("ia3")  # active IA3 layers would apply to every row
    with pytest.raises(ValueError, match="runs active adapters"):
        both(input_ids=ids, adapter_names=["l", BASE, "l"])
    model.set_adapter("a")
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        model(input_ids=ids, adapter_names=["a", "b", "a"])
    model.unmerge_adapter()
    with model.disable_adapter(), pytest.raises(ValueError, match="disable_adapter"):
        model(input_ids=ids, adapter_names=["a", "b", "a"])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=0)
    assert all(layer.rows is None for layer in model.modules() if hasattr(layer, "route_rows"))
