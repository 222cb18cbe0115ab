"""Hot-swapping LoRA adapters: a swap equals a fresh load, refusals change nothing, compiled models do not
recompile (``torch._dynamo.config.error_on_recompile``), and peft's hotswap agrees."""

from __future__ import annotations

import pytest
import torch

from conftest import main_output, random_lora, text_inputs, tiny_llama
from deltatune import (IA3Config, LoraConfig, PeftModel, PromptTuningConfig, TaskType, get_peft_model,
                       hotswap_adapter, prepare_model_for_compiled_hotswap)
from deltatune.methods.lora.layer import LoraLayer

TOL = 1e-5
QV = ["q_proj", "v_proj"]


def _save(tmp_path, name, config, seed):
    model = get_peft_model(tiny_llama(), config)
    random_lora(model, seed)
    folder = str(tmp_path / name)
    model.save_pretrained(folder)
    return folder


def _lora(**kw):
    return LoraConfig(init_lora_weights=False, **kw)


def _out(model):
    with torch.no_grad():
        return main_output(model(**text_inputs()))


def _fresh(folder):
    return _out(PeftModel.from_pretrained(tiny_llama(), folder))


def _lora_adapters(model):
    return [ad for m in model.modules() if isinstance(m, LoraLayer) for ad in m.adapters.values()]


def _snapshot(model):
    """Everything a swap could change: tensors (by value and identity), scalings, dropouts, configs."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    scalings = [float(ad.scaling) for ad in _lora_adapters(model)]
    dropouts = [ad.dropout for ad in _lora_adapters(model)]
    return state, params, scalings, dropouts, {k: v.to_dict() for k, v in model.peft_config.items()}


def _assert_same(model, snap):
    state, params, scalings, dropouts, configs = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert [float(ad.scaling) for ad in _lora_adapters(model)] == scalings
    assert [ad.dropout for ad in _lora_adapters(model)] == dropouts
    assert {k: v.to_dict() for k, v in model.peft_config.items()} == configs


# ------------------------------------------------------------------------------------------- eager swaps
SWAPS = {  # name: (first adapter, second adapter, prepare first)
    "same_targets": (_lora(r=8, lora_alpha=16, target_modules=QV), _lora(r=8, lora_alpha=16, target_modules=QV), False),
    "lower_rank_same_alpha": (_lora(r=8, lora_alpha=8, target_modules=QV), _lora(r=4, lora_alpha=4, target_modules=QV),
                              False),
    "other_rank_and_alpha": (_lora(r=4, lora_alpha=8, target_modules=QV), _lora(r=8, lora_alpha=3, target_modules=QV),
                             True),
    "rslora": (_lora(r=8, lora_alpha=16, target_modules=QV),
               _lora(r=4, lora_alpha=6, use_rslora=True, lora_dropout=0.1, target_modules=QV), False),
    "subset_targets": (_lora(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"]),
                       _lora(r=4, lora_alpha=12, target_modules=["v_proj"]), False),
    "patterns": (_lora(r=8, lora_alpha=16, target_modules=QV),
                 _lora(r=4, lora_alpha=8, rank_pattern={"layers.1.self_attn.q_proj": 2},
                       alpha_pattern={"v_proj": 5}, target_modules=QV), False),
    "dora_subset": (_lora(r=8, lora_alpha=16, use_dora=True, target_modules=QV),
                    _lora(r=4, lora_alpha=4, use_dora=True, target_modules=["q_proj"]), False),
}


@pytest.mark.parametrize("case", sorted(SWAPS))
def test_hotswap_equals_fresh_load(tmp_path, case):
    first, second, prepare = SWAPS[case]
    f0, f1 = _save(tmp_path, "a0", first, 0), _save(tmp_path, "a1", second, 1)
    model = PeftModel.from_pretrained(tiny_llama(), f0)
    if prepare:
        prepare_model_for_compiled_hotswap(model, target_rank=8)
    before = _out(model)  # also fills the no-grad factor cache, which the swap must invalidate
    params = dict(model.named_parameters())
    hotswap_adapter(model, f1, "default")
    expected = _fresh(f1)
    after = _out(model)
    assert not torch.allclose(before, expected, atol=1e-3)  # (the swap has something to show)
    torch.testing.assert_close(after, expected, atol=TOL, rtol=0)
    assert all(p is params[n] for n, p in model.named_parameters())  # in place: no re-wrapping
    assert model.peft_config["default"].lora_dropout == second.lora_dropout
    # The stored config describes the adapter as held: a save reloads to the same outputs.
    model.save_pretrained(str(tmp_path / "resaved"))
    torch.testing.assert_close(_fresh(str(tmp_path / "resaved")), expected, atol=TOL, rtol=0)


def test_hotswap_back_and_forth_with_training_route(tmp_path):
    """Swapping back restores the first adapter's outputs, in the fused training route as well."""
    f0 = _save(tmp_path, "a0", _lora(r=8, lora_alpha=16, target_modules=QV), 0)
    f1 = _save(tmp_path, "a1", _lora(r=4, lora_alpha=2, target_modules=QV), 1)
    model = PeftModel.from_pretrained(tiny_llama(), f0, is_trainable=True)
    prepare_model_for_compiled_hotswap(model)
    first = main_output(model(**text_inputs())).detach()
    hotswap_adapter(model, f1)
    hotswap_adapter(model, f0)
    torch.testing.assert_close(main_output(model(**text_inputs())).detach(), first, atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------------- refusals
def _refusal_folder(tmp_path, kind):
    if kind == "ia3":
        return _save(tmp_path, "x", IA3Config(target_modules=["q_proj", "down_proj"],
                                              feedforward_modules=["down_proj"], init_ia3_weights=False), 1)
    if kind == "prompt":
        return _save(tmp_path, "x", PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3), 1)
    configs = {
        "dora_into_lora": _lora(r=8, lora_alpha=16, use_dora=True, target_modules=QV),
        "extra_target": _lora(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"]),
        "larger_rank": _lora(r=16, lora_alpha=16, target_modules=QV),
        "modules_to_save": _lora(r=8, lora_alpha=16, target_modules=QV, modules_to_save=["lm_head"]),
    }
    return _save(tmp_path, "x", configs[kind], 1)


@pytest.mark.parametrize("kind, message", [
    ("ia3", "IA3"), ("prompt", "PROMPT_TUNING"), ("dora_into_lora", "DoRA"), ("extra_target", "k_proj"),
    ("larger_rank", "rank 16 is larger"), ("modules_to_save", "modules_to_save"), ("merged", "merged"),
])
def test_refusals_leave_the_model_unchanged(tmp_path, kind, message):
    f0 = _save(tmp_path, "a0", _lora(r=8, lora_alpha=16, target_modules=QV), 0)
    model = PeftModel.from_pretrained(tiny_llama(), f0)
    prepare_model_for_compiled_hotswap(model)
    if kind == "merged":
        model.merge_adapter()
        folder = _save(tmp_path, "x", _lora(r=8, lora_alpha=16, target_modules=QV), 1)
    else:
        folder = _refusal_folder(tmp_path, kind)
    before, snap = _out(model), _snapshot(model)
    with pytest.raises(ValueError, match=message):
        hotswap_adapter(model, folder, "default")
    _assert_same(model, snap)
    torch.testing.assert_close(_out(model), before, atol=0, rtol=0)


def test_lora_into_dora_refused(tmp_path):
    f0 = _save(tmp_path, "a0", _lora(r=8, lora_alpha=16, use_dora=True, target_modules=QV), 0)
    f1 = _save(tmp_path, "a1", _lora(r=8, lora_alpha=16, target_modules=QV), 1)
    model = PeftModel.from_pretrained(tiny_llama(), f0)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="plain LoRA but adapter 'default' is DoRA"):
        hotswap_adapter(model, f1)
    _assert_same(model, snap)


def test_unknown_adapter_name_refused(tmp_path):
    f0 = _save(tmp_path, "a0", _lora(r=8, lora_alpha=16, target_modules=QV), 0)
    model = PeftModel.from_pretrained(tiny_llama(), f0)
    with pytest.raises(ValueError, match="'other'"):
        hotswap_adapter(model, f0, "other")


# ------------------------------------------------------------------------------------------- prepare
def test_prepare_pads_keeps_outputs_and_describes_the_adapter(tmp_path):
    f0 = _save(tmp_path, "a0", _lora(r=4, lora_alpha=8, rank_pattern={"v_proj": 2}, target_modules=QV), 0)
    model = PeftModel.from_pretrained(tiny_llama(), f0)
    before = _out(model)
    prepare_model_for_compiled_hotswap(model, target_rank=16)
    assert all(ad.r == 16 and ad.lora_A.shape[0] == 16 and ad.lora_B.shape[1] == 16 for ad in _lora_adapters(model))
    assert all(isinstance(ad.scaling, torch.Tensor) and ad.scaling.dim() == 0 for ad in _lora_adapters(model))
    torch.testing.assert_close(_out(model), before, atol=TOL, rtol=0)
    config = model.peft_config["default"]
    assert config.r == 16 and config.rank_pattern == {}
    model.save_pretrained(str(tmp_path / "padded"))  # padded tensors, a config whose scalings match them
    torch.testing.assert_close(_fresh(str(tmp_path / "padded")), before, atol=TOL, rtol=0)
    model.half()  # the scaling is no buffer: half() does not round it
    assert all(ad.scaling.dtype == torch.float32 for ad in _lora_adapters(model))


def test_tensor_scaling_written_in_place_reaches_the_cached_route(tmp_path):
    f0 = _save(tmp_path, "a0", _lora(r=8, lora_alpha=16, target_modules=QV), 0)
    doubled = _fresh(_save(tmp_path, "a1", _lora(r=8, lora_alpha=32, target_modules=QV), 0))
    model = PeftModel.from_pretrained(tiny_llama(), f0)
    prepare_model_for_compiled_hotswap(model)
    _out(model)  # builds the cached factors with s = 2
    for ad in _lora_adapters(model):
        ad.set_scaling(4.0)
    torch.testing.assert_close(_out(model), doubled, atol=TOL, rtol=0)


def test_prepare_refusals_and_check_compiled(tmp_path):
    f0 = _save(tmp_path, "a0", _lora(r=8, lora_alpha=16, target_modules=QV), 0)
    model = PeftModel.from_pretrained(tiny_llama(), f0)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="target_rank"):
        prepare_model_for_compiled_hotswap(model, target_rank=4)
    with pytest.raises(ValueError, match="check_compiled"):
        prepare_model_for_compiled_hotswap(model, check_compiled="maybe")
    compiled = torch.compile(model, backend="eager")
    with pytest.raises(ValueError, match="before the model is compiled"):
        prepare_model_for_compiled_hotswap(compiled)
    _assert_same(model, snap)
    with pytest.warns(UserWarning, match="recompile"):
        prepare_model_for_compiled_hotswap(compiled, check_compiled="warn")
    with pytest.raises(ValueError, match="no LoRA"):
        prepare_model_for_compiled_hotswap(tiny_llama())


def test_prepare_config_argument_as_peft():
    """peft: with target_rank, the given configs' r and rank_pattern values become target_rank, in place."""
    configs = {"a": LoraConfig(r=4, rank_pattern={"q_proj": 2}), "b": LoraConfig(r=2)}
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=QV))
    prepare_model_for_compiled_hotswap(model, target_rank=8, config=configs)
    assert [c.r for c in configs.values()] == [8, 8] and configs["a"].rank_pattern == {"q_proj": 8}


# ------------------------------------------------------------------------------------------- compiled
def _compiled_swap(tmp_path, prepare):
    """Compile (eager backend: dynamo's guards, which decide recompilation, are the same for every backend),
    run, hot-swap to a lower-rank, other-alpha, subset-target adapter and run again, with
    ``error_on_recompile``. Returns (outputs before, after, fresh load of the second adapter)."""
    f0 = _save(tmp_path, "a0", _lora(r=8, lora_alpha=16, target_modules=QV), 0)
    f1 = _save(tmp_path, "a1", _lora(r=4, lora_alpha=3, target_modules=["q_proj"]), 1)
    model = PeftModel.from_pretrained(tiny_llama(), f0)
    if prepare:
        prepare_model_for_compiled_hotswap(model, target_rank=8)
    torch._dynamo.reset()  # (compiled code of PeftModel.forward from other tests would count as a recompile)
    compiled = torch.compile(model, backend="eager")
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            before = _out(compiled)
            hotswap_adapter(compiled, f1, "default")
            after = _out(compiled)
    finally:
        torch._dynamo.reset()
    return before, after, _fresh(f1), _fresh(f0)


def test_compiled_prepared_model_hotswaps_without_recompiling(tmp_path):
    before, after, expected, first = _compiled_swap(tmp_path, prepare=True)
    torch.testing.assert_close(before, first, atol=TOL, rtol=0)
    torch.testing.assert_close(after, expected, atol=TOL, rtol=0)


def test_compiled_unprepared_model_recompiles_on_a_scaling_change(tmp_path):
    """The control: without prepare the float scaling is a graph constant, and changing it recompiles."""
    with pytest.raises(torch._dynamo.exc.RecompileError, match="scaling"):
        _compiled_swap(tmp_path, prepare=False)


# ------------------------------------------------------------------------------------------- against peft
def test_matches_peft_hotswap(tmp_path):
    from peft import PeftModel as PeftPeftModel
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap as peft_prepare

    f0 = _save(tmp_path, "a0", _lora(r=4, lora_alpha=8, target_modules=QV), 0)
    f1 = _save(tmp_path, "a1", _lora(r=8, lora_alpha=5, target_modules=["q_proj"]), 1)
    theirs = PeftPeftModel.from_pretrained(tiny_llama(), f0)
    peft_prepare(theirs, target_rank=8)
    peft_hotswap(theirs, f1, adapter_name="default", torch_device="cpu")
    ours = PeftModel.from_pretrained(tiny_llama(), f0)
    prepare_model_for_compiled_hotswap(ours, target_rank=8)
    hotswap_adapter(ours, f1, "default", torch_device="cpu")
    torch.testing.assert_close(_out(ours), _out(theirs), atol=TOL, rtol=0)
    # A save after the swap loads in peft to the same outputs (the stored config matches the padded tensors).
    ours.save_pretrained(str(tmp_path / "resaved"))
    reloaded = PeftPeftModel.from_pretrained(tiny_llama(), str(tmp_path / "resaved"))
    torch.testing.assert_close(_out(reloaded), _out(ours), atol=TOL, rtol=0)
