"""LoRA on grouped convolutions, laid out as peft does (A ungrouped with the base kernel, B a grouped 1x1)."""

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
        self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


def _base():
    torch.manual_seed(0)
    return _Net().eval()


X = torch.randn(3, 8, 6, 6, generator=torch.Generator().manual_seed(1))


def test_matches_peft_both_ways(tmp_path):
    theirs = peft.get_peft_model(_base(), peft.LoraConfig(r=8, target_modules=["conv"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "peft")
    ours = dt.PeftModel.from_pretrained(_base(), tmp_path / "peft")
    assert ours.base_model.model.conv.adapters["default"].lora_B.shape == (8, 2, 1, 1)  # r / groups inputs
    with torch.no_grad():
        expected = theirs(X)
        torch.testing.assert_close(ours(X), expected, atol=1e-5, rtol=0)
        with ours.disable_adapter():
            assert (ours(X) - expected).abs().max() > 1e-3
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(_base(), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(back(X), expected, atol=1e-5, rtol=0)


def test_grouped_delta_formula():
    """Against the formula: h = conv(x, A) over all input channels; y_o = s * sum_{j in group(o)} B[o, j] h_j."""
    model = dt.get_peft_model(_base(), dt.LoraConfig(r=4, lora_alpha=8, target_modules=["conv"],
                                                     init_lora_weights=False))
    layer = model.base_model.model.conv
    ad = layer.adapters["default"]
    with torch.no_grad():
        h = torch.nn.functional.conv2d(X, ad.lora_A, None, 1, 1)  # (N, 4, H, W)
        per_group = 4 // 4
        expected = torch.zeros(3, 8, 6, 6)
        for o in range(8):
            g = o // 2  # 8 outputs in 4 groups
            for j in range(per_group):
                expected[:, o] += ad.lora_B[o, j, 0, 0] * h[:, g * per_group + j]
        delta = layer(X) - layer.base_layer(X)
    torch.testing.assert_close(delta, expected * ad.scaling, atol=1e-5, rtol=0)


def test_refusals_change_nothing():
    with pytest.raises(ValueError, match="divisible"):
        dt.get_peft_model(_base(), dt.LoraConfig(r=6, target_modules=["conv"]))
    with pytest.raises(TypeError, match="DoRA"):
        dt.get_peft_model(_base(), dt.LoraConfig(r=8, target_modules=["conv"], use_dora=True))
    model = dt.get_peft_model(_base(), dt.LoraConfig(r=8, target_modules=["conv"], init_lora_weights=False))
    model.add_adapter("other", dt.LoraConfig(r=4, target_modules=["conv"], init_lora_weights=False))
    model.eval()
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        out = model(X)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="grouped convolutions"):
        model(X, adapter_names=["default", "other", "default"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        torch.testing.assert_close(model(X), out)
