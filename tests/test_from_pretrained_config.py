"""``PeftModel.from_pretrained(config=c)``: ``c`` itself is the adapter's config, and it is never changed."""

from __future__ import annotations

import pytest

import deltatune as dt
from conftest import tiny_llama


def test_config_passed_is_kept_and_not_mutated(tmp_path):
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    config = dt.LoraConfig.from_pretrained(tmp_path)
    assert config.inference_mode  # saved adapters say so, as peft writes them
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path, config=config)
    assert loaded.peft_config["default"] is config
    trainable = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path, config=config, is_trainable=True)
    assert config.inference_mode  # peft would have flipped it on the caller's object
    assert trainable.peft_config["default"] is not config and not trainable.peft_config["default"].inference_mode
    assert any(p.requires_grad for p in trainable.parameters())


def test_device_map_as_peft_takes_it(tmp_path):
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    for device_map in ("cpu", {"": "cpu"}, "auto"):
        loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path, device_map=device_map)
        assert all(p.device.type == "cpu" for p in loaded.parameters())
        loaded.load_adapter(tmp_path, "second", device_map=device_map)
    with pytest.raises(TypeError, match="unexpected keyword"):
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path, no_such_option=1)
