"""(IA)^3 against peft: checkpoints both ways, merges, several adapters, training, bad configs."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from conftest import perturb_trainable, conv_inputs, main_output, text_inputs, tiny_convnet, tiny_gpt2_cls, tiny_llama

CASES = [
    ("llama", tiny_llama, text_inputs,
     dict(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    ("gpt2-conv1d", tiny_gpt2_cls, text_inputs,
     dict(task_type="SEQ_CLS", target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"])),
    ("conv", tiny_convnet, conv_inputs,
     dict(target_modules=["conv", "conv2", "head"], feedforward_modules=["conv2"], modules_to_save=["row"])),
]



def _out(model, inputs):
    with torch.no_grad():
        return main_output(model(**inputs))


@pytest.mark.parametrize("direction", ["peft->deltatune", "deltatune->peft"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_checkpoints_load_in_the_other_library(case, direction, tmp_path):
    _, build, make_inputs, kwargs = case
    src_lib, dst_lib = (peft, dt) if direction == "peft->deltatune" else (dt, peft)
    inputs = make_inputs()
    source = src_lib.get_peft_model(build(), src_lib.IA3Config(**kwargs))
    perturb_trainable(source, 0, 0.2)
    want = _out(source, inputs)
    assert (want - _out(build(), inputs)).abs().max() > 1e-3
    source.save_pretrained(str(tmp_path / "a"))
    target = dst_lib.PeftModel.from_pretrained(build(), str(tmp_path / "a"))
    torch.testing.assert_close(_out(target, inputs), want, rtol=0, atol=1e-5)
    target.save_pretrained(str(tmp_path / "b"))
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in "ab")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ja, jb = (json.load(open(tmp_path / d / "adapter_config.json")) for d in "ab")
    assert set(ja) ^ set(jb) <= {"peft_version"}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_merge_matches_peft_and_unmerge_restores(case):
    _, build, make_inputs, kwargs = case
    inputs = make_inputs()
    pm = peft.get_peft_model(build(), peft.IA3Config(**kwargs))
    perturb_trainable(pm, 1, 0.2)
    dm = dt.get_peft_model(build(), dt.IA3Config(**kwargs))
    dt.set_peft_model_state_dict(dm, peft.get_peft_model_state_dict(pm))
    unmerged = _out(dm, inputs)
    before = {k: v.clone() for k, v in dm.state_dict().items()}
    dm.merge_adapter()
    torch.testing.assert_close(_out(dm, inputs), unmerged, rtol=1e-5, atol=1e-5)
    dm.unmerge_adapter()
    for k, v in dm.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=1e-5, atol=1e-6, msg=k)
    merged_p = copy.deepcopy(pm).merge_and_unload().state_dict()
    merged_d = copy.deepcopy(dm).merge_and_unload().state_dict()
    for k in merged_p:
        torch.testing.assert_close(merged_d[k], merged_p[k], rtol=0, atol=1e-5, msg=k)


def test_several_active_adapters_multiply():
    inputs = text_inputs()
    kwargs = CASES[0][3]
    model = dt.get_peft_model(tiny_llama(), dt.IA3Config(**kwargs))
    model.add_adapter("b", dt.IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    model.set_adapter(["default", "b"])
    perturb_trainable(model, 2, 0.2)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 64)
    l = layer.adapters["default"].ia3_l.reshape(-1) * layer.adapters["b"].ia3_l.reshape(-1)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x * l))
    layer_v = model.base_model.model.model.layers[0].self_attn.v_proj
    lv = layer_v.adapters["default"].ia3_l.reshape(-1) * layer_v.adapters["b"].ia3_l.reshape(-1)
    with torch.no_grad():
        torch.testing.assert_close(layer_v(x[:, :32]), layer_v.base_layer(x[:, :32]) * lv)
    pm = peft.get_peft_model(tiny_llama(), peft.IA3Config(**kwargs))
    pm.add_adapter("b", peft.IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    for name in ("default", "b"):
        peft.set_peft_model_state_dict(pm, dt.get_peft_model_state_dict(model, adapter_name=name), adapter_name=name)
    pm.base_model.set_adapter(["default", "b"])
    torch.testing.assert_close(_out(model, inputs), _out(pm, inputs), rtol=0, atol=1e-5)


def test_training_touches_only_the_vectors():
    model = dt.get_peft_model(tiny_llama(), dt.IA3Config(**CASES[0][3]))
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"ia3_l"}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    inputs = text_inputs()
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        assert all("ia3_l" in n for n, p in model.named_parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_identity_at_init_and_bad_configs():
    inputs = text_inputs()
    base_out = _out(tiny_llama(), inputs)
    assert torch.equal(_out(dt.get_peft_model(tiny_llama(), dt.IA3Config(**CASES[0][3])), inputs), base_out)
    with pytest.raises(dt.ConfigError, match="subset of target_modules"):
        dt.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(TypeError, match="cannot adapt module '0'.*IA"):
        dt.get_peft_model(nn.Sequential(nn.Embedding(4, 4)), dt.IA3Config(target_modules=["0"]))
