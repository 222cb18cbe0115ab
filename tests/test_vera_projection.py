"""VeRA with ``save_projection=True`` (peft's default): the shared projections saved as peft saves them
(``base_model.vera_A`` / ``base_model.vera_B``) and loaded from the file, against peft 0.21 both ways."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from conftest import main_output, perturb_trainable, text_inputs, tiny_bert_cls, tiny_llama
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.methods.vera import VeraConfig
from deltatune.methods.vera import functional as VF

LLAMA = ["q_proj", "v_proj", "down_proj"]  # largest in: down_proj's 64; largest out: 32 (v_proj: 16)
CASES = [  # (id, build, config kwargs, (r, max_in), (max_out, r))
    ("llama", tiny_llama, dict(r=4, target_modules=LLAMA), (4, 64), (32, 4)),
    ("bert-cls", tiny_bert_cls, dict(task_type="SEQ_CLS", r=6, projection_prng_key=3,
                                     target_modules=["query", "value", "intermediate.dense"]), (6, 32), (64, 6)),
]


def _out(model, inputs=None):
    with torch.no_grad():
        return main_output(model(**(inputs or text_inputs())))


def _peft(build, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (peft warns about regenerating projections, unused dropout, ...)
        return peft.get_peft_model(build(), peft.VeraConfig(**kwargs))


def _peft_load(build, path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(build(), str(path), **kwargs)


def _file(path):
    return load_file(str(path / "adapter_model.safetensors"))


@pytest.mark.parametrize("direction", ["peft->deltatune", "deltatune->peft"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_saved_projections_load_both_ways_with_peft_keys_and_shapes(case, direction, tmp_path):
    _, build, kwargs, shape_A, shape_B = case
    if direction == "peft->deltatune":
        source = _peft(build, **kwargs)
    else:
        source = dt.get_peft_model(build(), VeraConfig(**kwargs))
    perturb_trainable(source, 0, 0.2)
    source.eval()
    want = _out(source)
    assert (want - _out(build())).abs().max() > 1e-3
    source.save_pretrained(str(tmp_path / "a"))
    saved = _file(tmp_path / "a")
    # the pair, once, under the tuner-level keys, as peft draws it from the key
    A, B = VF.projections(kwargs.get("projection_prng_key", 0), kwargs["r"], shape_A[1], shape_B[0])
    assert torch.equal(saved["base_model.vera_A"], A) and torch.equal(saved["base_model.vera_B"], B)
    assert sum("vera_A" in k or "vera_B" in k for k in saved) == 2
    if direction == "peft->deltatune":
        target = dt.PeftModel.from_pretrained(build(), str(tmp_path / "a"))
    else:
        target = _peft_load(build, tmp_path / "a")
    torch.testing.assert_close(_out(target), want, rtol=0, atol=1e-5)
    target.save_pretrained(str(tmp_path / "b"))
    again = _file(tmp_path / "b")
    assert sorted(again) == sorted(saved)
    assert all(torch.equal(again[k], saved[k]) for k in saved)
    ja, jb = (json.load(open(tmp_path / d / "adapter_config.json")) for d in "ab")
    assert set(ja) ^ set(jb) <= {"peft_version"} and ja["save_projection"] is jb["save_projection"] is True


def _replace_projections(peft_model, seed):
    """Overwrite peft's pair (in place) with other values: a file whose pair the key does not regenerate."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for buffers in (peft_model.base_model.vera_A, peft_model.base_model.vera_B):
            for t in buffers.values():
                t.copy_(torch.randn(t.shape, generator=g))


def test_a_file_whose_projections_differ_from_the_regenerated_ones_loads_with_the_files(tmp_path):
    pm = _peft(tiny_llama, r=4, target_modules=LLAMA)
    perturb_trainable(pm, 1, 0.2)
    _replace_projections(pm, 9)
    pm.eval()
    want = _out(pm)
    pm.save_pretrained(str(tmp_path))
    dm = dt.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(_out(dm), want, rtol=0, atol=1e-5)
    # (control: the pair regenerated from the key gives other outputs)
    regen = dt.get_peft_model(tiny_llama(), VeraConfig(r=4, target_modules=LLAMA, save_projection=False))
    dt.set_peft_model_state_dict(regen, {k: v for k, v in _file(tmp_path).items() if "vera_lambda" in k})
    assert (_out(regen) - want).abs().max() > 1e-3
    # merge / unmerge with the file's pair, and the merged weights equal peft's
    before = {k: v.clone() for k, v in dm.state_dict().items()}
    dm.merge_adapter(safe_merge=True)
    torch.testing.assert_close(_out(dm), want, rtol=0, atol=1e-5)
    dm.unmerge_adapter()
    for k, v in dm.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-5, msg=k)
    merged_p = copy.deepcopy(pm).merge_and_unload().state_dict()
    merged_d = copy.deepcopy(dm).merge_and_unload().state_dict()
    assert sorted(merged_p) == sorted(merged_d)
    for k in merged_p:
        torch.testing.assert_close(merged_d[k], merged_p[k], rtol=0, atol=1e-5, msg=k)
    # a config that says save_projection=False still uses a pair the file holds (peft would regenerate)
    config = json.load(open(tmp_path / "adapter_config.json"))
    json.dump({**config, "save_projection": False}, open(tmp_path / "adapter_config.json", "w"))
    off = dt.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(_out(off), want, rtol=0, atol=1e-5)


def test_peft_later_adapter_file_holds_the_first_adapters_larger_pair_and_loads_alone(tmp_path):
    # peft's second adapter reuses the first one's (4, 64) pair although its own targets need (4, 32)
    pm = _peft(tiny_llama, r=4, target_modules=LLAMA)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_adapter("b", peft.VeraConfig(r=4, target_modules=["q_proj"], d_initial=0.3))
    pm.set_adapter("b")
    perturb_trainable(pm, 2, 0.2)
    pm.eval()
    want_b = _out(pm)
    pm.save_pretrained(str(tmp_path))
    assert _file(tmp_path / "b")["base_model.vera_A"].shape == (4, 64)
    dm = dt.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "b"), adapter_name="b")
    proj = dm.base_model.model.model.layers[0].self_attn.q_proj.adapters["b"].projections
    assert proj.vera_A.shape == (4, 64) and proj.needed() == (32, 32)
    torch.testing.assert_close(_out(dm), want_b, rtol=0, atol=1e-5)
    # both adapters of peft's folder, loaded into one deltatune model
    both = dt.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    both.load_adapter(str(tmp_path / "b"), "b")
    both.set_adapter("b")
    torch.testing.assert_close(_out(both), want_b, rtol=0, atol=1e-5)
    pm.set_adapter("default")
    both.set_adapter("default")
    torch.testing.assert_close(_out(both), _out(pm), rtol=0, atol=1e-5)


def test_several_deltatune_adapters_load_into_peft_and_merge(tmp_path):
    first = dict(r=4, target_modules=LLAMA)
    second = dict(r=4, target_modules=["q_proj", "down_proj"], d_initial=0.3)  # same largest sizes: same pair
    dm = dt.get_peft_model(tiny_llama(), VeraConfig(**first))
    dm.add_adapter("b", VeraConfig(**second))
    dm.set_adapter(["default", "b"])
    perturb_trainable(dm, 3, 0.2)
    dm.eval()
    both = _out(dm)
    dm.save_pretrained(str(tmp_path))
    pm = _peft_load(tiny_llama, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.load_adapter(str(tmp_path / "b"), "b")
    pm.base_model.set_adapter(["default", "b"])
    torch.testing.assert_close(_out(pm.eval()), both, rtol=0, atol=1e-5)
    for name in ("default", "b"):
        pm.base_model.set_adapter(name)
        dm.set_adapter(name)
        torch.testing.assert_close(_out(pm), _out(dm), rtol=0, atol=1e-5)
    dm.set_adapter(["default", "b"])
    dm.merge_adapter()
    torch.testing.assert_close(_out(dm), both, rtol=0, atol=1e-5)
    dm.unmerge_adapter()
    torch.testing.assert_close(_out(dm), both, rtol=0, atol=1e-5)


def _saved(tmp_path, **changes):
    """A deltatune VeRA folder whose safetensors has ``changes`` applied (None: key removed)."""
    dm = dt.get_peft_model(tiny_llama(), VeraConfig(r=4, target_modules=LLAMA))
    perturb_trainable(dm, 4, 0.2)
    dm.save_pretrained(str(tmp_path))
    tensors = _file(tmp_path)
    for key, value in changes.items():
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    return dm


@pytest.mark.parametrize("changes, message", [
    ({"base_model.vera_A": torch.zeros(8, 64)}, r"vera_A has shape \(8, 64\) but this VeRA adapter needs \(4, >= 64\)"),
    ({"base_model.vera_A": torch.zeros(4, 32)}, r"vera_A has shape \(4, 32\) but .* needs \(4, >= 64\)"),
    ({"base_model.vera_B": torch.zeros(16, 4)}, r"vera_B has shape \(16, 4\) but .* needs \(>= 32, 4\)"),
    ({"base_model.vera_B": torch.zeros(32, 4, dtype=torch.int64)}, r"vera_B has dtype torch.int64"),
    ({"base_model.vera_B": None}, r"holds \['vera_A'\] without \['vera_B'\]"),
    # a good pair with a bad layer tensor: the pair is not adopted either (all-or-nothing)
    ({"base_model.vera_A": torch.ones(4, 64), "base_model.model.model.layers.0.self_attn.q_proj.vera_lambda_d":
      torch.zeros(5)}, r"'base_model.model.model.layers.0.self_attn.q_proj.vera_lambda_d' has shape \(5,\)"),
])
def test_bad_projections_in_a_file_are_refused_by_name_with_nothing_changed(changes, message, tmp_path):
    _saved(tmp_path, **changes)
    model = dt.get_peft_model(tiny_llama(), VeraConfig(r=4, target_modules=LLAMA))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    proj = model.base_model.model.model.layers[0].self_attn.q_proj.adapters["default"].projections
    pair = (proj.vera_A.clone(), proj.vera_B.clone())
    with pytest.raises(dt.CheckpointError, match=message + r".*left unchanged"):
        model.load_adapter(str(tmp_path), "x")
    with pytest.raises(dt.CheckpointError, match=message):
        dt.set_peft_model_state_dict(model, _file(tmp_path))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(proj.vera_A, pair[0]) and torch.equal(proj.vera_B, pair[1])


def test_projections_of_a_file_need_a_vera_adapter(tmp_path):
    _saved(tmp_path)
    lora = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=LLAMA))
    vera_keys = {k: v for k, v in _file(tmp_path).items() if k.startswith("base_model.vera_")}
    with pytest.raises(dt.CheckpointError, match=r"holds VeRA projections \['vera_A', 'vera_B'\] but adapter "
                                                 r"'default' has no VeRA layers"):
        dt.set_peft_model_state_dict(lora, vera_keys)


def test_a_file_without_its_projections_warns_and_regenerates_them(tmp_path):
    source = _saved(tmp_path, **{"base_model.vera_A": None, "base_model.vera_B": None})
    with pytest.warns(UserWarning, match=r"2 tensors were not in the checkpoint .*base_model.vera_A"):
        loaded = dt.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(_out(loaded), _out(source), rtol=0, atol=1e-6)


def test_state_dicts_and_low_cpu_mem_usage_carry_the_projections(tmp_path):
    dm = dt.get_peft_model(tiny_llama(), VeraConfig(r=4, target_modules=LLAMA))
    perturb_trainable(dm, 5, 0.2)
    live = dt.get_peft_model_state_dict(dm)
    # the pair is not in model.state_dict() (non-persistent: it would appear once per layer), but a state dict
    # given for saving still yields it, taken live
    assert not any("vera_A" in k for k in dm.state_dict())
    given = dt.get_peft_model_state_dict(dm, state_dict=dm.state_dict())
    assert sorted(given) == sorted(live) and "base_model.vera_A" in given
    dm.save_pretrained(str(tmp_path), state_dict=dm.state_dict())
    assert torch.equal(_file(tmp_path)["base_model.vera_B"], live["base_model.vera_B"])
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), str(tmp_path), low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in loaded.parameters())
    torch.testing.assert_close(_out(loaded), _out(dm), rtol=0, atol=1e-6)
    # and a bare model adapted in place keys the pair at its root
    bare = dt.inject_adapter_in_model(VeraConfig(r=4, target_modules=LLAMA), tiny_llama())
    keys = dt.get_peft_model_state_dict(bare, config=VeraConfig(r=4, target_modules=LLAMA))
    assert {"vera_A", "vera_B"} <= set(keys)


def test_one_config_adapting_two_models_gives_each_its_own_pair_sized_over_its_own_layers():
    """The pair is shared by the layers of one injection only (no state outside the model): the same config
    object adapting a second model, before the first model's pair is drawn, does not join the first's."""
    config = VeraConfig(r=4, target_modules=LLAMA, save_projection=False)  # (True draws the pair when saved
    first = dt.get_peft_model(tiny_llama(), config)                         # tensors are listed)
    wide = tiny_llama()
    wide.model.layers[0].mlp.down_proj = torch.nn.Linear(100, 32)  # a larger input than the first model has
    second = dt.inject_adapter_in_model(config, torch.nn.ModuleDict({"inner": wide}))

    def pairs(model):
        return {id(m.projections): m.projections for m in model.modules() if hasattr(m, "vera_lambda_d")}

    (p1,), (p2,) = pairs(first).values(), pairs(second).values()
    assert p1 is not p2
    assert all(not name.startswith("inner.") for name in p1.sizes)
    assert all(name.startswith("inner.") for name in p2.sizes) and len(p2.sizes) == len(p1.sizes)
    assert p1.needed() == (64, 32) and p2.needed() == (100, 32)
    A, _ = VF.projections(0, 4, 64, 32)
    with torch.no_grad():
        first(**text_inputs())
    assert torch.equal(p1.vera_A, A)  # as peft draws it for the first model alone
