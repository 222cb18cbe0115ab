"""Resuming under FSDP2, and QLoRA + FSDP2; driven by ``tests/test_fsdp2_resume.py``.

Usage::

    python fsdp2_resume.py OUT reference            # one process, no sharding, STEPS steps
    torchrun --nproc_per_node=2 fsdp2_resume.py OUT sharded

Each run does every ``KIND`` in turn, in ``OUT/KIND`` (one launch for all: starting the processes is most
of the time): ``resume`` (float32 tiny Llama) and ``qlora-float32`` / ``qlora-uint8`` (a hidden-64 Llama
loaded in bitsandbytes NF4 with that ``bnb_4bit_quant_storage``). The reference run creates the adapter
(fixed seed), saves ``OUT/KIND/init``, trains ``STEPS`` AdamW steps on the global batches and saves
``OUT/KIND/reference``.

The sharded ``resume`` run loads ``OUT/init`` before sharding, trains the first ``HALF`` steps on its rank's
rows, saves the adapter (``save_pretrained`` on every rank) and the full optimizer state (rank 0,
``torch.save``, read back with ``weights_only=True``), then starts again from those files: a fresh base, the
adapter loaded before sharding, a new optimizer given the saved state, the remaining steps. It saves
``OUT/resumed`` and, for contrast, ``OUT/restarted`` (same, but a fresh optimizer). The sharded ``qlora``
runs train all ``STEPS`` steps sharded (the packed 4-bit weights are sharded too) and save ``OUT/sharded``.
Measurements go to ``OUT/KIND/sharded.json``.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from datetime import timedelta

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for conftest

import deltatune as dt  # noqa: E402
from conftest import tiny_llama  # noqa: E402

KINDS = ("resume", "qlora-float32", "qlora-uint8")
STEPS, HALF, GLOBAL_BATCH, SEQ_LEN, LR = 4, 2, 4, 8, 1e-2
LLAMA64 = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, pad_token_id=0)  # (bitsandbytes' CPU 4-bit path packs blocks of 64 inputs)


def base(out: str, kind: str):
    """The frozen base: the float32 tiny Llama, or a hidden-64 Llama loaded in NF4."""
    if kind == "resume":
        return tiny_llama()
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    storage = kind.split("-")[1]
    quant = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    if storage != "uint8":
        quant["bnb_4bit_quant_storage"] = getattr(torch, storage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(os.path.join(out, "llama64"), device_map="cpu",
                                                    quantization_config=BitsAndBytesConfig(**quant))


def batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(3, 64, (GLOBAL_BATCH, SEQ_LEN), generator=gen) for _ in range(STEPS)]


def train(model, optimizer, rows: slice, steps: range) -> list[float]:
    """AdamW steps ``steps`` on ``rows`` of each global batch (FSDP2 averages the gradients over ranks)."""
    model.train()
    losses = []
    for step in steps:
        ids = batches()[step][rows]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def adam(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)


def reference(out: str, kind: str) -> None:
    if kind != "resume":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**LLAMA64)).save_pretrained(os.path.join(out, "llama64"))
    torch.manual_seed(0)
    config = dt.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                           target_modules=["q_proj", "v_proj", "down_proj"])
    model = dt.get_peft_model(base(out, kind), config)
    model.save_pretrained(os.path.join(out, "init"))
    train(model, adam(model), slice(None), range(STEPS))
    model.save_pretrained(os.path.join(out, "reference"))


def shard(model) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def sharded(out: str, kind: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.tensor import DTensor

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    result: dict = {"world": world}

    model = dt.PeftModel.from_pretrained(base(out, kind), os.path.join(out, "init"), is_trainable=True)
    if kind != "resume":
        weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
        result["packed_weight_full"] = [str(weight.dtype), list(weight.shape)]
    shard(model)
    params = dict(model.named_parameters())
    result["all_dtensor"] = all(isinstance(p, DTensor) for p in params.values())
    if kind != "resume":  # the 4-bit storage is sharded too: each rank holds half of the packed rows
        weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
        result["packed_weight_local"] = list(weight.to_local().shape)
        train(model, adam(model), rows, range(STEPS))
        model.save_pretrained(os.path.join(out, "sharded"))
    else:
        optimizer = adam(model)
        result["first_losses"] = train(model, optimizer, rows, range(HALF))
        model.save_pretrained(os.path.join(out, "half"))  # every rank: gathered, rank 0 writes
        state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                    cpu_offload=True))
        if rank == 0:
            torch.save(state, os.path.join(out, "optimizer.pt"))
        dist.barrier()
        del model, optimizer

        for name, restore in (("resumed", True), ("restarted", False)):
            model = dt.PeftModel.from_pretrained(tiny_llama(), os.path.join(out, "half"), is_trainable=True)
            shard(model)
            optimizer = adam(model)
            if restore:
                saved = torch.load(os.path.join(out, "optimizer.pt"), weights_only=True)
                set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))
            result[f"{name}_losses"] = train(model, optimizer, rows, range(HALF, STEPS))
            model.save_pretrained(os.path.join(out, name))
    if rank == 0:
        with open(os.path.join(out, "sharded.json"), "w") as fh:
            json.dump(result, fh)
    dist.barrier()


if __name__ == "__main__":
    out_dir, mode = sys.argv[1:3]
    for kind_name in KINDS:
        os.makedirs(os.path.join(out_dir, kind_name), exist_ok=True)
        (reference if mode == "reference" else sharded)(os.path.join(out_dir, kind_name), kind_name)
    if mode == "sharded":
        torch.distributed.destroy_process_group()
