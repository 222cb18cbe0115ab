"""LoraConfig validation and JSON (de)serialisation."""

from __future__ import annotations

import json

import pytest

import deltatune as dt
from conftest import tiny_bert_cls


@pytest.mark.parametrize("kwargs,field", [
    (dict(r=0), "r"), (dict(r=-2), "r"), (dict(r=2.5), "r"),
    (dict(lora_alpha=0), "lora_alpha"), (dict(lora_alpha=-1.0), "lora_alpha"),
    (dict(lora_dropout=1.0), "lora_dropout"), (dict(lora_dropout=-0.1), "lora_dropout"),
    (dict(bias="some"), "bias"), (dict(init_lora_weights="pizza"), "init_lora_weights"),
    (dict(rank_pattern={"q": 0}), "rank_pattern"), (dict(task_type="CLASSIFY"), "task_type"),
])
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(dt.ConfigError, match=field):
        dt.LoraConfig(target_modules=["q"], **kwargs)


def test_json_round_trip(tmp_path):
    config = dt.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.05, target_modules=["v", "q"], use_rslora=True,
                           rank_pattern={"q": 2}, alpha_pattern={"v": 3}, bias="lora_only",
                           task_type=dt.TaskType.CAUSAL_LM, modules_to_save=["lm_head"], layers_to_transform=[0])
    config.save_pretrained(str(tmp_path))
    data = json.load(open(tmp_path / "adapter_config.json"))
    assert data["peft_type"] == "LORA" and data["task_type"] == "CAUSAL_LM" and data["target_modules"] == ["q", "v"]
    loaded = dt.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(loaded, dt.LoraConfig)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.scaling_for("model.q") == pytest.approx(16 / 2 ** 0.5)  # r from rank_pattern, rsLoRA
    assert loaded.scaling_for("model.v") == pytest.approx(3 / 4 ** 0.5)  # alpha from alpha_pattern


def test_unknown_keys_warn_and_unsupported_features_fail():
    data = dt.LoraConfig(target_modules=["q"]).to_dict()
    with pytest.warns(UserWarning, match="brand_new_option"):
        dt.PeftConfig.from_dict({**data, "brand_new_option": 3})
    with pytest.raises(dt.ConfigError, match="use_qalora"):
        dt.PeftConfig.from_dict({**data, "use_qalora": True})
    with pytest.raises(dt.ConfigError, match="lora_bias"):  # supported, but not with DoRA (as in peft)
        dt.PeftConfig.from_dict({**data, "lora_bias": True, "use_dora": True})
    assert dt.PeftConfig.from_dict({**data, "use_dora": True}).use_dora
    with pytest.raises(ValueError, match="peft_type"):
        dt.PeftConfig.from_dict({**data, "peft_type": "NOT_A_METHOD"})


def test_corrupt_config_file(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(dt.ConfigError, match="not valid JSON"):
        dt.PeftConfig.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        dt.PeftConfig.from_pretrained(str(tmp_path / "missing"))


def test_config_is_not_mutated():
    config = dt.LoraConfig(task_type="SEQ_CLS", target_modules=["query"])
    before = config.to_dict()
    model = dt.get_peft_model(tiny_bert_cls(), config)
    assert config.to_dict() == before and config.modules_to_save is None
    assert model.peft_config["default"].modules_to_save == ["classifier", "score"]
