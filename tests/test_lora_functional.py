"""The LoRA hot path against the plain PyTorch formula: in-place fused forward, compact-mask dropout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.methods.lora import functional as LF


def _layer(bias=True, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 20, bias=bias))
    model = dt.get_peft_model(model, dt.LoraConfig(r=4, lora_alpha=12, target_modules=["0"], lora_dropout=dropout,
                                                   init_lora_weights=False))
    return model.base_model.model[0]


@pytest.mark.parametrize("shape", [(5, 24), (2, 3, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_forward_gradients_equal_the_plain_formula(shape, bias):
    layer = _layer(bias).train()
    ad = layer.adapters["default"]
    ad.lora_A.requires_grad_(True)
    x = torch.randn(*shape, requires_grad=True)
    out = layer(x)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, ad.lora_A, ad.lora_B], g)

    A, B = ad.lora_A.detach().clone().requires_grad_(), ad.lora_B.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    W, b = layer.base_layer.weight.detach(), layer.base_layer.bias
    want = x_ref @ W.T + (b.detach() if b is not None else 0) + ad.scaling * (x_ref @ A.T) @ B.T
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    ref_grads = torch.autograd.grad(want, [x_ref, A, B], g)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(64, 24), (4, 16, 24)])
def test_dropout_path_matches_the_plain_formula_with_the_same_mask(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    A = (torch.randn(4, 24) * 0.3).requires_grad_()
    B = (torch.randn(20, 4) * 0.3).requires_grad_()
    p, s = 0.3, 1.5
    out, positions = LF.linear_delta_dropout(x, A, B, s, p, return_positions=True)
    mask = torch.ones(x.numel())
    mask[positions.long()] = 0
    mask = mask.reshape(shape)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, A, B], g)

    x_ref, A_ref, B_ref = (t.detach().clone().requires_grad_() for t in (x, A, B))
    want = s * ((x_ref * mask / (1 - p)) @ A_ref.T) @ B_ref.T
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for got, ref in zip(grads, torch.autograd.grad(want, [x_ref, A_ref, B_ref], g)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_delta_is_the_plain_product_or_the_compact_dropout(p):
    """lora_delta (the layers' general route): ``s B A x`` without dropout; with it, the compact-mask
    delta (same mask for the same seed), whose kept positions equal ``s B A (x / (1 - p))``."""
    torch.manual_seed(0)
    x = torch.randn(3, 12, 24)
    A, B = torch.randn(4, 24) * 0.3, torch.randn(20, 4) * 0.3
    torch.manual_seed(5)
    got = LF.lora_delta(x, A, B, 1.5, p)
    if p == 0.0:
        torch.testing.assert_close(got, 1.5 * (x @ A.T) @ B.T, rtol=1e-6, atol=1e-6)
        return
    torch.manual_seed(5)
    delta, dropped = LF.linear_delta_dropout(x, A, B, 1.5, p, return_positions=True)
    torch.testing.assert_close(got, delta, rtol=0, atol=0)
    kept = torch.ones(x.numel())
    kept[dropped] = 0
    want = 1.5 * ((x * kept.view_as(x) / (1 - p)) @ A.T) @ B.T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [12, 22, 30])  # in = 24, out = 20: neither, backward, both folded
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_base_and_adapter_in_one_node_match_the_plain_formula(tokens, dora, p, bias):
    """lora_linear (the nn.Linear training path) == b + scale * (x W^T + the separate delta), same mask;
    gradients of x, W, b, A, B and DoRA's row scale (a trainable base included), the dropout mask applied
    before the base's part. The token counts take each way of computing it: the rank-r path or the
    temporary ``W + s B A`` (forward when tokens >= in, backward when tokens >= out), DoRA's scale on the
    output or on the weights."""
    torch.manual_seed(0)
    x = torch.randn(tokens, 24, requires_grad=True)
    W = (torch.randn(20, 24) * 0.3).requires_grad_()
    b = torch.randn(20).requires_grad_() if bias else None
    A = (torch.randn(4, 24) * 0.3).requires_grad_()
    B = (torch.randn(20, 4) * 0.3).requires_grad_()
    scale = (torch.rand(20) + 0.5).requires_grad_() if dora else None
    torch.manual_seed(5)
    got = LF.lora_linear(x, W, b, A, B, 1.5, p, scale)
    torch.manual_seed(5)  # the same mask
    delta = LF.linear_delta_dropout(x, A, B, 1.5, p) if p else 1.5 * (x @ A.T) @ B.T
    want = (x @ W.T + delta) * (scale if dora else 1) + (b if bias else 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(got)
    inputs = [x, W, A, B] + ([b] if bias else []) + ([scale] if dora else [])
    for a, c in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_a_frozen_weight_gets_no_gradient_and_the_fold_leaves_it_alone():
    """The temporary ``W + s B A`` is a new tensor: the layer's weight is unchanged after forward and
    backward on many tokens (both folds taken)."""
    torch.manual_seed(0)
    x, W = torch.randn(64, 24, requires_grad=True), torch.randn(20, 24)
    A, B = torch.randn(4, 24).requires_grad_(), torch.randn(20, 4).requires_grad_()
    before = W.clone()
    for scale in (None, (torch.rand(20) + 0.5).requires_grad_()):
        LF.lora_linear(x, W, None, A, B, 2.0, 0.0, scale).sum().backward()
        assert torch.equal(W, before) and W.grad is None


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_dropped_positions_are_bernoulli(p):
    torch.manual_seed(1)
    n = 200_000
    counts, seen = [], torch.zeros(n)
    for _ in range(20):
        positions = LF.sample_dropped(n, p, "cpu")
        assert positions.unique().numel() == positions.numel()
        assert positions.min() >= 0 and positions.max() < n
        counts.append(positions.numel())
        seen[positions] += 1
    sd = math.sqrt(n * p * (1 - p))
    for c in counts:  # each count ~ Binomial(n, p)
        assert abs(c - n * p) < 5 * sd
    # Each element is dropped independently with probability p: per-position counts ~ Binomial(20, p).
    assert abs(seen.mean().item() - 20 * p) < 5 * math.sqrt(20 * p * (1 - p) / n)
    assert abs(seen.var().item() - 20 * p * (1 - p)) < 0.05 * 20 * p * (1 - p)
    # Neighbours are uncorrelated (the gaps are drawn independently).
    a, b = seen[:-1] - seen.mean(), seen[1:] - seen.mean()
    assert abs((a * b).mean().item() / seen.var().item()) < 0.02


def test_dropped_positions_keep_drawing_when_the_first_draws_fall_short(monkeypatch):
    draws = []
    real = LF._geometric

    def short_first(count, p, device):  # the first batch: gaps of 1 (every element dropped), far too short
        draws.append(count)
        return torch.ones(count, dtype=torch.int64) if len(draws) == 1 else real(count, p, device)

    monkeypatch.setattr(LF, "_geometric", short_first)
    torch.manual_seed(0)
    n = 20_000
    positions = LF.sample_dropped(n, 0.05, "cpu")
    first = draws[0]
    assert len(draws) >= 2 and positions[-1] < n and positions.diff().min() >= 1
    assert torch.equal(positions[:first], torch.arange(first))  # the short batch, then the rest of the range
    assert positions[first:].numel() > 0.5 * 0.05 * (n - first)


def test_dropout_is_unbiased_and_seeded():
    x = torch.ones(100_000)
    A, B = torch.ones(1, 1), torch.ones(1, 1)
    torch.manual_seed(3)
    out = LF.linear_delta_dropout(x[:, None], A, B, 1.0, 0.2)
    assert abs(out.mean().item() - 1.0) < 0.01
    assert set(out.unique().tolist()) == {0.0, 1.25}
    torch.manual_seed(3)
    assert torch.equal(LF.linear_delta_dropout(x[:, None], A, B, 1.0, 0.2), out)


def test_dropout_keeps_no_copy_of_the_input():
    """Saved for backward: the input itself, the rank-r intermediate and a compact index list."""
    layer = _layer(dropout=0.1).train()
    x = torch.randn(8, 64, 24, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    copies = [t for t in saved if t.numel() >= x.numel() // 4 and t.data_ptr() != x.data_ptr()]
    assert copies == [], [tuple(t.shape) for t in copies]
    positions = [t for t in saved if t.dtype == torch.int32]
    assert positions and positions[0].numel() < 0.2 * x.numel()


@pytest.mark.parametrize("dora", [False, True])
def test_half_precision_never_folds_the_delta_into_the_weight(monkeypatch, dora):
    """In bf16 ``W + s B A`` would round a small delta away at the weight's magnitude: even with many
    tokens the half-precision path keeps the rank-r product separate, forward and backward."""
    def no_fold(*args):
        raise AssertionError("folded in half precision")

    monkeypatch.setattr(LF, "plus_low_rank", no_fold)
    torch.manual_seed(0)
    x = torch.randn(64, 24, dtype=torch.bfloat16, requires_grad=True)
    W = torch.randn(20, 24, dtype=torch.bfloat16)
    A = torch.randn(4, 24, dtype=torch.bfloat16).requires_grad_()
    B = torch.randn(20, 4, dtype=torch.bfloat16).requires_grad_()
    scale = torch.rand(20, dtype=torch.bfloat16).add_(0.5).requires_grad_() if dora else None
    out = LF.lora_linear(x, W, None, A, B, 2.0, 0.0, scale)
    want = (x.float() @ W.float().T + 2.0 * (x.float() @ A.float().T) @ B.float().T) * (1 if scale is None else scale.float())
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-1)
    out.sum().backward()
    assert x.grad is not None and A.grad is not None
