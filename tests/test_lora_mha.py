"""LoRA on ``nn.MultiheadAttention`` (in_proj_weight and out_proj, peft's layout and keys)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import deltatune as dt


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.attn(x, x, x)[0])


def _base():
    torch.manual_seed(0)
    return _Net().eval()


X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))


def _manual(model_state, base, out_times=1.0):
    """The formula: W_in + s B A and W_out + out_times * s B' A', in a plain copy of the base."""
    ref = copy.deepcopy(base)
    s = model_state["s"]
    with torch.no_grad():
        ref.attn.in_proj_weight += s * model_state["B"] @ model_state["A"]
        ref.attn.out_proj.weight += out_times * s * model_state["oB"] @ model_state["oA"]
        return ref(X)


def test_formula_checkpoints_and_merge(tmp_path):
    theirs = peft.get_peft_model(_base(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["attn"],
                                                          init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = dt.PeftModel.from_pretrained(_base(), tmp_path / "peft")
    attn = ours.base_model.model.attn
    ad, out_ad = attn.adapters["default"], attn.base_layer.out_proj.adapters["default"]
    state = {"s": ad.scaling, "A": ad.lora_A, "B": ad.lora_B, "oA": out_ad.lora_A, "oB": out_ad.lora_B}
    assert ad.lora_B.shape == (48, 2) and out_ad.lora_B.shape == (16, 2)
    with torch.no_grad():
        expected = _manual(state, _base())
        torch.testing.assert_close(ours(X), expected, atol=1e-5, rtol=0)
        # peft 0.21 adds out_proj's delta twice (its merge-based forward merges out_proj again): documented
        torch.testing.assert_close(theirs(X), _manual(state, _base(), out_times=2.0), atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(_base(), tmp_path / "ours").eval()
    mine = sorted((k, v) for k, v in back.state_dict().items() if "lora_" in k)
    assert len(mine) == 4
    for (k1, v1), (k2, v2) in zip(mine, sorted((k, v) for k, v in theirs.state_dict().items() if "lora_" in k)):
        assert k1 == k2 and torch.equal(v1, v2), k1  # the same tensors under the same keys, both ways
    ours.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(ours(X), expected, atol=1e-5, rtol=0)
    ours.unmerge_adapter()
    plain = ours.merge_and_unload()
    assert type(plain.attn) is nn.MultiheadAttention and type(plain.attn.out_proj) is not dt.methods.lora.linear.LoraLinear
    with torch.no_grad():
        torch.testing.assert_close(plain(X), expected, atol=1e-5, rtol=0)


def test_training_delete_and_refusals():
    model = dt.get_peft_model(_base(), dt.LoraConfig(r=2, target_modules=["attn"], init_lora_weights=False))
    model.train()
    model(X).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("out_proj.adapters" in n for n in grads) and any("attn.adapters" in n for n in grads)
    model.add_adapter("other", dt.LoraConfig(r=4, target_modules=["attn"]))
    model.delete_adapter("default")
    assert set(model.base_model.model.attn.base_layer.out_proj.adapters) == {"other"}
    with pytest.raises(TypeError, match="DoRA"):
        dt.get_peft_model(_base(), dt.LoraConfig(r=2, target_modules=["attn"], use_dora=True))
    with pytest.warns(UserWarning, match="lora_dropout is not applied"):
        dt.get_peft_model(_base(), dt.LoraConfig(r=2, target_modules=["attn"], lora_dropout=0.1))
