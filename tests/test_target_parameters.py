"""LoRA on named parameters (``target_parameters``): mixture-of-experts tensors as peft lays them out."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import VOCAB, tiny_llama

import deltatune as dt
from deltatune.methods.lora.param import param_delta

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                            num_experts_per_tok=2, head_dim=8)
    return Qwen3MoeForCausalLM(config).eval()


IDS = torch.randint(3, VOCAB - 2, (2, 7), generator=torch.Generator().manual_seed(1))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_delta_formula():
    """delta[e] = s * B[:, :, e] @ A[e r:(e+1) r] with B viewed (out, r, E), as peft lays the factors out."""
    g = torch.Generator().manual_seed(0)
    E, r, out, inp = 3, 2, 5, 4
    A, B = torch.randn(E * r, inp, generator=g), torch.randn(out, r * E, generator=g)
    delta = param_delta(A, B, 0.5, E)
    for e in range(E):
        expected = 0.5 * B.reshape(out, r, E)[:, :, e] @ A[e * r:(e + 1) * r]
        torch.testing.assert_close(delta[e], expected)
    torch.testing.assert_close(param_delta(A, B, 0.5, E, transposed=True), delta.transpose(1, 2))


def test_moe_experts_match_peft_both_ways(tmp_path):
    theirs = peft.get_peft_model(tiny_moe(), peft.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=EXPERTS,
                                                             init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    expected = _logits(theirs)
    ours = dt.PeftModel.from_pretrained(tiny_moe(), tmp_path / "peft")
    torch.testing.assert_close(_logits(ours), expected, atol=1e-5, rtol=0)
    with ours.disable_adapter():
        assert (_logits(ours) - expected).abs().max() > 1e-2
    experts = ours.base_model.model.model.layers[0].mlp.experts  # the module's last parameter is outermost
    assert (experts.parameter_name, experts.base_layer.parameter_name) == ("down_proj", "gate_up_proj")
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tiny_moe(), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(back), expected, atol=1e-5, rtol=0)

    before = {n: p.clone() for n, p in ours.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))}
    ours.merge_adapter()
    torch.testing.assert_close(_logits(ours), expected, atol=1e-5, rtol=0)
    ours.unmerge_adapter()
    for n, p in ours.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(ours.merge_and_unload()), expected, atol=1e-5, rtol=0)


def test_train_generate_two_adapters_and_refusals():
    model = dt.get_peft_model(tiny_moe(), dt.LoraConfig(r=2, target_modules=[], target_parameters=EXPERTS,
                                                        task_type="CAUSAL_LM"), "a")
    model.add_adapter("b", dt.LoraConfig(r=4, target_modules=[], target_parameters=EXPERTS, init_lora_weights=False,
                                         task_type="CAUSAL_LM"))
    model.train()
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(n.split("adapters.")[1].startswith("a.") for n in grads)  # only the active adapter trains
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    model.eval()
    model.set_adapter("b")
    b_logits = _logits(model)
    model.set_adapter("a")
    assert (b_logits - _logits(model)).abs().max() > 1e-3  # B starts at zero for "a", random for "b"
    assert model.generate(input_ids=IDS, max_new_tokens=3, do_sample=False).shape == (2, 10)
    with pytest.raises(ValueError, match="cannot run in a mixed-adapter batch|route rows"):
        model(input_ids=IDS, adapter_names=["a", "b"])
    for bad, match in ((dict(lora_dropout=0.1), "lora_dropout"), (dict(use_dora=True), "DoRA")):
        with pytest.raises((ValueError, TypeError), match=match):
            dt.get_peft_model(tiny_moe(), dt.LoraConfig(r=2, target_modules=[], target_parameters=EXPERTS, **bad))
    with pytest.raises(dt.TargetError, match="target_parameters"):
        dt.get_peft_model(tiny_moe(), dt.LoraConfig(r=2, target_modules=[], target_parameters=["no_such_param"]))
    with pytest.raises(ValueError, match="same parameters"):
        model.add_adapter("c", dt.LoraConfig(r=2, target_modules=[], target_parameters=EXPERTS[:1]))
    assert "c" not in model.peft_config


def test_two_dimensional_parameter_equals_module_lora(tmp_path):
    """A 2-D weight targeted as a parameter gives what LoRA on its nn.Linear gives (same factors)."""
    by_param = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=[], init_lora_weights=False,
                                                              target_parameters=["self_attn.q_proj.weight"]))
    by_module = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in by_module.named_parameters():
            if "lora_" in name:
                p.copy_(dict(by_param.named_parameters())[name])
    torch.testing.assert_close(_logits(by_param), _logits(by_module), atol=1e-5, rtol=0)
