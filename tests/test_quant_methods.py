"""(IA)^3 and AdaLoRA on bitsandbytes 4-bit and 8-bit bases (CPU): shapes, forward against explicit
formulas on the dequantized weight, gradients, merging, and peft on the same quantized model."""

from __future__ import annotations


import peft
import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from conftest import load_llama64
from deltatune.adapter_layer import read_weight

bnb = pytest.importorskip("bitsandbytes")

QUANT = ["nf4", "int8"]  # (settings in conftest.QUANT_CONFIGS)
IA3_KW = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
              init_ia3_weights=False)
ADALORA_KW = dict(target_modules=["q_proj", "v_proj", "down_proj"], init_r=6, target_r=2, tinit=1, tfinal=2,
                  deltaT=1, total_step=8, lora_alpha=8)
IDS = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def randomize(model, seed=0, scale=0.3, around=0.0):
    """Seeded values for every adapter tensor: ``around + scale * N(0, 1)``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(around + scale * torch.randn(p.shape, generator=g))


def ia3_model(llama64_dir, quant):
    model = dt.get_peft_model(load_llama64(llama64_dir, quant), dt.IA3Config(**IA3_KW))
    randomize(model, around=1.0)
    return model


def adalora_model(llama64_dir, quant):
    model = dt.get_peft_model(load_llama64(llama64_dir, quant), dt.AdaLoraConfig(**ADALORA_KW))
    randomize(model, scale=0.2)
    return model


def attn(model, i=0):
    return model.base_model.model.model.layers[i].self_attn


def mlp(model, i=0):
    return model.base_model.model.model.layers[i].mlp


def kernel_error(base, x):
    """How far the quantized layer's own kernel is from ``x W^T + b`` with the dequantized ``W`` (int8
    also rounds the activations)."""
    with torch.no_grad():
        return (base(x) - F.linear(x, read_weight(base), base.bias)).abs().max().item()


# ---------------------------------------------------------------------------------------------- (IA)^3
@pytest.mark.parametrize("quant", QUANT)
def test_ia3_vectors_have_the_logical_sizes(llama64_dir, quant):
    model = ia3_model(llama64_dir, quant)
    k, down = attn(model).k_proj, mlp(model).down_proj
    assert type(k.base_layer).__name__ in ("Linear4bit", "Linear8bitLt")
    assert (k.in_features, k.out_features) == (64, 32)  # 2 kv heads of 16
    assert k.adapters["default"].ia3_l.shape == (32, 1)  # output scaling: one per output
    assert down.adapters["default"].ia3_l.shape == (1, 128)  # feed-forward: one per input
    assert model.get_nb_trainable_parameters()[0] == 2 * (32 + 32 + 128)


@pytest.mark.parametrize("quant", QUANT)
def test_ia3_forward_is_the_formula_on_the_dequantized_weight(llama64_dir, quant):
    model = ia3_model(llama64_dir, quant)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    h = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(3))
    k, down = attn(model).k_proj, mlp(model).down_proj
    l_out, l_in = k.adapters["default"].ia3_l.reshape(-1), down.adapters["default"].ia3_l.reshape(-1)
    with torch.no_grad():
        # exactly: y = base(x) * l (output scaling), y = base(h * l) (feed-forward)
        torch.testing.assert_close(k(x), k.base_layer(x) * l_out, rtol=0, atol=0)
        torch.testing.assert_close(down(h), down.base_layer(h * l_in), rtol=0, atol=0)
        # and with the dequantized weight: y = (x W^T + b) * l, y = (h * l) W^T + b, within the kernel's error
        W_k, W_d = read_weight(k.base_layer), read_weight(down.base_layer)
        assert W_k.shape == (32, 64) and W_d.shape == (64, 128)
        tol_k = kernel_error(k.base_layer, x) * l_out.abs().max().item() + 1e-5
        tol_d = kernel_error(down.base_layer, h * l_in) + 1e-5
        assert (k(x) - F.linear(x, W_k) * l_out).abs().max().item() <= tol_k
        assert (down(h) - F.linear(h * l_in, W_d)).abs().max().item() <= tol_d
    assert not torch.allclose(logits(model), logits(load_llama64(llama64_dir, quant)), atol=1e-3)  # the vectors act


@pytest.mark.parametrize("quant", QUANT)
def test_ia3_gradients_reach_the_vectors(llama64_dir, quant):
    model = ia3_model(llama64_dir, quant)
    model.train()
    k = attn(model).k_proj
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    g = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    l = k.adapters["default"].ia3_l
    (k(x) * g).sum().backward()
    with torch.no_grad():  # d/dl_j sum(base(x) * l * g) = sum over tokens of base(x)_j * g_j
        want = (k.base_layer(x) * g).sum(dim=(0, 1)).reshape(l.shape)
    torch.testing.assert_close(l.grad, want, rtol=1e-5, atol=1e-5)
    l.grad = None
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("ia3_l" in n for n in with_grad) and len(with_grad) == 6


@pytest.mark.parametrize("quant", QUANT)
def test_ia3_merge_requantizes_and_unmerge_restores(llama64_dir, quant):
    model = ia3_model(llama64_dir, quant)
    unmerged = logits(model)
    quant_error = (logits(load_llama64(llama64_dir)) - logits(load_llama64(llama64_dir, quant))).abs().max().item()
    k = attn(model).k_proj
    W0, b_none = read_weight(k.base_layer).clone(), k.base_layer.bias is None
    l = k.adapters["default"].ia3_l.detach().reshape(-1)
    with pytest.warns(UserWarning, match="quantizes again"):
        model.merge_adapter()
    assert k.merged_adapters == ["default"] and b_none
    assert type(k.base_layer).__name__ in ("Linear4bit", "Linear8bitLt")
    # W' = quant(diag(l) W): within the rounding of the scaled weight (NF4: 0.2 absmax, int8: absmax / 127)
    step = (W0 * l[:, None]).abs().max().item() * (0.2 if quant == "nf4" else 1 / 127)
    assert (read_weight(k.base_layer) - W0 * l[:, None]).abs().max().item() <= step
    merged = logits(model)
    assert (merged - unmerged).abs().max().item() <= 3 * quant_error
    with pytest.warns(UserWarning, match="quantizes again"):
        model.unmerge_adapter()
    assert k.merged_adapters == []
    assert (logits(model) - unmerged).abs().max().item() <= 3 * quant_error


def assert_peft_gives_the_same_logits(model, model_dir, quant, folder, module: str, layer_type: str) -> None:
    """Saved and loaded by peft onto the same quantized base, ``model``'s adapter gives the same logits;
    peft's layer for ``module`` is of a class whose qualified name contains ``layer_type``."""
    want = logits(model)
    model.save_pretrained(str(folder))
    pm = peft.PeftModel.from_pretrained(load_llama64(model_dir, quant), str(folder))
    layer = getattr(pm.base_model.model.model.layers[0].self_attn, module)
    assert layer_type in f"{type(layer).__module__}.{type(layer).__name__}"
    torch.testing.assert_close(logits(pm), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("quant", QUANT)
def test_ia3_matches_peft_on_the_same_quantized_model(llama64_dir, quant, tmp_path):
    assert_peft_gives_the_same_logits(ia3_model(llama64_dir, quant), llama64_dir, quant, tmp_path, "k_proj",
                                      "peft.tuners.ia3.bnb")


# ---------------------------------------------------------------------------------------------- AdaLoRA
@pytest.mark.parametrize("quant", QUANT)
def test_adalora_forward_is_the_formula_and_matches_peft(llama64_dir, quant, tmp_path):
    model = adalora_model(llama64_dir, quant)
    v = attn(model).v_proj
    ad = v.adapters["default"]
    assert (v.in_features, v.out_features) == (64, 32)
    assert ad.lora_A.shape == (6, 64) and ad.lora_B.shape == (32, 6)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # y = base(x) + s / (r0 + 1e-5) * B (A * E) x
        delta = F.linear(F.linear(x, ad.lora_A * ad.lora_E), ad.lora_B) * (8 / (6 + 1e-5))
        torch.testing.assert_close(v(x), v.base_layer(x) + delta, rtol=1e-6, atol=1e-6)
        assert delta.abs().max() > 1e-2
    assert_peft_gives_the_same_logits(model, llama64_dir, quant, tmp_path, "v_proj", ".SVDLinear")


@pytest.mark.parametrize("quant", QUANT)
def test_adalora_trains_and_merges_on_a_quantized_base(llama64_dir, quant):
    model = adalora_model(llama64_dir, quant)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in with_grad)
    model.zero_grad()
    model.eval()
    unmerged = logits(model)
    quant_error = (logits(load_llama64(llama64_dir)) - logits(load_llama64(llama64_dir, quant))).abs().max().item()
    with pytest.warns(UserWarning, match="quantizes again"):
        merged = model.merge_and_unload()
    assert type(merged.model.layers[0].self_attn.v_proj).__name__ in ("Linear4bit", "Linear8bitLt")
    assert (logits(merged) - unmerged).abs().max().item() <= 3 * quant_error
