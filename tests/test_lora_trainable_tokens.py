"""LoRA's ``trainable_token_indices``: listed embedding rows train beside the adapter, as peft does."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import tiny_gpt2_lm, tiny_llama
from safetensors.torch import load_file

import deltatune as dt

TOKENS = [1, 5, 7]


def _ids():
    ids = torch.randint(3, 60, (2, 6), generator=torch.Generator().manual_seed(1))
    ids[0, 0], ids[1, 2] = 5, 7  # listed tokens in the input
    return ids


@pytest.mark.parametrize("build,targets", [(tiny_llama, ["q_proj"]), (tiny_gpt2_lm, ["c_attn"])],
                         ids=["llama", "gpt2-tied-head"])
def test_checkpoints_both_ways(build, targets, tmp_path):
    theirs = peft.get_peft_model(build(), peft.LoraConfig(r=2, target_modules=targets, trainable_token_indices=TOKENS,
                                                          init_lora_weights=False))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    theirs.eval().save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = theirs(input_ids=_ids()).logits
    ours = dt.PeftModel.from_pretrained(build(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=_ids()).logits, expected, atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path / "ours")
    assert sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == \
        sorted(load_file(tmp_path / "peft" / "adapter_model.safetensors"))  # the embedding's rows only
    back = peft.PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=_ids()).logits, expected, atol=1e-5, rtol=0)


def test_only_listed_rows_train_and_merge_writes_them():
    model = dt.get_peft_model(tiny_gpt2_lm(), dt.LoraConfig(r=2, target_modules=["c_attn"],
                                                             trainable_token_indices=TOKENS, task_type="CAUSAL_LM"))
    base_weight = model.base_model.model.transformer.wte.base_layer.weight
    before = base_weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(2):
        model(input_ids=_ids(), labels=_ids()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(base_weight, before)  # the stored weight never changes while training
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=_ids()).logits
    merged = model.merge_and_unload()
    changed = (merged.transformer.wte.weight != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == TOKENS  # exactly the listed rows, written back
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=_ids()).logits, trained, atol=1e-5, rtol=0)
