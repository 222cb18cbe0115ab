"""PiSSA / OLoRA initialisation (against peft) and their conversion to plain LoRA for sharing."""

from __future__ import annotations


import peft
import pytest
import torch

import deltatune as dt
from conftest import main_output, text_inputs, tiny_gpt2_cls, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _logits(model, inputs):
    with torch.no_grad():
        return main_output(model(**inputs))


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("build,targets", [(tiny_llama, TARGETS), (tiny_gpt2_cls, ["c_attn", "c_fc"])],
                         ids=["llama", "gpt2-conv1d"])
def test_init_matches_peft_and_keeps_the_outputs(init, build, targets):
    inputs = text_inputs()
    want = _logits(build(), inputs)
    kwargs = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init)
    pm = peft.get_peft_model(build(), peft.LoraConfig(**kwargs))
    dm = dt.get_peft_model(build(), dt.LoraConfig(**kwargs))
    torch.testing.assert_close(_logits(dm, inputs), want, rtol=1e-4, atol=1e-4)  # residual + adapter = base
    if init == "olora" and build is tiny_gpt2_cls:
        return  # peft 0.21 factors the stored (in, out) Conv1D weight untransposed; we factor W (out, in)
    ours, theirs = dict(dm.named_parameters()), {n.replace(".default", ""): p for n, p in pm.named_parameters()}
    for name, p in ours.items():
        module, _, rest = name.partition(".adapters.default.")
        key = f"{module}.{rest}.weight" if rest else name
        torch.testing.assert_close(p, theirs[key], rtol=1e-4, atol=1e-4, msg=key)  # residual bases and factors


def test_pissa_niter_keeps_the_outputs():
    inputs = text_inputs()
    want = _logits(tiny_llama(), inputs)
    dm = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa_niter_4"))
    torch.testing.assert_close(_logits(dm, inputs), want, rtol=1e-4, atol=1e-4)


def test_failed_injection_gives_the_residual_back():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Embedding(4, 8))
    before = model[0].weight.detach().clone()
    with pytest.raises(TypeError, match="cannot adapt module '1'"):
        dt.get_peft_model(model, dt.LoraConfig(r=2, target_modules=["0", "1"], init_lora_weights="pissa"))
    assert isinstance(model[0], torch.nn.Linear)
    torch.testing.assert_close(model[0].weight, before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("second", ["pissa", "olora"])
def test_a_second_residual_initialisation_is_refused(second):
    inputs = text_inputs()
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.1)  # trained: the adapter no longer cancels its residual
    want = _logits(model, inputs)
    bases = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with pytest.raises(ValueError, match=r"cannot adapt module 'model\.layers\.0\.self_attn\.q_proj'.*residual of adapter 'default'"):
        model.add_adapter("other", dt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=second))
    assert list(model.peft_config) == ["default"]
    assert all(torch.equal(p, bases[n]) for n, p in model.named_parameters() if "base_layer" in n)
    torch.testing.assert_close(_logits(model, inputs), want, rtol=0, atol=0)
    model.add_adapter("plain", dt.LoraConfig(r=2, target_modules=["q_proj"]))  # other inits are fine


@pytest.mark.parametrize("rslora", [False, True])
def test_conversion_to_plain_lora_loads_on_the_original_base(rslora, tmp_path):
    inputs = text_inputs()
    config = dt.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa", use_rslora=rslora,
                           rank_pattern={"down_proj": 2})
    model = dt.get_peft_model(tiny_llama(), config)
    initial = str(tmp_path / "initial")
    model.save_pretrained(initial)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # "training"
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    trained = _logits(model, inputs)
    converted = str(tmp_path / "converted")
    model.save_pretrained(converted, path_initial_model_for_weight_conversion=initial)
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), converted)  # the ORIGINAL base, not the residual
    assert loaded.peft_config["default"].r == 8 and loaded.peft_config["default"].init_lora_weights is True
    torch.testing.assert_close(_logits(loaded, inputs), trained, rtol=1e-4, atol=1e-4)
    loaded_peft = peft.PeftModel.from_pretrained(tiny_llama(), converted)
    torch.testing.assert_close(_logits(loaded_peft, inputs), trained, rtol=1e-4, atol=1e-4)
