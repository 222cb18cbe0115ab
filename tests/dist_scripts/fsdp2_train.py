"""FSDP2 training of a tiny deltatune Llama, driven by ``tests/test_fsdp2.py``.

Usage::

    python fsdp2_train.py OUT METHOD reference          # one process, no sharding: the reference run
    torchrun --nproc_per_node=2 fsdp2_train.py OUT METHOD sharded

The reference run creates the adapter (fixed seed), saves it to ``OUT/init``, trains ``STEPS`` steps on the
global batches and saves ``OUT/reference`` plus the logits of a fixed input. The sharded run loads
``OUT/init`` *before* sharding, applies ``fully_shard`` per decoder layer and at the root, trains on its
rank's half of the same global batches, saves ``OUT/plain`` (``save_pretrained`` on every rank) and
``OUT/full`` (rank 0, ``state_dict=`` the gathered full state dict), exercises
``get/set_peft_model_state_dict`` on the ``DTensor`` shards and writes what it measured to
``OUT/sharded.json``.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for conftest

import deltatune as dt  # noqa: E402
from conftest import tiny_llama  # noqa: E402

STEPS, GLOBAL_BATCH, SEQ_LEN, LR = 3, 4, 8, 1e-2


def config(method: str) -> dt.LoraConfig:
    """The adapter both runs train (random B, so the adapter changes the outputs from the first step)."""
    return dt.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                         target_modules=["q_proj", "v_proj", "down_proj"], use_dora=method == "dora")


def batches() -> list[torch.Tensor]:
    """The global batches, the same in every process (its own generator, fixed seed)."""
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(3, 64, (GLOBAL_BATCH, SEQ_LEN), generator=gen) for _ in range(STEPS)]


def probe_input() -> torch.Tensor:
    return torch.randint(3, 64, (2, SEQ_LEN), generator=torch.Generator().manual_seed(99))


def train(model, rows: slice) -> list[float]:
    """``STEPS`` AdamW steps on ``rows`` of each global batch (FSDP2 averages gradients over ranks, so
    each rank's mean loss over its half gives the gradient of the global mean)."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for ids in batches():
        local = ids[rows]
        loss = model(input_ids=local, labels=local).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def reference(out: str, method: str) -> None:
    torch.manual_seed(0)
    model = dt.get_peft_model(tiny_llama(), config(method))
    model.save_pretrained(os.path.join(out, "init"))
    losses = train(model, slice(None))
    model.save_pretrained(os.path.join(out, "reference"))
    with torch.no_grad():
        torch.save(model(input_ids=probe_input()).logits, os.path.join(out, "reference_logits.pt"))
    with open(os.path.join(out, "reference.json"), "w") as fh:
        json.dump({"losses": losses}, fh)


def forwards_state_dict(out: str, method: str) -> bool:
    """Whether ``PeftModel.save_pretrained`` uses a ``state_dict=`` argument (peft does): saved from a small
    unsharded model with values it does not hold, are those values in the file?"""
    from safetensors.torch import load_file

    model = dt.get_peft_model(tiny_llama(), config(method))
    marked = {k: torch.full_like(v, 7.0) for k, v in model.state_dict().items()}
    model.save_pretrained(os.path.join(out, "probe"), state_dict=marked)
    saved = load_file(os.path.join(out, "probe", "adapter_model.safetensors"))
    return all(bool((v == 7.0).all()) for v in saved.values())


def sharded(out: str, method: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    # A short timeout: a rank stuck in a collective fails the test in seconds instead of hanging it.
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    model = dt.PeftModel.from_pretrained(tiny_llama(), os.path.join(out, "init"), is_trainable=True)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    per_rank = GLOBAL_BATCH // world
    losses = train(model, slice(rank * per_rank, (rank + 1) * per_rank))
    result = {"losses": losses, "world": world}

    shards = dt.get_peft_model_state_dict(model)
    result["all_dtensor"] = all(isinstance(v, DTensor) for v in shards.values())
    gathered = {k: v.full_tensor() for k, v in shards.items()}

    model.save_pretrained(os.path.join(out, "plain"))  # every rank: gathered, rank 0 writes
    saved_config = model.peft_config["default"].replace(inference_mode=True)
    dt.checkpoint.save_adapters(model, os.path.join(out, "all_ranks_folder"), [("default", saved_config, None)])
    result["plain_complete_on_every_rank"] = os.path.isfile(os.path.join(out, "plain", "adapter_model.safetensors"))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        result["save_pretrained_forwards_state_dict"] = forwards_state_dict(out, method)
        if result["save_pretrained_forwards_state_dict"]:  # (otherwise rank 0 would gather alone and hang)
            model.save_pretrained(os.path.join(out, "full"), state_dict=full)
        dt.checkpoint.save_adapters(model, os.path.join(out, "full_folder"), [("default", saved_config, None)],
                                    state_dict=full)
        # What save_pretrained(dir, state_dict=full) runs per adapter, called directly on rank 0 alone.
        dt.checkpoint.save_adapter(model, "default", saved_config, os.path.join(out, "full_direct"), state_dict=full)
        result["full_from_peft_helper"] = {
            k: float((v - gathered[k]).abs().max()) for k, v in dt.get_peft_model_state_dict(model, state_dict=full).items()}
    dist.barrier()

    # set_peft_model_state_dict with DTensor shards, then with full tensors read from a file.
    dt.set_peft_model_state_dict(model, {k: v * 2 for k, v in shards.items()})
    doubled = {k: v.full_tensor() for k, v in dt.get_peft_model_state_dict(model).items()}
    result["set_shards_diff"] = max(float((doubled[k] - 2 * gathered[k]).abs().max()) for k in gathered)
    want = load_file(os.path.join(out, "reference", "adapter_model.safetensors"))
    dt.set_peft_model_state_dict(model, want)
    got = {k: v.full_tensor() for k, v in dt.get_peft_model_state_dict(model).items()}
    result["set_full_diff"] = max(float((got[k] - want[k]).abs().max()) for k in want)
    with torch.no_grad():  # the sharded model holding the reference adapter computes the reference outputs
        logits = model(input_ids=probe_input()).logits
    ref_logits = torch.load(os.path.join(out, "reference_logits.pt"))
    result["logits_diff"] = float((logits - ref_logits).abs().max())
    if rank == 0:
        with open(os.path.join(out, "sharded.json"), "w") as fh:
            json.dump(result, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    out_dir, method_name, mode = sys.argv[1:4]
    (reference if mode == "reference" else sharded)(out_dir, method_name)
