"""The LoRA matrix: every layer type x every option, each checked against an explicit formula.

For each cell: identity at init; the forward equals the base layer run with ``W + s * delta(B, A)``
(the formula written out here, independently of deltatune's functional module); merged == unmerged;
unmerge restores the weights; disable_adapter gives the base outputs; only the expected tensors get
gradients; a few optimizer steps lower the loss; save -> load reproduces the outputs.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from conftest import random_lora


class Net(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _conv_ref(fn):
    def ref(layer, x, delta):
        return fn(x, layer.weight + delta, layer.bias, layer.stride, layer.padding, layer.dilation)
    return ref


def _delta_linear(A, B):  # (out, in)
    return B @ A


def _delta_conv(A, B):  # (out, in, *k): sum over r of B[o, r] * A[r, i, k]
    return (B.flatten(1)[:, :, None] * A.flatten(1)[None]).sum(1).reshape(B.shape[0], *A.shape[1:])


# name -> (base layer builder, input builder, forward with an explicit weight delta, delta(A, B) in weight layout)
LAYERS = {
    "linear": (lambda: nn.Linear(16, 12), lambda g: torch.randn(4, 16, generator=g),
               lambda l, x, d: F.linear(x, l.weight + d, l.bias), _delta_linear),
    "linear-nobias": (lambda: nn.Linear(16, 12, bias=False), lambda g: torch.randn(2, 3, 16, generator=g),
                      lambda l, x, d: F.linear(x, l.weight + d), _delta_linear),
    "gpt2-conv1d": (lambda: Conv1D(12, 16), lambda g: torch.randn(4, 16, generator=g),
                    lambda l, x, d: x @ (l.weight + d) + l.bias, lambda A, B: (B @ A).T),
    "embedding": (lambda: nn.Embedding(20, 12, padding_idx=0), lambda g: torch.randint(0, 20, (3, 5), generator=g),
                  lambda l, x, d: F.embedding(x, l.weight + d, l.padding_idx), lambda A, B: (B @ A).T),
    "conv1d": (lambda: nn.Conv1d(3, 6, 3, padding=1), lambda g: torch.randn(2, 3, 9, generator=g),
               _conv_ref(F.conv1d), _delta_conv),
    "conv2d": (lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1), lambda g: torch.randn(2, 3, 8, 8, generator=g),
               _conv_ref(F.conv2d), _delta_conv),
    "conv2d-1x1": (lambda: nn.Conv2d(4, 6, 1), lambda g: torch.randn(2, 4, 5, 5, generator=g),
                   _conv_ref(F.conv2d), _delta_conv),
    "conv3d": (lambda: nn.Conv3d(2, 4, 2), lambda g: torch.randn(1, 2, 4, 4, 4, generator=g),
               _conv_ref(F.conv3d), _delta_conv),
}

OPTIONS = {
    "default": dict(r=4, lora_alpha=8),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "gaussian-init": dict(r=3, lora_alpha=6, init_lora_weights="gaussian"),
    "dropout": dict(r=4, lora_alpha=8, lora_dropout=0.1),
    "bias-all": dict(r=2, lora_alpha=2, bias="all"),
    "bias-lora-only": dict(r=2, lora_alpha=4, bias="lora_only"),
    "patterns": dict(r=8, lora_alpha=8, rank_pattern={"layer": 2}, alpha_pattern={"^layer": 5}),
}


def _expected_scaling(opts) -> float:
    r = opts.get("rank_pattern", {}).get("layer", opts["r"])
    alpha = opts.get("alpha_pattern", {}).get("^layer", opts["lora_alpha"])
    return alpha / math.sqrt(r) if opts.get("use_rslora") else alpha / r


def _build(layer_name, opts, init=True, seed=0):
    make_layer, make_input, ref, delta = LAYERS[layer_name]
    torch.manual_seed(seed)
    base = Net(make_layer()).eval()
    g = torch.Generator().manual_seed(1)
    x = make_input(g)
    config = dt.LoraConfig(target_modules=["layer"], **{**opts, "init_lora_weights": opts.get("init_lora_weights", True) if init else False})
    return base, x, ref, delta, config



CELLS = [(l, o) for l in LAYERS for o in OPTIONS]


@pytest.mark.parametrize("layer_name,option", CELLS)
def test_cell(layer_name, option, tmp_path):
    opts = OPTIONS[option]
    base, x, ref, delta_fn, config = _build(layer_name, opts)
    reference = copy.deepcopy(base)
    with torch.no_grad():
        want_base = reference(x)

    # 1. identity at init
    model = dt.get_peft_model(base, config).eval()
    with torch.no_grad():
        assert torch.equal(model(x), want_base)

    # 2. forward == the base layer run with W + s * delta(A, B)
    random_lora(model, seed=5)
    adapter = model.base_model.model.layer.adapters["default"]
    s = _expected_scaling(opts)
    assert adapter.scaling == pytest.approx(s)
    with torch.no_grad():
        want = ref(reference.layer, x, s * delta_fn(adapter.lora_A, adapter.lora_B))
        got = model(x)
    assert (got - want_base).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # 3. disable_adapter gives the base outputs, and leaves the adapter on afterwards
    with model.disable_adapter(), torch.no_grad():
        assert torch.equal(model(x), want_base)
    with torch.no_grad():
        assert torch.equal(model(x), got)

    # 4. save -> load round trip
    model.save_pretrained(str(tmp_path))
    loaded = dt.PeftModel.from_pretrained(copy.deepcopy(reference), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), got)

    # 5. merged == unmerged; unmerge restores the weights
    weight_before = reference.layer.weight.detach().clone()
    model.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(model(x), got, rtol=1e-5, atol=1e-5)
    layer_weight = model.base_model.model.layer.base_layer.weight
    torch.testing.assert_close(layer_weight, weight_before + s * delta_fn(adapter.lora_A, adapter.lora_B).detach(),
                               rtol=1e-5, atol=1e-6)
    model.unmerge_adapter()
    torch.testing.assert_close(layer_weight, weight_before, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), got, rtol=1e-6, atol=1e-6)

    merged = loaded.merge_and_unload()
    assert isinstance(merged.layer, type(reference.layer))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), got, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer_name,option", CELLS)
def test_cell_training(layer_name, option):
    """Only the expected tensors get gradients, and a few optimizer steps lower the loss."""
    opts = OPTIONS[option]
    base, x, _, _, config = _build(layer_name, opts, init=True)
    model = dt.get_peft_model(base, config).train()
    expected = {"base_model.model.layer.adapters.default.lora_A", "base_model.model.layer.adapters.default.lora_B"}
    if opts.get("bias") in ("all", "lora_only") and getattr(base.layer.base_layer, "bias", None) is not None:
        expected.add("base_model.model.layer.base_layer.bias")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected

    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        target = torch.randn(model(x).shape, generator=g)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad == expected
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        final = F.mse_loss(model(x), target).item()
    assert final < losses[0]
