"""OFT's ``bias="oft_only"`` and VeRA's ``bias="vera_only"``: the adapted layers' base biases train and are
saved under peft's keys (``<module>.base_layer.bias``), checked against peft 0.21 both ways."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from conftest import main_output, perturb_trainable, text_inputs, tiny_bert_cls, tiny_gpt2_cls, train_steps
from safetensors.torch import load_file

import deltatune as dt
from deltatune.methods.oft import OFTConfig
from deltatune.methods.vera import VeraConfig

LIBS = {"oft": (OFTConfig, peft.OFTConfig), "vera": (VeraConfig, peft.VeraConfig)}
CASES = [  # (id, method, build, config kwargs, the adapted layers' names end with)
    ("oft-bert", "oft", tiny_bert_cls, dict(task_type="SEQ_CLS", oft_block_size=16, bias="oft_only",
                                            target_modules=["query", "value", "output.dense"]),
     ("query", "value", "output.dense")),
    ("vera-bert", "vera", tiny_bert_cls, dict(task_type="SEQ_CLS", r=6, bias="vera_only",
                                              target_modules=["key", "intermediate.dense"]),
     ("key", "intermediate.dense")),
    ("vera-gpt2-conv1d", "vera", tiny_gpt2_cls, dict(task_type="SEQ_CLS", r=8, bias="vera_only",
                                                     target_modules=["c_attn"], save_projection=False),
     ("c_attn",)),
]


def _out(model):
    with torch.no_grad():
        return main_output(model(**text_inputs()))


def _trainable_biases(model):
    return {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}


def _peft(build, peft_cfg, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(build(), peft_cfg(**kwargs))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_the_adapted_layers_biases_train_as_in_peft(case):
    _, method, build, kwargs, adapted = case
    dt_cfg, peft_cfg = LIBS[method]
    dm = dt.get_peft_model(build(), dt_cfg(**kwargs))
    biases = _trainable_biases(dm)
    assert biases == _trainable_biases(_peft(build, peft_cfg, kwargs))
    layer_biases = {n for n in biases if ".base_layer." in n}
    assert layer_biases and all(n.removesuffix(".base_layer.bias").endswith(adapted) for n in layer_biases)
    # the same model with bias="none" trains none of them
    assert not _trainable_biases(dt.get_peft_model(build(), dt_cfg(**{**kwargs, "bias": "none"}))) & layer_biases


@pytest.mark.parametrize("direction", ["peft->deltatune", "deltatune->peft"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_checkpoints_with_the_biases_load_in_the_other_library(case, direction, tmp_path):
    _, method, build, kwargs, adapted = case
    dt_cfg, peft_cfg = LIBS[method]
    if direction == "peft->deltatune":
        source, target_lib = _peft(build, peft_cfg, kwargs), dt
    else:
        source, target_lib = dt.get_peft_model(build(), dt_cfg(**kwargs)), peft
    perturb_trainable(source, 0, 0.2)  # (the biases too: they are trainable)
    source.eval()
    want = _out(source)
    source.save_pretrained(str(tmp_path / "a"))
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    bias_keys = {k for k in saved if k.endswith(".base_layer.bias")}
    assert bias_keys and all(k.removesuffix(".base_layer.bias").endswith(adapted) for k in bias_keys)
    # the file's biases are the trained ones, not the base model's
    base = dict(build().named_parameters())
    assert all(not torch.equal(saved[k], base[k.removeprefix("base_model.model.").replace(".base_layer", "")])
               for k in bias_keys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target = target_lib.PeftModel.from_pretrained(build(), str(tmp_path / "a"))
    torch.testing.assert_close(_out(target), want, rtol=0, atol=1e-5)
    target.save_pretrained(str(tmp_path / "b"))
    again = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert sorted(again) == sorted(saved)
    assert all(torch.equal(again[k], saved[k]) for k in saved)


@pytest.mark.parametrize("case", CASES[:2], ids=[c[0] for c in CASES[:2]])
def test_training_changes_only_the_adapter_tensors_the_adapted_biases_and_the_head(case):
    _, method, build, kwargs, adapted = case
    dm = dt.get_peft_model(build(), LIBS[method][0](**kwargs))
    perturb_trainable(dm, 1, 0.05)  # (OFT starts at the identity: give its rotation a gradient path)
    before = {n: p.detach().clone() for n, p in dm.named_parameters()}
    trainable = {n for n, p in dm.named_parameters() if p.requires_grad}
    inputs = {**text_inputs(), "labels": torch.tensor([0, 2])}
    losses, grads = train_steps(dm, inputs, 4, lr=0.02)
    assert losses[-1] < losses[0] and grads == trainable
    changed = {n for n, p in dm.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable
    layer_biases = {n for n in trainable if n.endswith(".base_layer.bias")}
    assert layer_biases and all(n.removesuffix(".base_layer.bias").endswith(adapted) for n in layer_biases)
    assert {n for n in changed if n.endswith(".base_layer.bias")} == layer_biases
