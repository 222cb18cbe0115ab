"""AutoPeftModel*: the base model named in the adapter's config, then the adapter; as peft's Auto classes."""

from __future__ import annotations

import peft
import pytest
import torch

import deltatune as dt
from conftest import main_output, random_lora, text_inputs, tiny_llama


@pytest.fixture
def folders(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base_dir)
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"],
                                                          base_model_name_or_path=str(base_dir)))
    random_lora(model, seed=5)
    model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir, model


@pytest.mark.parametrize("auto", [dt.AutoPeftModelForCausalLM, dt.AutoPeftModel])
def test_loads_the_named_base_and_the_adapter(folders, auto):
    base_dir, adapter_dir, trained = folders
    model = auto.from_pretrained(str(adapter_dir))
    assert isinstance(model, dt.PeftModelForCausalLM) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir))
    inputs = text_inputs()
    with torch.no_grad():
        got = main_output(model(**inputs))
        torch.testing.assert_close(got, main_output(trained.eval()(**inputs)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, main_output(theirs(**inputs)), rtol=1e-5, atol=1e-5)
    trainable = dt.AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir), is_trainable=True, dtype=torch.float64)
    assert any(p.requires_grad for p in trainable.parameters())
    assert trainable.base_model.model.model.embed_tokens.weight.dtype == torch.float64  # kwargs reach transformers


def test_refusals(folders, tmp_path):
    _, adapter_dir, _ = folders
    with pytest.raises(ValueError, match="SEQ_CLS"):
        dt.AutoPeftModelForSequenceClassification.from_pretrained(str(adapter_dir))
    bare = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    bare.base_model.model.config.name_or_path = ""
    bare.save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="names no base model"):
        dt.AutoPeftModel.from_pretrained(str(tmp_path / "bare"))
    with pytest.raises(TypeError, match="from_pretrained"):
        dt.AutoPeftModel()
