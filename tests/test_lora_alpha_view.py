"""``layer.lora_alpha[name]`` on LoRA layers: read as peft reads it, written as peft code writes it.

peft keeps alpha in a plain dict and recomputes the scaling from it in ``set_scale`` / ``unscale_layer``;
deltatune's write takes effect at once (see :mod:`deltatune.methods.lora.views`), so each write here is
compared with peft's write followed by that recomputation.
"""

from __future__ import annotations

import peft
import pytest
import torch

import deltatune as dt
from conftest import main_output, random_lora, text_inputs, tiny_llama

NAME = "model.layers.0.self_attn.q_proj"


def _layer(model):
    return model.base_model.model.get_submodule(NAME)


def _pair(**config):
    """peft's and deltatune's LoRA on the same tiny Llama, with the same adapter values."""
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj", "v_proj"], **config))
    random_lora(pm, seed=5)
    dm = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj", "v_proj"], **config))
    with torch.no_grad():
        for name, module in pm.base_model.model.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                ours = dm.base_model.model.get_submodule(name)
                ours.lora_A["default"].weight.copy_(module.lora_A["default"].weight)
                ours.lora_B["default"].weight.copy_(module.lora_B["default"].weight)
    return pm.eval(), dm.eval()


def _outputs_match(pm, dm):
    inputs = text_inputs()
    with torch.no_grad():
        torch.testing.assert_close(main_output(dm(**inputs)), main_output(pm(**inputs)), rtol=1e-5, atol=1e-5)


def test_lora_alpha_reads_as_in_peft_with_patterns():
    pm, dm = _pair(r=4, lora_alpha=12, alpha_pattern={"v_proj": 3}, rank_pattern={"v_proj": 2})
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        theirs, ours = pm.base_model.model.get_submodule(name), dm.base_model.model.get_submodule(name)
        assert dict(ours.lora_alpha) == pytest.approx(dict(theirs.lora_alpha)), name
    assert dict(_layer(dm).lora_alpha) == {"default": 12}


def test_writing_lora_alpha_rescales_as_peft_does():
    """peft: write alpha, then ``set_scale(name, 1)`` recomputes ``s = alpha / r``; deltatune: the write alone."""
    pm, dm = _pair(r=4, lora_alpha=8)
    _outputs_match(pm, dm)
    for model in (pm, dm):
        for module in model.modules():
            if hasattr(module, "lora_alpha") and hasattr(module, "lora_A") and "default" in module.lora_A:
                module.lora_alpha["default"] = 20
                if isinstance(module, peft.tuners.lora.LoraLayer):
                    module.set_scale("default", 1.0)
    assert _layer(dm).lora_alpha["default"] == _layer(pm).lora_alpha["default"] == 20
    assert _layer(dm).scaling["default"] == pytest.approx(_layer(pm).scaling["default"]) == 5.0
    _outputs_match(pm, dm)
    # and a scaling written directly is what alpha reads back (deltatune keeps one number, not two)
    _layer(dm).scaling["default"] = 0.5
    assert _layer(dm).lora_alpha["default"] == 2.0


def test_bad_alpha_is_refused_and_changes_nothing():
    _, dm = _pair(r=4, lora_alpha=8)
    for bad in (True, "16", float("nan"), None):
        with pytest.raises(TypeError, match="lora_alpha"):
            _layer(dm).lora_alpha["default"] = bad
    assert _layer(dm).scaling["default"] == 2.0
    with pytest.raises(KeyError):
        _layer(dm).lora_alpha["missing"] = 4
    with pytest.raises(TypeError, match="delete_adapter"):
        del _layer(dm).lora_alpha["default"]


def test_rslora_adapter_divides_by_sqrt_r():
    """An adapter marked rsLoRA (``use_rslora`` on the adapter) reads and writes alpha with ``sqrt(r)``."""
    _, dm = _pair(r=4, lora_alpha=8)
    layer = _layer(dm)
    layer.adapters["default"].use_rslora = True
    layer.scaling["default"] = 4.0
    assert layer.lora_alpha["default"] == 8.0  # 4 * sqrt(4)
    layer.lora_alpha["default"] = 6
    assert layer.scaling["default"] == 3.0  # 6 / sqrt(4)


def test_rslora_from_the_config_as_in_peft():
    pm, dm = _pair(r=4, lora_alpha=8, use_rslora=True)
    assert _layer(dm).lora_alpha["default"] == pytest.approx(_layer(pm).lora_alpha["default"]) == 8
    for model in (pm, dm):
        _layer(model).lora_alpha["default"] = 20
    _layer(pm).set_scale("default", 1.0)
    assert _layer(dm).scaling["default"] == pytest.approx(_layer(pm).scaling["default"]) == 10.0
