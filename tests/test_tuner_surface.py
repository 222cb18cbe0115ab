"""``model.base_model`` as peft's tuner model: the calls code written for peft makes there act on the
PeftModel, side by side with peft where both have them."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch

import deltatune as dt
from deltatune.methods.lora import LoraLayer
from conftest import main_output, random_lora, text_inputs, tiny_llama

KW = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def _pair(**extra):
    """The same two LoRA adapters in peft and in deltatune (deltatune loads peft's files)."""
    torch.manual_seed(0)
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**KW, **extra))
    pm.add_adapter("other", peft.LoraConfig(**{**KW, "r": 2}))
    random_lora(pm, seed=1)
    return pm


def _outputs(model, inputs):
    with torch.no_grad():
        return main_output(model(**inputs))


def test_tuner_calls_match_peft(tmp_path):
    pm = _pair()
    pm.save_pretrained(tmp_path)
    dm = dt.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    dm.load_adapter(str(tmp_path / "other"), "other")
    inputs = text_inputs()
    assert dm.base_model.peft_config is dm.peft_config
    assert dm.base_model.prefix == pm.base_model.prefix == dm.prefix == "lora_"
    for model in (pm, dm):
        model.base_model.set_adapter("other")
    assert dm.base_model.active_adapters == pm.base_model.active_adapters == ["other"]
    torch.testing.assert_close(_outputs(dm, inputs), _outputs(pm, inputs), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        base = main_output(tiny_llama()(**inputs))
    for model in (pm, dm):
        model.base_model.disable_adapter_layers()
    torch.testing.assert_close(_outputs(dm, inputs), base, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_outputs(pm, inputs), base, rtol=1e-6, atol=1e-6)
    for model in (pm, dm):
        model.base_model.enable_adapter_layers()
    torch.testing.assert_close(_outputs(dm, inputs), _outputs(pm, inputs), rtol=1e-5, atol=1e-5)
    assert (_outputs(dm, inputs) - base).abs().max() > 1e-3
    for model in (pm, dm):
        model.base_model.merge_adapter()
    torch.testing.assert_close(_outputs(dm, inputs), _outputs(pm, inputs), rtol=1e-5, atol=1e-5)
    for model in (pm, dm):
        model.base_model.unmerge_adapter()
        model.base_model.delete_adapter("default")
    assert list(dm.peft_config) == ["other"]
    merged = dm.base_model.merge_and_unload()
    torch.testing.assert_close(main_output(merged(**inputs)).detach(), _outputs(pm.merge_and_unload(), inputs),
                               rtol=1e-5, atol=1e-5)


def test_unload_and_weighted_adapter_through_base_model():
    dm = dt.get_peft_model(tiny_llama(), dt.LoraConfig(**KW))
    dm.add_adapter("other", dt.LoraConfig(**KW))
    random_lora(dm, seed=2)
    inputs = text_inputs()
    twin = copy.deepcopy(dm)
    dm.base_model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "both", combination_type="cat")
    twin.add_weighted_adapter(["default", "other"], [0.5, 0.5], "both", combination_type="cat")
    for model in (dm, twin):
        model.set_adapter("both")
    torch.testing.assert_close(_outputs(dm, inputs), _outputs(twin, inputs), rtol=0, atol=0)
    assert twin.base_model._peft_model() is twin  # a copy's host belongs to the copy
    with torch.no_grad():
        base = main_output(tiny_llama()(**inputs))
    plain = dm.base_model.unload()
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    torch.testing.assert_close(main_output(plain(**inputs)).detach(), base, rtol=1e-6, atol=1e-6)


def test_adalora_update_and_allocate_through_base_model():
    """peft's documented AdaLoRA loop calls model.base_model.update_and_allocate(step)."""
    config = dict(init_r=6, target_r=2, tinit=1, tfinal=1, deltaT=1, total_step=4, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(0)
    a = dt.get_peft_model(tiny_llama(), dt.AdaLoraConfig(**config))
    b = copy.deepcopy(a)
    inputs = text_inputs()
    for step in range(3):
        for model, update in ((a, a.base_model.update_and_allocate), (b, b.update_and_allocate)):
            model.train()
            model(**inputs, labels=inputs["input_ids"]).loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p.sub_(0.1 * p.grad)
            update(step)
            model.zero_grad()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    ranks = {n: int(m.adapters["default"].keep.sum()) for n, m in a.base_model.model.named_modules()
             if isinstance(m, torch.nn.Module) and "adapters" in m._modules
             and getattr(m.adapters["default"], "keep", None) is not None}
    assert ranks and all(r < 6 for r in ranks.values())  # the allocation ran: ranks were pruned


def test_disable_adapter_layers_refused_for_prompt_learning():
    model = dt.get_peft_model(tiny_llama(), dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(ValueError, match="disable_adapter"):
        model.base_model.disable_adapter_layers()


def test_disable_adapter_layers_unmerges_first():
    dm = dt.get_peft_model(tiny_llama(), dt.LoraConfig(**KW))
    random_lora(dm, seed=3)
    inputs = text_inputs()
    dm.merge_adapter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.base_model.disable_adapter_layers()
    assert any("unmerging" in str(w.message) for w in caught)
    with torch.no_grad():
        base = main_output(tiny_llama()(**inputs))
    torch.testing.assert_close(_outputs(dm, inputs), base, rtol=1e-5, atol=1e-5)


def test_no_reference_cycle_and_pickles_keep_the_pairing(tmp_path):
    """The host refers to its PeftModel weakly: dropping the model frees it without the garbage collector;
    a pickled and reloaded model's host belongs to the reloaded model."""
    import gc
    import weakref

    gc.disable()
    try:
        model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(**KW))
        ref = weakref.ref(model)
        del model
        assert ref() is None
    finally:
        gc.enable()
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(**KW))
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)  # our own file, written just above
    assert loaded.base_model._peft_model() is loaded and loaded.base_model.active_adapters == ["default"]
