"""The attributes code written for peft reads on adapter layers, side by side with peft's layers."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import conv_inputs, main_output, random_lora, text_inputs, tiny_convnet, tiny_gpt2_lm, tiny_llama


def _layers(model, name):
    """peft's or deltatune's adapter layer at module path ``name`` of the base model."""
    return model.base_model.model.get_submodule(name)


@pytest.fixture
def pair(tmp_path):
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          lora_dropout=0.1, init_lora_weights=False, use_dora=True))
    pm.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"], use_rslora=True))
    random_lora(pm, seed=3)
    pm.save_pretrained(tmp_path)
    dm = dt.PeftModel.from_pretrained(tiny_llama(), str(tmp_path), is_trainable=True)
    dm.load_adapter(str(tmp_path / "other"), "other", is_trainable=True)
    return pm, dm


def test_per_adapter_mappings_read_as_in_peft(pair):
    pm, dm = pair
    name = "model.layers.0.self_attn.q_proj"
    p, d = _layers(pm, name), _layers(dm, name)
    assert dict(d.r) == dict(p.r) == {"default": 4, "other": 2}
    assert dict(d.scaling) == pytest.approx(dict(p.scaling))
    assert set(d.lora_magnitude_vector) == set(p.lora_magnitude_vector) == {"default"}
    for adapter in ("default", "other"):
        torch.testing.assert_close(d.lora_A[adapter].weight, p.lora_A[adapter].weight, rtol=0, atol=0)
        torch.testing.assert_close(d.lora_B[adapter].weight, p.lora_B[adapter].weight, rtol=0, atol=0)
        assert d.lora_dropout[adapter].__class__ is p.lora_dropout[adapter].__class__
    assert d.lora_dropout["default"].p == p.lora_dropout["default"].p == 0.1
    torch.testing.assert_close(d.lora_magnitude_vector["default"].weight, p.lora_magnitude_vector["default"].weight)
    assert (d.in_features, d.out_features) == (p.in_features, p.out_features)
    assert d.active_adapters == p.active_adapters == ["default"]


def test_state_flags_and_switches_as_in_peft(pair):
    pm, dm = pair
    inputs = text_inputs()
    name = "model.layers.0.self_attn.q_proj"
    for model in (pm, dm):
        model.merge_adapter()
    assert _layers(dm, name).merged is _layers(pm, name).merged is True
    assert _layers(dm, name).merged_adapters == _layers(pm, name).merged_adapters == ["default"]
    for model in (pm, dm):
        model.unmerge_adapter()
        for layer in (m for m in model.modules() if hasattr(m, "enable_adapters") and hasattr(m, "lora_A")):
            layer.enable_adapters(False)
    assert _layers(dm, name).disable_adapters is _layers(pm, name).disable_adapters is True
    pm.eval(), dm.eval()
    with torch.no_grad():
        base = main_output(tiny_llama()(**inputs))
        torch.testing.assert_close(main_output(dm(**inputs)), base, rtol=1e-6, atol=1e-6)
    for model in (pm, dm):
        for layer in (m for m in model.modules() if hasattr(m, "set_adapter") and hasattr(m, "lora_A")):
            layer.enable_adapters(True)
            layer.set_adapter("other")
    p, d = _layers(pm, name), _layers(dm, name)
    assert d.active_adapters == p.active_adapters == ["other"]
    trainable = lambda layer: {k: v.requires_grad for k, v in layer.named_parameters() if "lora" in k}
    # (names: deltatune "adapters.<name>.lora_A", peft "lora_A.<name>.weight": the adapter name is second)
    assert {k.split(".")[1]: v for k, v in trainable(d).items()} == {k.split(".")[1]: v for k, v in trainable(p).items()}
    with torch.no_grad():
        torch.testing.assert_close(main_output(dm(**inputs)), main_output(pm(**inputs)), rtol=1e-5, atol=1e-5)


def test_edits_through_the_views_reach_the_adapter_and_its_caches():
    """peft-style initialisation and rescaling through the mappings change what the layer computes, also on
    the cached no-grad route."""
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False)).eval()
    inputs = text_inputs()
    with torch.no_grad():
        base = main_output(tiny_llama()(**inputs))
        assert (main_output(model(**inputs)) - base).abs().max() > 1e-3  # the caches are built here
    layers = [m for m in model.modules() if isinstance(m, dt.methods.lora.LoraLayer)]
    for layer in layers:
        layer.scaling["default"] = 0.0
    with torch.no_grad():
        torch.testing.assert_close(main_output(model(**inputs)), base, rtol=1e-6, atol=1e-6)
    for layer in layers:
        layer.scaling["default"] = 2.0
        nn.init.zeros_(layer.lora_B["default"].weight)
    with torch.no_grad():
        torch.testing.assert_close(main_output(model(**inputs)), base, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        layers[0].lora_A["default"].weight = nn.Parameter(torch.zeros(1, 1))


@pytest.mark.parametrize("build, inputs, targets", [
    (tiny_gpt2_lm, text_inputs, ["c_attn", "wte"]),
    (tiny_convnet, conv_inputs, ["conv", "conv2"]),
])
def test_in_and_out_features_of_every_layer_type(build, inputs, targets):
    pm = peft.get_peft_model(build(), peft.LoraConfig(r=2, target_modules=targets))
    dm = dt.get_peft_model(build(), dt.LoraConfig(r=2, target_modules=targets))
    for name, layer in dm.base_model.model.named_modules():
        if isinstance(layer, dt.methods.lora.LoraLayer):
            theirs = pm.base_model.model.get_submodule(name)
            assert (layer.in_features, layer.out_features) == (theirs.in_features, theirs.out_features), name
    ia3_p = peft.get_peft_model(build(), peft.IA3Config(target_modules=targets[:1], feedforward_modules=[]))
    ia3_d = dt.get_peft_model(build(), dt.IA3Config(target_modules=targets[:1], feedforward_modules=[]))
    layer = next(m for m in ia3_d.modules() if hasattr(m, "ia3_l") or m.__class__.__name__ == "IA3Layer")
    name = next(n for n, m in ia3_d.base_model.model.named_modules() if m is layer)
    theirs = ia3_p.base_model.model.get_submodule(name)
    assert (layer.in_features, layer.out_features) == (theirs.in_features, theirs.out_features)
