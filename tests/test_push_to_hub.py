"""``push_to_hub``: the adapter folder goes to huggingface_hub's upload (the Hub itself is stubbed: no network)."""

from __future__ import annotations

import shutil

import huggingface_hub
import torch
from conftest import random_lora, text_inputs, tiny_llama

import deltatune as dt


def test_push_to_hub_uploads_the_adapter_folder(tmp_path, monkeypatch):
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = (repo_id, kwargs)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload"] = (repo_id, kwargs)
        shutil.copytree(folder_path, tmp_path / "uploaded")  # what the Hub would receive
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    random_lora(model)
    assert model.push_to_hub("me/my-adapter", private=True, commit_message="first") == "commit-info"
    assert calls["create"] == ("me/my-adapter", {"token": None, "private": True, "exist_ok": True})
    assert calls["upload"][1]["commit_message"] == "first"
    uploaded = tmp_path / "uploaded"
    assert {p.name for p in uploaded.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), uploaded)
    ids = text_inputs()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
