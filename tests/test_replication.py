"""Layer replication: shared base weights, own adapters per position, peft-compatible checkpoints."""

from __future__ import annotations


import peft
import pytest
import torch

import deltatune as dt
from conftest import perturb_trainable, VOCAB, main_output, text_inputs


def llama4():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)).eval()


MAP = [[0, 3], [1, 4]]  # -> layers 0 1 2 1 2 3
KW = dict(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], layer_replication=MAP)



def test_structure_shares_base_weights():
    base = llama4()
    n_base = sum(p.numel() for p in base.parameters())
    model = dt.get_peft_model(base, dt.LoraConfig(**KW))
    layers = model.base_model.model.model.layers
    assert len(layers) == 6 and base.config.num_hidden_layers == 6
    assert [l.self_attn.layer_idx for l in layers] == list(range(6))
    assert layers[1].self_attn.q_proj.base_layer.weight is layers[3].self_attn.q_proj.base_layer.weight
    assert layers[1].self_attn.q_proj.adapters["default"].lora_A is not layers[3].self_attn.q_proj.adapters["default"].lora_A
    n_total = sum(p.numel() for p in model.parameters())
    n_adapters = 6 * 2 * (4 * 32 + 4 * 32)
    n_adapters -= 6 * (4 * 32 + 4 * 32) - 6 * (4 * 32 + 16 * 4)  # v_proj is 32 -> 16
    assert n_total == n_base + n_adapters


@pytest.mark.parametrize("direction", ["peft->deltatune", "deltatune->peft"])
def test_checkpoints_round_trip_with_peft(direction, tmp_path):
    inputs = text_inputs()
    lib_from, lib_to = (peft, dt) if direction == "peft->deltatune" else (dt, peft)
    source = lib_from.get_peft_model(llama4(), lib_from.LoraConfig(**KW))
    perturb_trainable(source, 1, 0.3)
    source.save_pretrained(str(tmp_path))
    with torch.no_grad():
        want = main_output(source(**inputs))
    target = lib_to.PeftModel.from_pretrained(llama4(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(main_output(target(**inputs)), want, rtol=0, atol=1e-5)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(target.generate(**text_inputs(batch=1, seq=4), **kwargs),
                       source.generate(**text_inputs(batch=1, seq=4), **kwargs))


def test_bad_map_changes_nothing():
    base = llama4()
    with pytest.raises(ValueError, match=r"\[2, 9\]"):
        dt.get_peft_model(base, dt.LoraConfig(r=2, target_modules=["q_proj"], layer_replication=[[0, 2], [2, 9]]))
    assert len(base.model.layers) == 4 and base.config.num_hidden_layers == 4
    with pytest.raises(dt.TargetError):
        dt.get_peft_model(base, dt.LoraConfig(r=2, target_modules=["nope"], layer_replication=MAP))
    assert len(base.model.layers) == 4 and base.config.num_hidden_layers == 4
    assert [l.self_attn.layer_idx for l in base.model.layers] == [0, 1, 2, 3]


@pytest.mark.parametrize("dora", [False, True])
def test_merging_gives_each_position_its_own_weight(dora):
    """Positions share base weights: merging in place would add every position's delta to all of them."""
    inputs = text_inputs()
    model = dt.get_peft_model(llama4(), dt.LoraConfig(**KW, use_dora=dora))
    perturb_trainable(model, 1, 0.3)
    with torch.no_grad():
        want = main_output(model(**inputs))
        model.merge_adapter()
        torch.testing.assert_close(main_output(model(**inputs)), want, rtol=0, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(main_output(model(**inputs)), want, rtol=0, atol=1e-5)
        merged = model.merge_and_unload()
        torch.testing.assert_close(main_output(merged(**inputs)), want, rtol=0, atol=1e-5)
    layers = merged.model.layers
    assert layers[1].self_attn.q_proj.weight is not layers[3].self_attn.q_proj.weight
    assert layers[1].mlp.up_proj.weight is layers[3].mlp.up_proj.weight  # weights nothing merges into stay shared


def test_merging_into_a_tied_output_embedding_leaves_the_input_embedding_alone():
    from conftest import tiny_gpt2_lm

    inputs = text_inputs()
    model = dt.get_peft_model(tiny_gpt2_lm(), dt.LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
    base = model.base_model.model
    assert base.lm_head.base_layer.weight is base.transformer.wte.weight  # tied
    embedding = base.transformer.wte.weight.detach().clone()
    with torch.no_grad():
        want = main_output(model(**inputs))
        merged = model.merge_and_unload()
        torch.testing.assert_close(main_output(merged(**inputs)), want, rtol=0, atol=1e-5)
    assert torch.equal(merged.transformer.wte.weight, embedding)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_residual_inits_are_refused_when_positions_share_weights(init):
    """PiSSA/OLoRA write W - s B A into the base weight: a shared weight would be initialised twice."""
    with pytest.raises(ValueError, match=r"layers \[1, 2\]"):
        dt.LoraConfig(**KW, init_lora_weights=init)
    inputs = text_inputs()
    with torch.no_grad():
        want = main_output(llama4()(**inputs))
    config = dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layer_replication=[[0, 2], [2, 4]],
                           init_lora_weights=init)  # nothing repeated, nothing shared: allowed
    model = dt.get_peft_model(llama4(), config)
    with torch.no_grad():
        torch.testing.assert_close(main_output(model(**inputs)), want, rtol=0, atol=1e-4)


def test_adapters_share_one_replication_and_nothing_is_stashed(tmp_path):
    """A second adapter with the same map finds the stack built (it shows in the shared weights); a
    different map is refused; the user's model gets no attribute of deltatune's."""
    base = llama4()
    attrs = set(vars(base))
    model = dt.get_peft_model(base, dt.LoraConfig(**KW))
    layers = base.model.layers
    model.add_adapter("second", dt.LoraConfig(**KW, init_lora_weights=False))
    assert base.model.layers is layers and len(layers) == 6 and base.config.num_hidden_layers == 6
    assert [l.self_attn.layer_idx for l in layers] == list(range(6))
    assert all(set(l.self_attn.q_proj.adapters) == {"default", "second"} for l in layers)
    assert set(vars(base)) == attrs
    with pytest.raises(ValueError, match="another layer_replication map"):
        model.add_adapter("third", dt.LoraConfig(**{**KW, "layer_replication": [[0, 4], [2, 4]]}))
    assert base.model.layers is layers and list(model.peft_config) == ["default", "second"]

    inputs = text_inputs()
    model.set_adapter("second")
    with torch.no_grad():
        want = main_output(model(**inputs))
    model.save_pretrained(str(tmp_path))
    loaded = dt.PeftModel.from_pretrained(llama4(), str(tmp_path))
    loaded.load_adapter(str(tmp_path / "second"), "second")
    loaded.set_adapter("second")
    assert len(loaded.base_model.model.model.layers) == 6
    with torch.no_grad():
        torch.testing.assert_close(main_output(loaded(**inputs)), want, rtol=0, atol=1e-5)

    unloaded = model.unload()  # the stack stays replicated (as in peft); the same map again keeps it
    again = dt.inject_adapter_in_model(dt.LoraConfig(**KW), unloaded)
    assert again.model.layers is layers and len(layers) == 6 and set(vars(base)) == attrs
