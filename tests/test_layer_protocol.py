"""The AdapterLayer protocol (checked at register()), quantization-aware base-weight access, and the one
merge loop every method shares."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune import adapter_state
from deltatune.adapter_layer import check_layer, check_layer_class, logical_shape, read_weight, write_weight
from deltatune.methods.adalora.layer import SVDLinear
from deltatune.methods.ia3.layer import IA3Layer
from deltatune.registry import Method, PeftType, adapter_layer_types, get_method, register


def test_every_registered_layer_class_passes_the_check():
    classes = adapter_layer_types()
    assert {get_method(t).layer_cls for t in (PeftType.LORA, PeftType.IA3, PeftType.ADALORA)} <= set(classes)
    for cls in classes:
        check_layer_class(cls)


@pytest.mark.parametrize("peft_type", [PeftType.LORA, PeftType.IA3, PeftType.ADALORA])
def test_wrapped_linear_layers_have_the_protocol_state(peft_type):
    layer = get_method(peft_type).wrap(nn.Linear(6, 4))
    check_layer(layer)
    assert (layer.in_features, layer.out_features) == (6, 4)


class _NoUnmerge(nn.Module):
    """A layer class as a new method might write it, forgetting ``unmerge`` and ``checkpoint_kind``."""

    set_active = adapter_state.set_active
    set_disabled = adapter_state.set_disabled
    delete_adapter = adapter_state.delete_adapter

    def add_adapter(self, name, *args, **kwargs):
        pass

    def adapter_params(self, name):
        return {}

    def merge(self, names=None, safe=False):
        pass


def test_register_refuses_a_layer_class_missing_members_and_names_them():
    original = get_method(PeftType.IA3)
    bad = Method(PeftType.IA3, original.config_cls, _NoUnmerge, original.wrap, original.add_adapter,
                 original.is_linear)
    try:
        with pytest.raises(TypeError) as err:
            register(bad)
        assert "_NoUnmerge" in str(err.value)
        assert str(err.value).endswith("missing unmerge, checkpoint_kind")
    finally:  # should register() have accepted it, the real method comes back for the other tests
        register(original)
    assert get_method(PeftType.IA3) is original


def test_check_layer_names_missing_instance_state():
    layer = IA3Layer(nn.Linear(4, 4))
    del layer.merged_adapters
    with pytest.raises(TypeError, match="missing merged_adapters$"):
        check_layer(layer)


# ---------------------------------------------------------------------------------------- base weight
def test_logical_shape_of_plain_transposed_and_conv_weights():
    from transformers.pytorch_utils import Conv1D

    assert logical_shape(nn.Linear(6, 4)) == (4, 6)
    assert logical_shape(Conv1D(4, 6), fan_in_fan_out=True) == (4, 6)  # Conv1D(nf=out, nx=in) stores (in, out)
    assert logical_shape(nn.Conv2d(3, 8, 5)) == (8, 3, 5, 5)


#: Largest rounding error as a share of the absmax: NF4's widest gap between levels is 0.28 (half: 0.14,
#: plus the double-quantized absmax itself); int8 rounds to absmax / 127 steps.
GRID = {"4bit": 0.2, "8bit": 1 / 127}


def _bnb_linear(kind, seed=0):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(seed)
    dense = nn.Linear(128, 64)
    if kind == "4bit":
        q = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4").to("cpu")
    else:
        q = bnb.nn.Linear8bitLt(128, 64, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    q.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    return dense, q


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_quantized_weights_are_read_dequantized_with_their_logical_shape(kind):
    dense, q = _bnb_linear(kind)
    if kind == "4bit":
        assert q.weight.shape != (64, 128)  # packed
    assert logical_shape(q) == (64, 128)
    W = read_weight(q)
    assert W.dtype == torch.float32 and W.shape == (64, 128)
    assert (W - dense.weight).abs().max() <= dense.weight.abs().max() * GRID[kind]
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the dequantized weight is the one the layer computes with
        err = (q(x) - nn.functional.linear(x, W, q.bias)).abs().max().item()
    assert err < (1e-4 if kind == "4bit" else 0.05)


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_writing_a_quantized_weight_requantizes_with_a_warning(kind):
    _, q = _bnb_linear(kind)
    new = 2.0 * read_weight(q)
    with pytest.warns(UserWarning, match="quantizes again"):
        write_weight(q, new)
    assert type(q.weight).__name__ in ("Params4bit", "Int8Params")
    assert (read_weight(q) - new).abs().max() <= new.abs().max() * GRID[kind]


# ---------------------------------------------------------------------------------------- merge loop
def _layer_with(names):
    layer = IA3Layer(nn.Linear(4, 3))
    for n in names:
        layer.add_adapter(n, feedforward=False)
    layer.set_active(names)
    return layer


def test_merge_loop_order_skips_and_unmerges_last_first():
    layer = _layer_with(["a", "b", "c"])
    calls = []

    def record(sign):
        def update(name, weight):
            calls.append((sign, name))
            return weight + sign * 1.0
        return update

    W0 = layer.base_layer.weight.detach().clone()
    adapter_state.merge_adapters(layer, ["b", "missing", "a", "b"], False, record(+1))
    assert layer.merged_adapters == ["b", "a"] and calls == [(1, "b"), (1, "a")]
    assert layer._run == [layer.adapters["c"]]  # merged adapters stop running
    adapter_state.merge_adapters(layer, None, False, record(+1))  # None: the active ones
    assert layer.merged_adapters == ["b", "a", "c"]
    calls.clear()
    adapter_state.unmerge_adapters(layer, record(-1))
    assert calls == [(-1, "c"), (-1, "a"), (-1, "b")] and layer.merged_adapters == []
    assert len(layer._run) == 3
    torch.testing.assert_close(layer.base_layer.weight, W0)


@pytest.mark.parametrize("bad", ["weight", "bias"])
def test_safe_merge_checks_before_writing_anything(bad):
    layer = _layer_with(["a"])
    W0, b0 = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    nan = lambda name, t: torch.full_like(t, float("nan"))  # noqa: E731
    keep = lambda name, t: t * 2  # noqa: E731
    weight_fn, bias_fn = (nan, keep) if bad == "weight" else (keep, nan)
    with pytest.raises(ValueError, match="merging adapter 'a' into Linear produced NaN/inf"):
        adapter_state.merge_adapters(layer, ["a"], True, weight_fn, bias_fn)
    assert torch.equal(layer.base_layer.weight, W0) and torch.equal(layer.base_layer.bias, b0)
    assert layer.merged_adapters == []


def test_ia3_merge_scales_weight_and_bias_and_a_failed_unmerge_stays_merged():
    layer = _layer_with(["a"])
    W0, b0 = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    with torch.no_grad():
        layer.adapters["a"].ia3_l.copy_(torch.tensor([[2.0], [0.0], [0.5]]))
    layer.merge()
    l = torch.tensor([2.0, 0.0, 0.5])
    torch.testing.assert_close(layer.base_layer.weight, W0 * l[:, None])  # W' = diag(l) W
    torch.testing.assert_close(layer.base_layer.bias, b0 * l)  # b' = b * l
    with pytest.raises(ValueError, match="zero entries"):
        layer.unmerge()
    assert layer.merged_adapters == ["a"]  # the weights still hold it, so the bookkeeping says so


def test_svd_linear_merge_and_unmerge_round_trip():
    layer = SVDLinear(nn.Linear(5, 3))
    layer.add_adapter("a", r=2, r0=2, scaling=4.0, dropout=0.0, init=False)
    layer.set_active(["a"])
    x = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = layer(x)
        W0 = layer.base_layer.weight.clone()
        layer.merge(safe=True)
        torch.testing.assert_close(layer.base_layer.weight, W0 + layer.delta_weight("a"))
        torch.testing.assert_close(layer(x), want)
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, W0)
