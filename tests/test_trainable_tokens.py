"""Trainable tokens against peft: checkpoints both ways, only the listed rows train (tied heads too),
merges, several adapters, refusals (bad configs, overlaps, mixed-adapter batches, untied heads)."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from conftest import main_output, perturb_trainable, text_inputs, tiny_bert_cls, tiny_gpt2_lm, tiny_llama
from deltatune.adapter_layer import check_layer
from deltatune.config import ConfigError
from deltatune.methods.trainable_tokens import (TrainableTokensConfig, TrainableTokensLayer, attach_token_rows,
                                                resolve_config, tied_heads)
from deltatune.methods.trainable_tokens import functional as TF

IDS = [3, 5, 7, 40]

CASES = [  # (id, build, kwargs for both libraries' TrainableTokensConfig)
    ("llama", tiny_llama, dict(target_modules=["embed_tokens"])),
    ("llama-regex", tiny_llama, dict(target_modules="model.embed_tokens")),
    ("bert", tiny_bert_cls, dict(target_modules=["word_embeddings"])),
]


def _config(lib, **kwargs):
    return lib.TrainableTokensConfig(**kwargs)


def _inputs():
    inputs = text_inputs(batch=2, seq=9)
    inputs["input_ids"][0, :4] = torch.tensor(IDS)  # every listed token occurs, and others do too
    inputs["input_ids"][1, 2] = IDS[1]
    return inputs


def _out(model, inputs=None):
    with torch.no_grad():
        return main_output(model(**(inputs or _inputs())))


def _base_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "adapters." not in k}


# ----------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("direction", ["peft->deltatune", "deltatune->peft"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_checkpoints_load_in_the_other_library(case, direction, tmp_path):
    _, build, kwargs = case
    src, dst = (peft, dt) if direction == "peft->deltatune" else (dt, peft)
    source = src.get_peft_model(build(), _config(src, token_indices=IDS, **kwargs))
    perturb_trainable(source, 0, 0.5)
    want = _out(source)
    assert (want - _out(build())).abs().max() > 1e-3
    source.save_pretrained(str(tmp_path / "a"))
    target = dst.PeftModel.from_pretrained(build(), str(tmp_path / "a"))
    torch.testing.assert_close(_out(target), want, rtol=0, atol=1e-5)
    target.save_pretrained(str(tmp_path / "b"))
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in "ab")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert all(k.endswith(".trainable_tokens_delta") and v.shape == (len(IDS), 32) for k, v in a.items())
    ja, jb = (json.load(open(tmp_path / d / "adapter_config.json")) for d in "ab")
    same = set(ja) - {"peft_version", "auto_mapping"}  # (auto_mapping: only peft records the model class)
    assert set(ja) ^ set(jb) <= {"peft_version"} and {k: ja[k] for k in same} == {k: jb[k] for k in same}


@pytest.mark.parametrize("direction", ["peft->deltatune", "deltatune->peft"])
def test_default_target_and_tied_head_load_in_the_other_library(direction, tmp_path):
    """No target_modules: the input embedding, and the tied GPT-2 head follows it; the file holds both
    modules' rows and the config names the embedding only, as peft writes it."""
    src, dst = (peft, dt) if direction == "peft->deltatune" else (dt, peft)
    source = src.get_peft_model(tiny_gpt2_lm(), _config(src, token_indices=IDS))
    perturb_trainable(source, 0, 0.5)
    want = _out(source)
    source.save_pretrained(str(tmp_path / "a"))
    assert json.load(open(tmp_path / "a" / "adapter_config.json"))["target_modules"] == "transformer.wte"
    assert sorted(load_file(str(tmp_path / "a" / "adapter_model.safetensors"))) == [
        "base_model.model.lm_head.trainable_tokens_delta", "base_model.model.transformer.wte.trainable_tokens_delta"]
    target = dst.PeftModel.from_pretrained(tiny_gpt2_lm(), str(tmp_path / "a"))
    torch.testing.assert_close(_out(target), want, rtol=0, atol=1e-5)


def test_default_target_resolves_on_a_copy():
    config = TrainableTokensConfig(token_indices=IDS)
    resolved = resolve_config(tiny_llama(), config)
    assert resolved.target_modules == "model.embed_tokens" and config.target_modules is None
    assert resolve_config(tiny_llama(), resolved) is resolved
    assert resolve_config(nn.Sequential(nn.Linear(2, 2)), config).target_modules == "embed_tokens"  # peft's fallback
    gpt2 = tiny_gpt2_lm()
    assert tied_heads(gpt2, ["transformer.wte"]) == ["lm_head"]
    assert tied_heads(tiny_llama(), ["model.embed_tokens"]) == []  # (Llama's head has its own weight)
    assert tied_heads(gpt2, ["transformer.wte", "lm_head"]) == []


def test_targeting_a_tied_embedding_wraps_its_head():
    """Targeting only a tied embedding: the head sharing its weight is adapted too (with the same rows), or
    it would compute with the old rows, other outputs than peft's."""
    model = dt.get_peft_model(tiny_gpt2_lm(), TrainableTokensConfig(token_indices=IDS, target_modules=["wte"]))
    inner = model.base_model.model
    assert inner.lm_head.tied_to(inner.transformer.wte, "default")
    assert model.peft_config["default"].target_modules == ["wte"]  # (saved as given: peft wraps the head too)


# ----------------------------------------------------------------------------------- training
def _train(model, steps=3, lr=0.05):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    inputs = _inputs()
    model.train()
    for _ in range(steps):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("tied", [False, True], ids=["llama", "gpt2-tied"])
def test_training_changes_only_the_listed_rows(tied):
    build, targets = (tiny_gpt2_lm, ["wte", "lm_head"]) if tied else (tiny_llama, ["embed_tokens"])
    model = dt.get_peft_model(build(), TrainableTokensConfig(token_indices=IDS, target_modules=targets))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0].endswith("trainable_tokens_delta")
    base = _base_state(model)
    inner = model.base_model.model
    emb = inner.transformer.wte if tied else inner.model.embed_tokens
    start = emb.adapters["default"].trainable_tokens_delta.detach().clone()
    _train(model)
    after = _base_state(model)
    assert all(torch.equal(after[k], base[k]) for k in base)  # every base tensor bit-identical
    rows = emb.adapters["default"].trainable_tokens_delta.detach()
    assert (rows - start).abs().amax(dim=1).gt(0).all()  # every listed row moved
    merged = copy.deepcopy(model).merge_and_unload()
    weight = merged.get_input_embeddings().weight.detach()
    others = [i for i in range(weight.shape[0]) if i not in IDS]
    original = base["base_model.model." + ("transformer.wte" if tied else "model.embed_tokens") + ".base_layer.weight"]
    assert torch.equal(weight[others], original[others]) and torch.equal(weight[IDS], rows.to(weight.dtype))
    if tied:  # the head computed with the same rows (one tensor, seen by both) and merges them too
        head = inner.lm_head
        assert head.tied_to(emb, "default")
        assert torch.equal(merged.lm_head.weight[IDS], rows) and torch.equal(merged.lm_head.weight[others],
                                                                             original[others])
    torch.testing.assert_close(_out(merged), _out(model), rtol=0, atol=1e-5)
    if tied:  # a merge gives the head and the embedding their own weights: a later adapter still ties them
        model.merge_adapter()
        model.unmerge_adapter()
        assert inner.lm_head.base_layer.weight is not emb.base_layer.weight
        for twin in (model, copy.deepcopy(model)):
            twin.add_adapter("second", TrainableTokensConfig(token_indices=[50], target_modules=targets))
            twin_inner = twin.base_model.model
            assert twin_inner.lm_head.tied_to(twin_inner.transformer.wte, "second")


def test_training_matches_peft_step_for_step():
    """Same start, same optimizer: peft's rows and deltatune's agree after training."""
    kwargs = dict(token_indices=IDS, target_modules=["embed_tokens"])
    pm = peft.get_peft_model(tiny_llama(), peft.TrainableTokensConfig(**kwargs))
    dm = dt.get_peft_model(tiny_llama(), TrainableTokensConfig(**kwargs))
    _train(pm)
    _train(dm)
    p_rows = dict(pm.named_parameters())["base_model.model.model.embed_tokens.trainable_tokens_delta.default"]
    d_rows = dm.base_model.model.model.embed_tokens.adapters["default"].trainable_tokens_delta
    torch.testing.assert_close(d_rows, p_rows, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("tied", [False, True], ids=["llama", "gpt2-tied"])
def test_merge_writes_the_rows_and_unmerge_restores_them_bit_for_bit(tied):
    build, targets = (tiny_gpt2_lm, ["wte", "lm_head"]) if tied else (tiny_llama, ["embed_tokens"])
    model = dt.get_peft_model(build(), TrainableTokensConfig(token_indices=IDS, target_modules=targets))
    perturb_trainable(model, 1, 0.5)
    unmerged = _out(model)
    base = _base_state(model)
    model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(_out(model), unmerged, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    assert all(torch.equal(v, base[k]) for k, v in _base_state(model).items())
    torch.testing.assert_close(_out(model), unmerged, rtol=0, atol=1e-5)


def test_merge_and_unload_equals_peft():
    kwargs = dict(token_indices=IDS, target_modules=["embed_tokens"])
    pm = peft.get_peft_model(tiny_llama(), peft.TrainableTokensConfig(**kwargs))
    perturb_trainable(pm, 2, 0.5)
    dm = dt.get_peft_model(tiny_llama(), TrainableTokensConfig(**kwargs))
    dt.set_peft_model_state_dict(dm, peft.get_peft_model_state_dict(pm))
    merged_p, merged_d = pm.merge_and_unload().state_dict(), dm.merge_and_unload().state_dict()
    assert sorted(merged_p) == sorted(merged_d)
    assert all(torch.equal(merged_d[k], merged_p[k]) for k in merged_p)


def test_safe_merge_refuses_non_finite_rows_and_changes_nothing():
    model = dt.get_peft_model(tiny_llama(), TrainableTokensConfig(token_indices=IDS, target_modules=["embed_tokens"]))
    with torch.no_grad():
        model.base_model.model.model.embed_tokens.adapters["default"].trainable_tokens_delta[1, 0] = float("nan")
    base = _base_state(model)
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    assert all(torch.equal(v, base[k]) for k, v in _base_state(model).items())


# ----------------------------------------------------------------------------------- several adapters
def test_several_adapters_match_peft_and_overlaps_are_refused(tmp_path):
    first, second = dict(token_indices=IDS[:2]), dict(token_indices=[IDS[2], 50])
    target = dict(target_modules=["embed_tokens"])
    pm = peft.get_peft_model(tiny_llama(), peft.TrainableTokensConfig(**first, **target))
    pm.add_adapter("other", peft.TrainableTokensConfig(**second, **target))
    dm = dt.get_peft_model(tiny_llama(), TrainableTokensConfig(**first, **target))
    dm.add_adapter("other", TrainableTokensConfig(**second, **target))
    for name in ("default", "other"):
        pm.set_adapter(name)
        perturb_trainable(pm, 3, 0.5)
    for name in ("default", "other"):
        dt.set_peft_model_state_dict(dm, peft.get_peft_model_state_dict(pm, adapter_name=name), adapter_name=name)
    for names in ("default", "other", ["default", "other"]):
        pm.base_model.set_adapter(names)
        dm.set_adapter(names)
        torch.testing.assert_close(_out(dm), _out(pm), rtol=0, atol=1e-5)
    dm.save_pretrained(str(tmp_path))  # the non-default adapter in its sub-folder, loadable by peft
    back = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "other"))
    dm.set_adapter("other")
    torch.testing.assert_close(_out(back), _out(dm), rtol=0, atol=1e-5)
    dm.add_adapter("c", TrainableTokensConfig(token_indices=[IDS[0], 60], **target))
    dm.set_adapter(["default", "c"])
    with pytest.raises(ValueError, match="disjunct"):
        dm(**_inputs())
    dm.set_adapter("default")
    dm.merge_adapter()
    base = _base_state(dm)
    with pytest.raises(ValueError, match="disjunct"):
        dm.merge_adapter(["c"])
    assert all(torch.equal(v, base[k]) for k, v in _base_state(dm).items())


def test_mixed_adapter_batches_are_refused_clearly():
    model = dt.get_peft_model(tiny_llama(), TrainableTokensConfig(token_indices=IDS, target_modules=["embed_tokens"]))
    model.add_adapter("b", TrainableTokensConfig(token_indices=[50], target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="TRAINABLE_TOKENS.*cannot run in a mixed-adapter batch"):
        model(**_inputs(), adapter_names=["default", "b"])


# ----------------------------------------------------------------------------------- layer and config
def test_layer_math_and_protocol():
    emb = nn.Embedding(10, 4, padding_idx=0)
    layer = TrainableTokensLayer(emb)
    check_layer(layer)
    assert (layer.in_features, layer.out_features) == (10, 4)
    layer.add_adapter("a", [0, 6], init_weights=False)
    layer.set_active(["a"])
    x = torch.tensor([[0, 6, 2, 6]])
    rows = layer.adapters["a"].trainable_tokens_delta
    want = TF.replace_rows(emb.weight, torch.tensor([0, 6]), rows)[x]
    torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
    layer(x).sum().backward()  # the padding row gets no gradient, as in the base embedding; row 6 gets two
    torch.testing.assert_close(rows.grad, torch.tensor([[0.0] * 4, [2.0] * 4]))
    head = TrainableTokensLayer(nn.Linear(4, 10))
    head.add_adapter("a", [1, 9], init_weights=False)
    head.set_active(["a"])
    h = torch.randn(3, 4)
    torch.testing.assert_close(head(h), nn.functional.linear(
        h, TF.replace_rows(head.base_layer.weight, torch.tensor([1, 9]), head.adapters["a"].trainable_tokens_delta),
        head.base_layer.bias), rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="nn.Embedding"):
        TrainableTokensLayer(nn.Conv1d(2, 2, 1))
    for bad in ([], [10]):
        with pytest.raises(ValueError):
            layer.add_adapter("b", bad)
    assert list(layer.adapters) == ["a"]


def test_identity_at_init_and_bad_configs_leave_the_model_unchanged():
    inputs = _inputs()
    model = tiny_llama()
    want = _out(model, inputs)
    dm = dt.get_peft_model(model, TrainableTokensConfig(token_indices=IDS, target_modules=["embed_tokens"]))
    torch.testing.assert_close(_out(dm, inputs), want, rtol=0, atol=0)
    for bad in (dict(token_indices=[1, 1]), dict(token_indices=[-1]), dict(token_indices=[True]),
                dict(token_indices="3"), dict(token_indices=[1], init_weights="yes")):
        with pytest.raises(ConfigError):
            TrainableTokensConfig(**bad)
    with pytest.raises(ConfigError, match="modules_to_save"):  # a head that must train: refused, not ignored
        dt.get_peft_model(tiny_bert_cls(), TrainableTokensConfig(task_type="SEQ_CLS", token_indices=IDS))
    fresh = tiny_llama()
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="out of range"):
        dt.get_peft_model(fresh, TrainableTokensConfig(token_indices=[3, 64], target_modules=["embed_tokens"]))
    assert not any(isinstance(m, TrainableTokensLayer) for m in fresh.modules())
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())
    with pytest.raises(TypeError, match="input_layernorm.*nn.Embedding"):
        dt.get_peft_model(tiny_llama(), TrainableTokensConfig(token_indices=IDS, target_modules=["input_layernorm"]))
    noisy = dt.get_peft_model(tiny_llama(), TrainableTokensConfig(token_indices=IDS, init_weights=False,
                                                                  target_modules=["embed_tokens"]))
    assert (_out(noisy, inputs) - want).abs().max() > 1e-3


def test_low_cpu_mem_usage_load(tmp_path):
    source = peft.get_peft_model(tiny_llama(), peft.TrainableTokensConfig(token_indices=IDS,
                                                                          target_modules=["embed_tokens"]))
    perturb_trainable(source, 4, 0.5)
    source.save_pretrained(str(tmp_path))
    target = dt.PeftModel.from_pretrained(tiny_llama(), str(tmp_path), low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in target.parameters())
    torch.testing.assert_close(_out(target), _out(source), rtol=0, atol=1e-5)
    target.merge_adapter()
    target.unmerge_adapter()
    torch.testing.assert_close(_out(target), _out(source), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------- reuse by LoRA
class _LoraTokenLayer(TrainableTokensLayer):
    """As LoRA's trainable_token_indices would subclass the layer (its own checkpoint_kind)."""

    checkpoint_kind = "lora_token_rows_test"


def test_attach_token_rows_equals_peft_lora_trainable_token_indices():
    """What LoRA's trainable_token_indices calls: rows in the embedding (a list: the input embedding), the
    tied head following them; outputs equal peft's LoRA with the same rows (LoRA itself at its identity)."""
    pm = peft.get_peft_model(tiny_gpt2_lm(), peft.LoraConfig(target_modules=["c_attn"], trainable_token_indices=IDS))
    rows = dict(pm.named_parameters())["base_model.model.transformer.wte.token_adapter.trainable_tokens_delta.default"]
    with torch.no_grad():
        rows.add_(torch.randn(rows.shape, generator=torch.Generator().manual_seed(5)) * 0.5)
    model = tiny_gpt2_lm()
    assert attach_token_rows(model, IDS, "default", layer_cls=_LoraTokenLayer) == ["transformer.wte", "lm_head"]
    wte, head = model.transformer.wte, model.lm_head
    assert isinstance(wte, _LoraTokenLayer) and head.is_tied("default") and not wte.is_tied("default")
    with torch.no_grad():
        wte.adapters["default"].trainable_tokens_delta.copy_(rows)
    for layer in (wte, head):
        layer.set_active(["default"])
    torch.testing.assert_close(_out(model), _out(pm), rtol=0, atol=1e-5)
    named = tiny_llama()
    assert attach_token_rows(named, {"embed_tokens": [1, 2]}, "x") == ["model.embed_tokens"]
    with pytest.raises(ValueError, match="already has"):
        attach_token_rows(named, {"embed_tokens": [3]}, "x")
    with pytest.raises(ValueError, match="matches 0 modules"):
        attach_token_rows(tiny_llama(), {"nothing": [1]}, "x")


def test_generate_uses_the_rows():
    """Greedy generation through the adapter equals generation by the merged model (and differs from the
    base model's: the listed tokens' rows matter)."""
    model = dt.get_peft_model(tiny_llama(), TrainableTokensConfig(token_indices=IDS, target_modules=["embed_tokens"]))
    perturb_trainable(model, 6, 2.0)
    prompt = torch.tensor([IDS])
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = model.generate(input_ids=prompt, **kwargs)
    base = tiny_llama().generate(input_ids=prompt, **kwargs)
    merged = copy.deepcopy(model).merge_and_unload().generate(input_ids=prompt, **kwargs)
    assert torch.equal(out, merged) and not torch.equal(out, base)
