"""Targeting rules: list suffixes, full-match regexes, all-linear, layer selection, error messages."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from conftest import tiny_gpt2_lm, tiny_llama, tiny_llava
from deltatune.targeting import glob_to_regex, layer_index, matches, pattern_value



def _lora_names(peft_model):
    from deltatune.methods.lora import LoraLayer

    prefix = "base_model.model."
    return sorted(n[len(prefix):] for n, m in peft_model.named_modules() if isinstance(m, LoraLayer))


def test_list_entries_match_whole_name_or_dot_suffix():
    assert matches("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert matches("q_proj", ["q_proj"])
    assert matches("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"])
    assert not matches("model.layers.0.self_attn.xq_proj", ["q_proj"])
    assert not matches("model.layers.0.self_attn.q_proj.inner", ["q_proj"])


def test_string_is_a_full_match_regex():
    assert matches("model.layers.0.self_attn.q_proj", r".*\.q_proj")
    assert not matches("model.layers.0.self_attn.q_proj", "q_proj")  # not a search: the whole name
    assert matches("a.b", r"a\.(b|c)")


def test_layer_index_and_patterns():
    assert layer_index("model.layers.3.mlp.up_proj") == 3
    assert layer_index("transformer.h.11.attn.c_attn") == 11
    assert layer_index("encoder.block.1.layer.0.SelfAttention.q", "block") == 1
    assert layer_index("lm_head") is None
    assert pattern_value({"q_proj": 2}, "model.layers.0.self_attn.q_proj", 8) == 2
    assert pattern_value({"layers.1.self_attn.q_proj": 2}, "model.layers.0.self_attn.q_proj", 8) == 8
    assert pattern_value({"^model.*q_proj": 3}, "model.layers.0.self_attn.q_proj", 8) == 3


def test_all_linear_skips_the_output_head():
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules="all-linear"))
    names = _lora_names(model)
    assert "lm_head" not in names
    assert len(names) == 2 * 7  # q k v o gate up down in each of 2 layers
    gpt2 = dt.get_peft_model(tiny_gpt2_lm(), dt.LoraConfig(target_modules="all-linear"))
    assert len(_lora_names(gpt2)) == 2 * 4 and "lm_head" not in _lora_names(gpt2)  # Conv1D layers


def test_layers_to_transform_and_exclude():
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=1,
                                                          exclude_modules=["v_proj"]))
    assert _lora_names(model) == ["model.layers.1.self_attn.q_proj"]
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"], layers_to_transform=[0, 1],
                                                          layers_pattern="layers"))
    assert len(_lora_names(model)) == 2


def test_vlm_regex_targets_only_the_language_decoder():
    model = dt.get_peft_model(tiny_llava(), dt.LoraConfig(
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)", modules_to_save=["multi_modal_projector"]))
    names = _lora_names(model)
    assert names and all("language_model" in n for n in names)
    assert not any("vision_tower" in n for n in names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("multi_modal_projector.modules_to_save.default" in n for n in trainable)


def test_no_match_lists_close_names_and_leaves_model_unchanged():
    model = tiny_llama()
    before = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(dt.TargetError) as info:
        dt.get_peft_model(model, dt.LoraConfig(target_modules=["q_prj"]))
    assert "q_proj" in str(info.value)
    assert [(n, type(m)) for n, m in model.named_modules()] == before


def test_glob_entry_gets_a_regex_hint_that_works():
    model = tiny_llava()
    with pytest.raises(dt.TargetError) as info:
        dt.get_peft_model(model, dt.LoraConfig(target_modules=["language_model.layers.*.q_proj"]))
    message = str(info.value)
    suggested = glob_to_regex("language_model.layers.*.q_proj")
    assert "suffixes" in message and repr(suggested) in message
    fixed = dt.get_peft_model(model, dt.LoraConfig(target_modules=suggested))
    assert _lora_names(fixed) == [f"model.language_model.layers.{i}.self_attn.q_proj" for i in range(2)]


def test_unsupported_module_type_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    with pytest.raises(TypeError, match=r"cannot adapt module '1'.*LayerNorm"):
        dt.get_peft_model(model, dt.LoraConfig(target_modules=["0", "1"]))
    assert isinstance(model[0], torch.nn.Linear)  # nothing was wrapped
