"""``low_cpu_mem_usage``: adapters created empty on the meta device, then filled by loading (as in peft)."""

from __future__ import annotations

import os

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt
from conftest import main_output, perturb_trainable, text_inputs, tiny_llama

CONFIGS = {
    "lora": lambda m: m.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.1),
    "dora": lambda m: m.LoraConfig(r=4, target_modules=["q_proj", "up_proj"], use_dora=True),
    "pissa": lambda m: m.LoraConfig(r=4, target_modules=["q_proj", "o_proj"], init_lora_weights="pissa"),
    "ia3": lambda m: m.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "adalora": lambda m: m.AdaLoraConfig(init_r=6, target_r=4, target_modules=["q_proj", "v_proj"], total_step=10),
}


def _adapter_params(model):
    return {n: p for n, p in model.named_parameters() if ".adapters." in n}


def _saved(tmp_path, kind):
    model = dt.get_peft_model(tiny_llama(), CONFIGS[kind](dt))
    perturb_trainable(model, seed=3)
    path = str(tmp_path / kind)
    model.save_pretrained(path)
    return model.eval(), path


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("trainable", [False, True])
def test_from_pretrained_and_load_adapter_equal_the_usual_load(tmp_path, kind, trainable):
    saved, path = _saved(tmp_path, kind)
    inputs = text_inputs()
    expected = main_output(saved(**inputs))
    usual = dt.PeftModel.from_pretrained(tiny_llama(), path, is_trainable=trainable)
    lean = dt.PeftModel.from_pretrained(tiny_llama(), path, is_trainable=trainable, low_cpu_mem_usage=True)
    params, usual_params = _adapter_params(lean), _adapter_params(usual)
    assert params.keys() == usual_params.keys() and params
    for name, p in params.items():  # on the base's device, same dtype and trainability, same values
        ref = usual_params[name]
        assert (p.device, p.dtype, p.requires_grad) == (ref.device, ref.dtype, trainable), name
        assert torch.equal(p, ref), name
    torch.testing.assert_close(main_output(lean.eval()(**inputs)), expected, rtol=0, atol=1e-6)
    if kind == "pissa":  # a second PiSSA adapter would take its residual from the base a second time
        return
    # load_adapter as well; the adapter then runs like the one loaded as usual
    lean.load_adapter(path, "second", low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in lean.parameters())
    lean.set_adapter("second")
    torch.testing.assert_close(main_output(lean(**inputs)), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("use_dora", [False, True])
def test_get_peft_model_creates_meta_adapters_that_load_as_in_peft(use_dora):
    config = dict(r=4, target_modules=["q_proj", "v_proj", "gate_proj"], use_dora=use_dora)
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config))
    perturb_trainable(pm, seed=5)
    state = peft.get_peft_model_state_dict(pm)
    dm = dt.get_peft_model(tiny_llama(), dt.LoraConfig(**config), low_cpu_mem_usage=True)
    params = _adapter_params(dm)
    assert params and all(p.is_meta for p in params.values())
    assert all(p.requires_grad for p in params.values())
    result = dt.set_peft_model_state_dict(dm, state, low_cpu_mem_usage=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    params = _adapter_params(dm)
    assert all(p.device.type == "cpu" and p.requires_grad for p in params.values())
    assert {n for n, p in dm.named_parameters() if p.requires_grad} == set(params)
    inputs = text_inputs()
    torch.testing.assert_close(main_output(dm(**inputs)), main_output(pm.eval()(**inputs)), rtol=1e-5, atol=1e-5)
    # and it trains: every adapter tensor gets a gradient
    dm.train()
    main_output(dm(**inputs)).sum().backward()
    assert all(p.grad is not None for p in params.values())


def test_inject_adapter_in_model_then_a_plain_load_assigns_meta_tensors():
    model = dt.inject_adapter_in_model(dt.LoraConfig(r=2, target_modules=["q_proj"]), tiny_llama(),
                                       low_cpu_mem_usage=True)
    state = {k: torch.randn(v.shape) for k, v in dt.get_peft_model_state_dict(model).items()}
    dt.set_peft_model_state_dict(model, state)  # without the flag: still assigned (a copy into meta does nothing)
    assert not any(p.is_meta for p in model.parameters())
    loaded = dt.get_peft_model_state_dict(model)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_a_checkpoint_lacking_tensors_is_refused_and_changes_nothing(tmp_path):
    _, path = _saved(tmp_path, "lora")
    file = os.path.join(path, "adapter_model.safetensors")
    tensors = load_file(file)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del tensors[key]
    save_file(tensors, file)
    base = tiny_llama()
    names = [n for n, _ in base.named_modules()]
    with pytest.raises(dt.CheckpointError, match=r"layers\.1\.self_attn\.v_proj\.lora_B"):
        dt.PeftModel.from_pretrained(base, path, low_cpu_mem_usage=True)
    assert [n for n, _ in base.named_modules()] == names  # the injected layers were removed again
    model = dt.get_peft_model(tiny_llama(), CONFIGS["lora"](dt), low_cpu_mem_usage=True)
    with pytest.raises(dt.CheckpointError, match="low_cpu_mem_usage"):
        dt.set_peft_model_state_dict(model, {k.replace("base_model.model.", "base_model.model.", 1): v
                                             for k, v in tensors.items()})
    assert all(p.is_meta for p in _adapter_params(model).values())  # all or nothing
    with pytest.raises(dt.CheckpointError, match="never loaded"):
        model.save_pretrained(str(tmp_path / "empty"))
    assert not os.path.exists(tmp_path / "empty" / "adapter_model.safetensors")


def test_ignore_mismatched_sizes_skips_with_a_warning():
    config = dt.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    model = dt.get_peft_model(tiny_llama(), config)
    state = dt.get_peft_model_state_dict(model)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    bad = {k: (torch.zeros(2, 32) if k == key else v + 1) for k, v in state.items()}
    before = state[key].clone()
    with pytest.raises(dt.CheckpointError, match="shape"):
        dt.set_peft_model_state_dict(model, bad)
    with pytest.warns(UserWarning, match=r"q_proj\.lora_A\.weight: \(2, 32\) vs \(4, 32\)"):
        result = dt.set_peft_model_state_dict(model, bad, ignore_mismatched_sizes=True)
    after = dt.get_peft_model_state_dict(model)
    assert torch.equal(after[key], before)
    assert all(torch.equal(after[k], bad[k]) for k in bad if k != key)
    assert result.missing_keys == [key]


def test_get_peft_model_arguments_as_in_peft():
    config = dt.LoraConfig(r=2, target_modules=["q_proj"])
    with pytest.raises(NotImplementedError, match="mixed"):
        dt.get_peft_model(tiny_llama(), config, mixed=True)
    model = dt.get_peft_model(tiny_llama(), config, revision="v2")
    assert model.peft_config["default"].revision == "v2" and config.revision is None
