"""PeftModel behaviour: many adapters, merging, precision, checkpointing, compile, generate."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import random_lora, main_output, text_inputs, tiny_gpt2_lm, tiny_llama
from deltatune.methods.lora import LoraLayer



def _logits(model, inputs):
    with torch.no_grad():
        return main_output(model(**inputs))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def test_several_active_adapters_sum_their_deltas():
    inputs = text_inputs()
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("b", dt.LoraConfig(r=2, target_modules=["v_proj", "down_proj"]))
    random_lora(model, scale=0.05)
    with model.disable_adapter():
        base = _logits(model, inputs)
    model.set_adapter("default")
    a_only = _logits(model, inputs)
    model.set_adapter("b")
    b_only = _logits(model, inputs)
    model.set_adapter(["default", "b"])
    assert model.active_adapters == ["default", "b"]
    both = _logits(model, inputs)
    # Single-layer check of the summed delta (whole-model outputs are not additive).
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    x = torch.randn(3, 32)
    with torch.no_grad():
        want = layer.base_layer(x) + sum(
            ad.scaling * x @ ad.lora_A.T @ ad.lora_B.T for ad in layer.adapters.values())
        torch.testing.assert_close(layer(x), want)
    assert not torch.allclose(both, a_only) and not torch.allclose(both, b_only)
    assert not torch.allclose(a_only, base)
    trainable = {n.split(".adapters.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"default", "b"}


def test_delete_adapter_restores_modules():
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("other", dt.LoraConfig(r=2, target_modules=["k_proj"]))
    model.set_adapter("other")
    model.delete_adapter("other")
    assert model.active_adapter == "default" and list(model.peft_config) == ["default"]
    attn = model.base_model.model.model.layers[0].self_attn
    assert isinstance(attn.k_proj, nn.Linear) and isinstance(attn.q_proj, LoraLayer)
    with pytest.raises(ValueError, match="unknown adapter"):
        model.delete_adapter("other")


def test_bad_adapter_names_and_duplicates_change_nothing():
    model = dt.get_peft_model(_mlp(), dt.LoraConfig(r=2, target_modules=["0"]))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", dt.LoraConfig(r=2, target_modules=["2"]))
    with pytest.raises(ValueError, match="adapter name"):
        model.add_adapter("a.b", dt.LoraConfig(r=2, target_modules=["2"]))
    with pytest.raises(dt.TargetError):
        model.add_adapter("new", dt.LoraConfig(r=2, target_modules=["nope"]))
    assert list(model.peft_config) == ["default"]
    assert isinstance(model.base_model.model[2], nn.Linear)
    assert model.state_dict().keys() == state.keys()
    with pytest.raises(ValueError, match="unknown adapter"):
        model.set_adapter("missing")


def test_only_one_adapter_may_train_biases():
    model = dt.get_peft_model(_mlp(), dt.LoraConfig(r=2, target_modules=["0"], bias="all"))
    with pytest.raises(ValueError, match="only one adapter may train them"):
        model.add_adapter("b", dt.LoraConfig(r=2, target_modules=["2"], bias="lora_only"))


def test_merge_and_unload_and_unload():
    inputs = text_inputs()
    reference = tiny_llama()
    model = dt.get_peft_model(copy.deepcopy(reference), dt.LoraConfig(r=4, target_modules="all-linear",
                                                                    modules_to_save=["lm_head"]))
    random_lora(model, scale=0.05)
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    want = _logits(model, inputs)
    clone = copy.deepcopy(model)
    merged = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, (LoraLayer, dt.modules_to_save.ModulesToSaveWrapper)) for m in merged.modules())
    torch.testing.assert_close(_logits(merged, inputs), want, rtol=1e-5, atol=1e-5)
    unloaded = clone.unload()
    assert not any(isinstance(m, LoraLayer) for m in unloaded.modules())
    torch.testing.assert_close(_logits(unloaded, inputs), _logits(reference, inputs), rtol=0, atol=0)


def test_merge_selected_adapters_and_unmerge():
    model = dt.get_peft_model(_mlp(), dt.LoraConfig(r=2, target_modules=["0", "2"]))
    model.add_adapter("b", dt.LoraConfig(r=2, target_modules=["0"]))
    random_lora(model)
    x = torch.randn(5, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_adapter(["default", "b"])
    want = model(x)
    model.merge_adapter(["default", "b"])
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6)


def test_safe_merge_rejects_non_finite_and_leaves_weights():
    model = dt.get_peft_model(_mlp(), dt.LoraConfig(r=2, target_modules=["0", "2"]))
    random_lora(model)
    with torch.no_grad():
        model.base_model.model[2].adapters["default"].lora_B.fill_(float("nan"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="NaN"):
        model.merge_and_unload(safe_merge=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6, equal_nan=True)
    assert isinstance(model.base_model.model[0], LoraLayer) and not model.base_model.model[0].merged


def test_forward_train_eval_never_change_weights():
    model = dt.get_peft_model(_mlp(), dt.LoraConfig(r=2, target_modules=["0"], lora_dropout=0.5))
    random_lora(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model(torch.randn(3, 8))
    model.eval()
    model(torch.randn(3, 8))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_disable_adapter_restores_after_exception():
    model = dt.get_peft_model(_mlp(), dt.LoraConfig(r=2, target_modules=["0"]))
    random_lora(model)
    x = torch.randn(2, 8)
    want = model(x)
    with pytest.raises(RuntimeError):
        with model.disable_adapter():
            raise RuntimeError("boom")
    torch.testing.assert_close(model(x), want)


def test_print_trainable_parameters(capsys):
    model = dt.get_peft_model(_mlp(), dt.LoraConfig(r=2, target_modules=["0"]))
    model.print_trainable_parameters()
    trainable = 2 * 8 + 16 * 2
    total = 8 * 16 + 16 + 16 * 4 + 4 + trainable
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
    assert model.get_nb_trainable_parameters() == (trainable, total)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_float32_adapters(dtype):
    base = _mlp().to(dtype)
    model = dt.get_peft_model(base, dt.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    layer = model.base_model.model[0]
    assert layer.adapters["default"].lora_A.dtype == torch.float32
    x = torch.randn(4, 8, dtype=dtype)
    out = model(x)
    assert out.dtype == dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac = model(x.float())
    assert out_ac.dtype == torch.bfloat16
    out_ac.float().sum().backward()
    assert layer.adapters["default"].lora_A.grad is not None
    # Merging computes in float32 and casts once.
    w = layer.base_layer.weight.detach().clone()
    ad = layer.adapters["default"]
    want = (w.float() + ad.scaling * (ad.lora_B @ ad.lora_A).detach()).to(dtype)
    model.merge_adapter()
    assert torch.equal(layer.base_layer.weight, want)


def test_float64_base_gets_float64_adapters_on_its_device():
    model = dt.get_peft_model(_mlp().double(), dt.LoraConfig(r=2, target_modules=["0"]))
    ad = model.base_model.model[0].adapters["default"]
    assert ad.lora_A.dtype == torch.float64 and ad.lora_A.device == torch.device("cpu")
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(8, 16))
    ad = dt.get_peft_model(meta, dt.LoraConfig(r=2, target_modules=["0"])).base_model.model[0].adapters["default"]
    assert ad.lora_A.device.type == "meta"


def test_gradient_checkpointing_reaches_adapters():
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    inputs = text_inputs()
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients_with_dropout(dora, reentrant):
    """The recomputed forward must draw the same dropout positions (checkpointing restores the RNG state)."""
    def grads(checkpointing):
        config = dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.2,
                               use_dora=dora, init_lora_weights=False)
        model = dt.get_peft_model(tiny_llama(), config)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        inputs = text_inputs()
        torch.manual_seed(123)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == (18 if dora else 12)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=0, msg=name)


def test_torch_compile_fullgraph_plain_lora_path():
    model = dt.get_peft_model(_mlp(), dt.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    eager = model(x)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    torch.testing.assert_close(compiled(x), eager)
    model.train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    g = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))  # not all ones: rows weigh differently
    want = torch.autograd.grad(model(x), list(trainable.values()), g)
    got = torch.autograd.grad(compiled(x), list(trainable.values()), g)
    assert len(trainable) == 4  # lora_A and lora_B of both layers
    for name, a, b in zip(trainable, got, want):
        assert b.abs().max() > 0, name  # B starts non-zero (init_lora_weights=False): every factor gets a gradient
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


def test_generate_matches_peft_and_attribute_fallthrough():
    inputs = text_inputs(batch=1, seq=4)
    config = dict(r=4, target_modules=["c_attn", "c_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(tiny_gpt2_lm(), peft.LoraConfig(**config))
    dm = dt.get_peft_model(tiny_gpt2_lm(), dt.LoraConfig(**config))
    dt.set_peft_model_state_dict(dm, peft.get_peft_model_state_dict(pm))
    assert isinstance(dm, dt.PeftModelForCausalLM)
    assert dm.config.n_embd == 32  # attribute falls through to the base model
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(dm.generate(**inputs, **kwargs), pm.generate(**inputs, **kwargs))


def test_inject_adapter_in_model_and_state_dict_helpers():
    model = dt.inject_adapter_in_model(dt.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), _mlp())
    assert isinstance(model[0], LoraLayer)
    state = dt.get_peft_model_state_dict(model)
    assert sorted(state) == ["0.lora_A.weight", "0.lora_B.weight"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.adapters.default.lora_A",
                                                                          "0.adapters.default.lora_B"]
    other = dt.inject_adapter_in_model(dt.LoraConfig(r=2, target_modules=["0"]), _mlp())
    assert dt.set_peft_model_state_dict(other, state) == ([], [])  # (missing_keys, unexpected_keys)
    x = torch.randn(2, 8)
    torch.testing.assert_close(other(x), model(x))
    from_sd = dt.get_peft_model_state_dict(model, state_dict=model.state_dict())
    assert all(torch.equal(from_sd[k], state[k]) for k in state)


@pytest.mark.parametrize("dora", [False, True])
def test_disable_adapter_on_a_merged_model_computes_the_base_model(dora):
    """As in peft: merged adapters are unmerged first (with a warning) and stay unmerged."""
    inputs = text_inputs()
    with torch.no_grad():
        want = main_output(tiny_llama()(**inputs))
    config = dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, use_dora=dora)
    model = dt.get_peft_model(tiny_llama(), config).eval()
    with torch.no_grad():
        adapted = main_output(model(**inputs))
        model.merge_adapter()
        with pytest.warns(UserWarning, match="disable_adapter: the model has merged adapters"):
            with model.disable_adapter():
                torch.testing.assert_close(main_output(model(**inputs)), want, rtol=0, atol=1e-5)
        assert not any(layer.merged_adapters for layer in model.modules() if isinstance(layer, LoraLayer))
        torch.testing.assert_close(main_output(model(**inputs)), adapted, rtol=0, atol=1e-5)


def test_set_adapter_on_a_merged_model_unmerges_first_as_peft_does():
    inputs = text_inputs()
    outs = {}
    for lib in (peft, dt):
        model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                init_lora_weights=False))
        model.add_adapter("b", lib.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        if lib is dt:
            for name in ("default", "b"):
                dt.set_peft_model_state_dict(model, peft.get_peft_model_state_dict(outs["model"], adapter_name=name), name)
        with torch.no_grad():
            model.merge_adapter()
            with pytest.warns(UserWarning):
                model.set_adapter("b")
            outs[lib.__name__] = main_output(model(**inputs))
        outs["model"] = model
    torch.testing.assert_close(outs["deltatune"], outs["peft"], rtol=0, atol=1e-5)


def test_inject_adapter_in_model_targets_the_modules_of_a_state_dict_as_peft_does():
    source = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["v_proj", "down_proj"]))
    torch.manual_seed(0)
    state = {k.replace("base_model.model.", ""): torch.randn_like(v) * 0.2
             for k, v in peft.get_peft_model_state_dict(source).items() if "layers.0" in k}
    config = dict(r=2, target_modules=["q_proj"])
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**config), tiny_llama(), state_dict=state)
    ours = dt.inject_adapter_in_model(dt.LoraConfig(**config), tiny_llama(), state_dict=state)
    adapted = sorted(n for n, m in ours.named_modules() if isinstance(m, LoraLayer))
    assert adapted == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.v_proj"]
    assert adapted == sorted(n[: -len(".lora_A")] for n, _ in theirs.named_modules() if n.endswith("lora_A"))
    lean = dt.inject_adapter_in_model(dt.LoraConfig(**config), tiny_llama(), low_cpu_mem_usage=True, state_dict=state)
    for model, lib in ((ours, dt), (lean, dt), (theirs, peft)):
        lib.set_peft_model_state_dict(model, state)
    inputs = text_inputs()
    want = main_output(theirs(**inputs))
    for model in (ours, lean):
        torch.testing.assert_close(main_output(model(**inputs)), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no adapter keys"):
        dt.inject_adapter_in_model(dt.LoraConfig(**config), tiny_llama(), state_dict={"score.weight": torch.zeros(1)})


def test_delete_adapter_with_modules_to_save_held_by_another_adapter():
    """Deleting an adapter that has no copy in a modules_to_save wrapper (another adapter's head) works,
    and leaves the other adapter's copy and outputs as they were."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 3))
    model = dt.get_peft_model(base, dt.LoraConfig(r=2, target_modules=["0"], modules_to_save=["1"]))
    model.add_adapter("other", dt.LoraConfig(r=2, target_modules=["0"]))
    x = torch.randn(4, 8)
    before = model(x)
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]
    assert list(model.base_model.model[1].modules_to_save) == ["default"]
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


@pytest.mark.parametrize("trainable", [False, True])
def test_loading_puts_the_model_in_eval_mode_unless_trainable(tmp_path, trainable):
    """As peft: a loaded adapter (from_pretrained, load_adapter) leaves dropout off unless is_trainable;
    a base with dropout then computes what the saved model computed in eval mode."""
    torch.manual_seed(0)
    def base():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3))
    saved = dt.get_peft_model(base(), dt.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    saved.save_pretrained(tmp_path)
    saved.save_pretrained(tmp_path / "second_root", selected_adapters=["default"])
    loaded = dt.PeftModel.from_pretrained(base().train(), str(tmp_path), is_trainable=trainable)
    assert loaded.training is trainable and loaded.base_model.model[1].training is trainable
    loaded.train()
    result = loaded.load_adapter(str(tmp_path / "second_root"), "second", is_trainable=trainable)
    assert loaded.training is trainable
    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
    if not trainable:
        x = torch.randn(5, 8)
        torch.testing.assert_close(loaded(x), saved.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["a/b", "/tmp/evil", "..", "a\\b", ""])
def test_adapter_names_that_would_leave_the_save_folder_are_refused(name):
    model = dt.get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), dt.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="adapter name"):
        model.add_adapter(name, dt.LoraConfig(r=2, target_modules=["0"]))
    assert list(model.peft_config) == ["default"]
