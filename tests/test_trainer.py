"""A stock transformers ``Trainer`` with default ``TrainingArguments`` trains a deltatune model."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import Trainer, TrainingArguments

import deltatune as dt
from conftest import tiny_bert_cls, tiny_llama


class _Rows(torch.utils.data.Dataset):
    """Tokenised rows plus a raw text column, as a tokenised dataset holds them."""

    def __init__(self, n=16, seq=6, label_fn=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 60, (n, seq), generator=g)
        self.label_fn = label_fn

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        row = {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "text": f"row {i}"}
        row["labels"] = self.label_fn(self.ids[i]) if self.label_fn else self.ids[i]
        return row


@pytest.mark.parametrize("task", ["CAUSAL_LM", "SEQ_CLS"])
def test_default_training_arguments_train_the_adapter(tmp_path, task):
    """Trainer keeps the dataset columns the model's forward names: the task wrappers name theirs (before,
    ``forward(*args, **kwargs)`` made it drop every column: "The batch received was empty")."""
    if task == "CAUSAL_LM":
        base, rows = tiny_llama(), _Rows()
        config = dt.LoraConfig(task_type=task, r=4, target_modules=["q_proj", "v_proj"])
    else:
        base, rows = tiny_bert_cls(), _Rows(label_fn=lambda ids: int(ids[0] > 30))
        config = dt.LoraConfig(task_type=task, r=4, target_modules=["query", "value"])
    model = dt.get_peft_model(base, config)
    assert "input_ids" in inspect.signature(model.forward).parameters
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", learning_rate=1e-2, use_cpu=True)
    Trainer(model=model, args=args, train_dataset=rows).train()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and all("lora_" in n or "modules_to_save" in n for n in changed)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and "lora_" not in " ".join(frozen)


def test_positional_calls_reach_the_base_model_unchanged():
    """The named signature is for introspection: positional arguments go on as they came (the base model's
    own order: Llama's third argument is position_ids, not inputs_embeds)."""
    base = tiny_llama()
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"]))
    ids = torch.randint(1, 60, (2, 5), generator=torch.Generator().manual_seed(0))
    mask, positions = torch.ones_like(ids), torch.tensor([0, 2, 5, 9, 14]).expand(2, 5)  # (RoPE: gaps matter)
    with torch.no_grad():
        got = model(ids, mask, positions).logits
        want = base(ids, mask, positions).logits  # B = 0 at init: the adapter changes nothing
        assert (want - base(ids, mask).logits).abs().max() > 1e-4  # the positions matter
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
