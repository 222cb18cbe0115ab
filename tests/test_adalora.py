"""AdaLoRA against peft: the same training trajectory, rank allocation, saved pruned adapters, errors."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import deltatune as dt
from conftest import main_output, text_inputs, tiny_llama

KW = dict(task_type="CAUSAL_LM", init_r=6, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=8,
          target_modules=["q_proj", "v_proj"], lora_alpha=8)
N_LAYERS = 4  # q_proj and v_proj in 2 decoder layers


def _strip(pattern: dict) -> dict:  # peft keeps the adapter name in its in-memory rank_pattern keys
    return {k.removesuffix(".default"): v for k, v in pattern.items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """peft and deltatune trained side by side from the same initial adapter."""
    pm = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**KW))
    dm = dt.get_peft_model(tiny_llama(), dt.AdaLoraConfig(**KW))
    dt.set_peft_model_state_dict(dm, peft.get_peft_model_state_dict(pm))
    inputs = text_inputs()
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (pm, dm)]
    pm.train(), dm.train()
    losses = {"peft": [], "deltatune": []}
    for step in range(KW["total_step"]):
        for key, model, opt, allocate in (("peft", pm, optimizers[0], pm.base_model.update_and_allocate),
                                          ("deltatune", dm, optimizers[1], dm.update_and_allocate)):
            loss = model(**inputs, labels=inputs["input_ids"]).loss
            loss.backward()
            opt.step()
            allocate(step)
            opt.zero_grad()
            losses[key].append(loss.item())
    folder = tmp_path_factory.mktemp("adalora")
    pm.save_pretrained(str(folder / "peft"))
    dm.save_pretrained(str(folder / "dt"))
    return pm.eval(), dm.eval(), losses, folder


def test_training_follows_peft_step_for_step(trained):
    pm, dm, losses, _ = trained
    assert losses["deltatune"] == pytest.approx(losses["peft"], abs=1e-5)
    assert dm.peft_config["default"].rank_pattern == _strip(pm.peft_config["default"].rank_pattern)
    inputs = text_inputs()
    with torch.no_grad():
        torch.testing.assert_close(dm(**inputs).logits, pm(**inputs).logits, rtol=0, atol=1e-5)


def test_final_budget_is_the_target(trained):
    _, dm, _, _ = trained
    pattern = dm.peft_config["default"].rank_pattern
    assert len(pattern) == N_LAYERS and sum(sum(mask) for mask in pattern.values()) == KW["target_r"] * N_LAYERS
    for name, mask in pattern.items():  # the pruned singular values are exactly zero
        layer = dm.base_model.model.get_submodule(name.removesuffix(".lora_E"))
        E = layer.adapters["default"].lora_E.view(-1)
        assert torch.all(E[~torch.tensor(mask)] == 0)


def test_saved_files_match_and_reload_with_pruned_ranks(trained):
    pm, dm, _, folder = trained
    a, b = (load_file(str(folder / d / "adapter_model.safetensors")) for d in ("peft", "dt"))
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    assert json.load(open(folder / "dt" / "adapter_config.json"))["rank_pattern"] == \
        json.load(open(folder / "peft" / "adapter_config.json"))["rank_pattern"]
    inputs = text_inputs()
    with torch.no_grad():
        want = dm(**inputs).logits
        for target in (dt.PeftModel.from_pretrained(tiny_llama(), str(folder / "peft")),
                       peft.PeftModel.from_pretrained(tiny_llama(), str(folder / "dt"))):
            torch.testing.assert_close(target(**inputs).logits, want, rtol=0, atol=1e-5)
    reloaded = dt.PeftModel.from_pretrained(tiny_llama(), str(folder / "dt"))
    for name, mask in dm.peft_config["default"].rank_pattern.items():
        layer = reloaded.base_model.model.get_submodule(name.removesuffix(".lora_E"))
        assert layer.adapters["default"].lora_A.shape[0] == sum(mask)


def test_orthogonal_regulariser_is_in_the_training_loss():
    model = dt.get_peft_model(tiny_llama(), dt.AdaLoraConfig(**KW))
    inputs = text_inputs()
    model.train()
    out = model(**inputs, labels=inputs["input_ids"])
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    ce = F.cross_entropy(logits, inputs["input_ids"][:, 1:].reshape(-1))
    from deltatune.methods.adalora import orthogonality_penalty

    penalty = orthogonality_penalty(model.base_model.model, "default")
    assert penalty > 0.1
    torch.testing.assert_close(out.loss, ce + 0.5 * penalty, rtol=1e-5, atol=1e-5)  # orth_reg_weight 0.5
    model.eval()
    torch.testing.assert_close(model(**inputs, labels=inputs["input_ids"]).loss, ce, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("changes,field", [
    (dict(total_step=None), "total_step"), (dict(tinit=5, tfinal=3), "tinit"),
    (dict(target_r=8, init_r=4), "target_r"), (dict(use_dora=True), "use_dora"),
])
def test_bad_configs(changes, field):
    with pytest.raises(dt.ConfigError, match=field):
        dt.AdaLoraConfig(**{**KW, **changes})


def test_a_peft_adapter_saved_before_any_allocation_loads(tmp_path):
    """A checkpoint written during warm-up (peft writes ``rank_pattern: null``) loads with init_r triplets
    and gives peft's outputs."""
    config = dict(init_r=6, target_r=2, tinit=1, tfinal=1, deltaT=1, total_step=4, target_modules=["q_proj", "v_proj"],
                  init_lora_weights=False)
    pm = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**config)).eval()
    pm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"] is None
    dm = dt.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    inputs = text_inputs()
    with torch.no_grad():
        torch.testing.assert_close(main_output(dm(**inputs)), main_output(pm(**inputs)), rtol=1e-5, atol=1e-5)
