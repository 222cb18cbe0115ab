"""A stock transformers ``Trainer`` with ``AdapterCheckpointCallback`` checkpoints a deltatune model as
adapter folders, resumes from them exactly, and loads the best one at the end."""

from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from transformers import Trainer, TrainingArguments

import deltatune as dt
from conftest import tiny_bert_cls, tiny_llama
from deltatune.trainer_callback import checkpoint_tensor_names


class _Rows(torch.utils.data.Dataset):
    """Seeded token rows; labels are the ids (causal LM) or a rule on the first id (classification)."""

    def __init__(self, n=24, seq=6, classify=False, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 60, (n, seq), generator=g)
        self.classify = classify

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = int(self.ids[i][0] > 30) if self.classify else self.ids[i]
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": labels}


def _model(task, init_seed=0):
    """A tiny base with LoRA (dropout on, so that resuming must restore the RNG too); ``init_seed`` sets
    the adapter's random init, so a resumed run starts from other values than the checkpoint's."""
    if task == "CAUSAL_LM":
        base, targets = tiny_llama(), ["q_proj", "v_proj"]
    else:
        base, targets = tiny_bert_cls(), ["query", "value"]  # (+ the classifier head, as modules_to_save)
    torch.manual_seed(init_seed)
    config = dt.LoraConfig(task_type=task, r=4, lora_alpha=8, lora_dropout=0.1, target_modules=targets)
    return dt.get_peft_model(base, config)


def _args(out, **kw):
    # Default TrainingArguments but for the step counts, a learning rate that moves a tiny adapter, and
    # the logging noise.
    kw = {"max_steps": 6, "save_steps": 2, "learning_rate": 1e-2, "report_to": [], "disable_tqdm": True, **kw}
    return TrainingArguments(output_dir=str(out), **kw)


def _trainer(model, out, rows, **kw):
    return Trainer(model=model, args=_args(out, **kw), train_dataset=rows,
                   callbacks=[dt.AdapterCheckpointCallback()])


def _adapter(model):
    return {k: v.clone() for k, v in dt.get_peft_model_state_dict(model).items()}


def _folder_bytes(folder, names=None):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if os.path.isfile(os.path.join(folder, f)) and (names is None or f in names))


@pytest.mark.parametrize("task", ["CAUSAL_LM", "SEQ_CLS"])
def test_checkpoints_are_adapter_folders_and_resuming_gives_the_uninterrupted_adapter(tmp_path, task):
    """Every checkpoint is an adapter folder (no frozen base weight anywhere in it); a fresh model resumed
    from the middle one (mid-epoch: 24 rows, batches of 8) ends bit-for-bit where the uninterrupted run did
    (adapter and head: so the optimizer, the linear scheduler and the dropout RNG were restored too)."""
    rows = _Rows(classify=task == "SEQ_CLS")
    model = _model(task)
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    _trainer(model, tmp_path / "a", rows).train()
    want = _adapter(model)
    assert sorted(os.listdir(tmp_path / "a")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    for step in (2, 4, 6):
        folder = tmp_path / "a" / f"checkpoint-{step}"
        names = set(os.listdir(folder))
        assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
                "rng_state.pth", "trainer_state.json"} <= names
        assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
        with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
            keys = set(fh.keys())
        assert keys and not keys & frozen
        assert all("lora_" in k or "modules_to_save" in k for k in keys)
    assert model._state_dict_hooks == {}  # the hook is gone after training ...
    assert frozen <= set(model.state_dict())  # ... and the state dict complete again

    # The last checkpoint's adapter file is the trained adapter, loadable by deltatune.
    loaded = dt.PeftModel.from_pretrained(tiny_llama() if task == "CAUSAL_LM" else tiny_bert_cls(),
                                          str(tmp_path / "a" / "checkpoint-6"))
    got = dt.get_peft_model_state_dict(loaded)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    resumed = _model(task, init_seed=1)
    assert not all(torch.equal(v, want[k]) for k, v in _adapter(resumed).items())
    _trainer(resumed, tmp_path / "b", rows).train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    got = _adapter(resumed)
    assert got.keys() == want.keys()
    diff = max((got[k] - want[k]).abs().max().item() for k in want)
    assert diff == 0.0, f"resumed adapter differs from the uninterrupted one by {diff}"


def test_checkpoint_loads_in_peft_with_the_same_outputs(tmp_path):
    """The checkpoint folder is a peft adapter: real peft loads it and computes what deltatune does."""
    peft = pytest.importorskip("peft")
    model = _model("CAUSAL_LM")
    _trainer(model, tmp_path, _Rows(), max_steps=2).train()
    folder = str(tmp_path / "checkpoint-2")
    ours = dt.PeftModel.from_pretrained(tiny_llama(), folder)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), folder)
    ids = torch.randint(1, 60, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, base = ours(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits
        torch.testing.assert_close(theirs(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    assert (want - base).abs().max() > 1e-4  # (the trained adapter changes the output)


def test_no_full_weights_are_written_at_any_checkpoint(tmp_path, monkeypatch):
    """The Trainer itself never serialises a frozen base weight (the hook, not a rewrite afterwards: a
    full copy of a 7B model written then deleted at every checkpoint would cost its size in time and disk)."""
    written = []
    real = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file",
                        lambda tensors, *a, **kw: (written.append(set(tensors)), real(tensors, *a, **kw))[1])
    model = _model("SEQ_CLS")
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    _trainer(model, tmp_path, _Rows(classify=True)).train()
    assert len(written) >= 3 and not any(keys & frozen for keys in written)


def test_a_full_weights_file_is_slimmed_when_the_save_came_unannounced(tmp_path):
    """A save requested by a callback that runs after this one (the hook was not armed): the Trainer writes
    the full state dict; ``on_save`` rewrites it with the adapter state only. (Step 3 of 4: the Trainer's
    own save at the last step would arm the hook.)"""
    from transformers import TrainerCallback

    class SaveAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                control.should_save = True

    model = _model("CAUSAL_LM")
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    trainer = _trainer(model, tmp_path, _Rows(), max_steps=4, save_steps=100)
    trainer.add_callback(SaveAtStep3())
    trainer.train()
    folder = tmp_path / "checkpoint-3"
    with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
    assert keys and not keys & frozen and (folder / "adapter_model.safetensors").is_file()
    assert not [f for f in os.listdir(folder) if f.startswith(".tmp-")]


def test_load_best_model_at_end_restores_the_best_checkpoints_adapter(tmp_path):
    """With a scripted metric the best checkpoint is the first (step 2): after training the model holds
    that checkpoint's adapter, not the last step's."""
    scores = iter([3.0, 1.0, 2.0])
    model = _model("SEQ_CLS")
    rows = _Rows(classify=True)
    trainer = Trainer(model=model, args=_args(tmp_path, eval_strategy="steps", eval_steps=2,
                                              load_best_model_at_end=True, metric_for_best_model="score",
                                              greater_is_better=True),
                      train_dataset=rows, eval_dataset=_Rows(n=8, classify=True, seed=1),
                      compute_metrics=lambda _: {"score": next(scores)},
                      callbacks=[dt.AdapterCheckpointCallback()])
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    best = safetensors.torch.load_file(str(tmp_path / "checkpoint-2" / "adapter_model.safetensors"))
    last = safetensors.torch.load_file(str(tmp_path / "checkpoint-6" / "adapter_model.safetensors"))
    got = dt.get_peft_model_state_dict(model)
    assert got.keys() == best.keys()
    assert all(torch.equal(got[k], best[k]) for k in best)
    assert not all(torch.equal(got[k], last[k]) for k in last)


def test_checkpoints_are_a_fraction_of_the_full_model(tmp_path):
    """Measured: the checkpoint's weight files against the Trainer's full-model file without the callback."""
    model = _model("CAUSAL_LM")
    Trainer(model=model, args=_args(tmp_path / "plain", max_steps=2), train_dataset=_Rows()).train()
    full = _folder_bytes(tmp_path / "plain" / "checkpoint-2", {"model.safetensors"})
    _trainer(_model("CAUSAL_LM"), tmp_path / "cb", _Rows(), max_steps=2).train()
    folder = tmp_path / "cb" / "checkpoint-2"
    ours = _folder_bytes(folder, {"model.safetensors", "adapter_model.safetensors"})
    print(f"\nfull model.safetensors {full} B; with the callback {ours} B of weights, "
          f"{_folder_bytes(folder)} B in the folder")
    assert ours * 10 < full


def test_a_model_that_is_not_deltatunes_is_left_to_the_trainer(tmp_path):
    """On a plain transformers model the callback does nothing: the Trainer's own checkpoint, untouched."""
    model = tiny_llama()
    Trainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=_Rows(),
            callbacks=[dt.AdapterCheckpointCallback()]).train()
    names = set(os.listdir(tmp_path / "checkpoint-2"))
    assert "config.json" in names and "adapter_config.json" not in names


def test_the_hook_filters_one_state_dict_call_and_is_gone_after_training(tmp_path):
    """Armed, the hook slims the next ``state_dict()`` only; a ``trainer.evaluate()`` after training under
    ``save_strategy="best"`` (no save follows it) leaves no hook behind."""
    from transformers import TrainerControl, TrainerState

    model = _model("SEQ_CLS")
    full = set(model.state_dict())
    callback = dt.AdapterCheckpointCallback()
    callback.on_step_end(_args(tmp_path), TrainerState(), TrainerControl(should_save=True), model=model)
    slim = set(model.state_dict())
    assert slim == checkpoint_tensor_names(model) and slim < full
    assert set(model.state_dict()) == full

    model = _model("SEQ_CLS")
    trainer = Trainer(model=model, args=_args(tmp_path / "best", max_steps=2, eval_strategy="steps", eval_steps=2,
                                              save_strategy="best", metric_for_best_model="loss"),
                      train_dataset=_Rows(classify=True), eval_dataset=_Rows(n=8, classify=True, seed=1),
                      callbacks=[dt.AdapterCheckpointCallback()])
    trainer.train()
    assert (tmp_path / "best" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    trainer.evaluate()
    assert model._state_dict_hooks == {} and set(model.state_dict()) == full
