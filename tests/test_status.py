"""get_layer_status / get_model_status give peft's answers for the same adapters."""

from __future__ import annotations

import dataclasses

import peft
import torch

import deltatune as dt
from conftest import tiny_gpt2_cls


def _pair(tmp_path):
    config = dict(task_type="SEQ_CLS", r=4, target_modules=["c_attn", "c_fc"])
    pm = peft.get_peft_model(tiny_gpt2_cls(), peft.LoraConfig(**config))
    pm.add_adapter("other", peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["c_attn"]))
    pm.save_pretrained(tmp_path)
    dm = dt.PeftModel.from_pretrained(tiny_gpt2_cls(), str(tmp_path), is_trainable=True)
    dm.load_adapter(str(tmp_path / "other"), "other", is_trainable=True)
    pm = peft.PeftModel.from_pretrained(tiny_gpt2_cls(), str(tmp_path), is_trainable=True)
    pm.load_adapter(str(tmp_path / "other"), "other", is_trainable=True)
    return pm, dm


def _fields(status, skip=("module_type", "adapter_model_type")):
    return {k: v for k, v in dataclasses.asdict(status).items() if k not in skip}


def test_layer_and_model_status_match_peft(tmp_path):
    pm, dm = _pair(tmp_path)
    # (peft leaves an inactive adapter loaded with is_trainable=True trainable, deltatune trains the active
    # adapters only; set_adapter makes both libraries agree: the active adapter trains, the others do not)
    pm.set_adapter("default"), dm.set_adapter("default")
    pm.base_model.model.score.modules_to_save["other"].requires_grad_(False)  # (peft keeps this inactive copy trainable)
    for step in ("loaded", "merged", "switched"):
        if step == "merged":
            pm.merge_adapter(["other"])
            dm.merge_adapter(["other"])
        if step == "switched":
            pm.unmerge_adapter(), dm.unmerge_adapter()
            pm.set_adapter("other"), dm.set_adapter("other")
            pm.base_model.model.score.modules_to_save["default"].requires_grad_(False)
        theirs = {s.name: _fields(s) for s in pm.get_layer_status()}
        ours = {s.name: _fields(s) for s in dm.get_layer_status()}
        assert ours == theirs, step
        assert _fields(dt.get_model_status(dm)) == _fields(peft.get_model_status(pm)), step
    assert dm.get_model_status().adapter_model_type == pm.get_model_status().adapter_model_type == "LoraModel"
    assert dm.get_model_status().merged_adapters == []
    assert any(s.merged_adapters for s in dm.get_layer_status()) is False


def test_a_model_without_adapters_is_refused():
    import pytest

    with pytest.raises(ValueError, match="no adapter layers"):
        dt.get_layer_status(torch.nn.Linear(2, 2))
