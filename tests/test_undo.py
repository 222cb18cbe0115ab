"""A failed entry point leaves the user's model exactly as it was: module objects, parameters (names,
identities, values, requires_grad), the layer stack and its config (layer_replication included), and no
attribute stashed anywhere."""

from __future__ import annotations

import json
import os

import pytest
import torch

import deltatune as dt
from conftest import VOCAB, main_output, perturb_trainable, text_inputs
from deltatune.modules_to_save import ModulesToSaveWrapper

MAP = [[0, 3], [1, 4]]  # -> layers 0 1 2 1 2 3


def qwen4():
    """Four layers whose config has ``layer_types`` (a replication reorders it)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, sliding_window=4, use_sliding_window=True,
        layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"])).eval()


def replicated_config(**kwargs):
    return dt.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], layer_replication=MAP,
                         init_lora_weights=False, **kwargs)


def snapshot(model):
    """Everything a failed call must leave alone, with the objects themselves where identity matters."""
    base = model.get_base_model() if isinstance(model, dt.PeftModel) else model
    return dict(
        modules=list(model.named_modules(remove_duplicate=False)),
        params=[(n, p, p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)],
        state={k: v.clone() for k, v in model.state_dict().items()},
        attrs={n: sorted(vars(m)) for n, m in model.named_modules()},
        layers=base.model.layers,
        layer_list=list(base.model.layers),
        layer_idx=[layer.self_attn.layer_idx for layer in base.model.layers],
        config=base.config.to_dict(),
        layer_types=base.config.layer_types,
        active={n: list(m.active) for n, m in model.named_modules() if hasattr(type(m), "set_active")
                and isinstance(m.active, list)},
        outputs=main_output(model(**text_inputs())).detach() if not _on_meta(model) else None,
    )


def _on_meta(model):
    return any(p.is_meta for p in model.parameters())


def assert_unchanged(model, before):
    after = snapshot(model)
    assert [n for n, _ in after["modules"]] == [n for n, _ in before["modules"]]
    assert all(a is b for (_, a), (_, b) in zip(after["modules"], before["modules"]))
    assert [n for n, _, _ in after["params"]] == [n for n, _, _ in before["params"]]
    for (name, p, grad), (_, q, grad_before) in zip(after["params"], before["params"]):
        assert p is q, name
        assert grad == grad_before, name
    assert after["state"].keys() == before["state"].keys()
    for key, value in after["state"].items():
        assert torch.equal(value, before["state"][key]), key
    assert after["attrs"] == before["attrs"]  # nothing stashed on any module, the user's model included
    assert after["layers"] is before["layers"]
    assert all(a is b for a, b in zip(after["layer_list"], before["layer_list"]))
    assert after["layer_idx"] == before["layer_idx"] == list(range(len(before["layer_idx"])))
    assert after["config"] == before["config"]
    assert after["layer_types"] is before["layer_types"]
    assert after["active"] == before["active"]
    if before["outputs"] is not None:
        assert torch.equal(after["outputs"], before["outputs"])


def _bad_checkpoint(tmp_path):
    """A replicated adapter whose config says r=2 over r=4 tensors: every lora_A/B has the wrong shape."""
    source = dt.get_peft_model(qwen4(), replicated_config())
    path = str(tmp_path / "bad")
    source.save_pretrained(path)
    config_file = os.path.join(path, "adapter_config.json")
    with open(config_file) as f:
        config = json.load(f)
    config["r"] = 2
    with open(config_file, "w") as f:
        json.dump(config, f)
    return path


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_failed_from_pretrained_with_replication_leaves_the_model_as_it_was(tmp_path, low_cpu_mem_usage):
    path = _bad_checkpoint(tmp_path)
    model = qwen4()
    before = snapshot(model)
    with pytest.raises(dt.CheckpointError, match="shape"):
        dt.PeftModel.from_pretrained(model, path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert_unchanged(model, before)
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4
    # ... and the model can still take the adapter, replicating once, as a fresh model does.
    good = dt.get_peft_model(qwen4(), replicated_config())
    good.save_pretrained(str(tmp_path / "good"))
    loaded = dt.PeftModel.from_pretrained(model, str(tmp_path / "good"))
    assert len(model.model.layers) == 6 and model.config.num_hidden_layers == 6
    with torch.no_grad():
        torch.testing.assert_close(main_output(loaded(**text_inputs())), main_output(good(**text_inputs())),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("first", [None, MAP])
def test_failed_load_adapter_leaves_peft_model_as_it_was(tmp_path, first):
    """The loaded adapter replicates the stack (first=None) or finds it replicated (first=MAP); either
    way the PeftModel and its model are as before, the first adapter still trainable and active."""
    path = _bad_checkpoint(tmp_path)
    model = dt.get_peft_model(qwen4(), dt.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"],
                                                     layer_replication=first, modules_to_save=["lm_head"]))
    perturb_trainable(model, 1, 0.3)
    before = snapshot(model)
    with pytest.raises(dt.CheckpointError, match="shape"):
        model.load_adapter(path, "other", is_trainable=True)
    assert list(model.peft_config) == ["default"]
    assert_unchanged(model, before)


def _failing_on_call(monkeypatch, owner, attr, call):
    """Make ``owner.attr`` raise on its ``call``-th call (after the earlier calls did their work)."""
    original = getattr(owner, attr)
    calls = []

    def fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attr, fail)


def test_failed_add_adapter_after_injection_leaves_peft_model_as_it_was(monkeypatch):
    """The second saved module fails: the replication, the new adapter in layers that already had one,
    the new layers and both modules_to_save wrappers (one new, one extended) are all undone."""
    model = dt.get_peft_model(qwen4(), dt.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"],
                                                     modules_to_save=["lm_head"]))
    perturb_trainable(model, 1, 0.3)
    before = snapshot(model)
    _failing_on_call(monkeypatch, ModulesToSaveWrapper, "add_adapter", 2)
    with pytest.raises(RuntimeError, match="injected failure"):
        model.add_adapter("other", replicated_config(modules_to_save=["lm_head", "embed_tokens"]))
    assert list(model.peft_config) == ["default"]
    assert_unchanged(model, before)


def test_failed_inject_adapter_in_model_leaves_the_model_as_it_was(monkeypatch):
    import deltatune.mapping

    model = qwen4()
    before = snapshot(model)
    _failing_on_call(monkeypatch, deltatune.mapping, "activate", 1)
    with pytest.raises(RuntimeError, match="injected failure"):
        dt.inject_adapter_in_model(replicated_config(modules_to_save=["lm_head"]), model)
    assert_unchanged(model, before)


def test_failed_injection_gives_a_residual_initialisation_back(monkeypatch):
    """PiSSA wrote W - s B A into the base weights; the undo puts W back (up to rounding), in the same
    parameter objects."""
    import deltatune.mapping

    model = qwen4()
    weights = {n: (p, p.detach().clone()) for n, p in model.named_parameters() if "q_proj.weight" in n}
    _failing_on_call(monkeypatch, deltatune.mapping, "activate", 1)
    config = dt.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa")
    with pytest.raises(RuntimeError, match="injected failure"):
        dt.inject_adapter_in_model(config, model)
    now = dict(model.named_parameters())
    for name, (param, value) in weights.items():
        assert now[name] is param
        torch.testing.assert_close(param, value, rtol=0, atol=1e-5)
