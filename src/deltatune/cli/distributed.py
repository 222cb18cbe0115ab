"""``deltatune train --fsdp``: FSDP2 (``fully_shard``) training under ``torchrun``/``accelerate launch``.

The adapter is injected first (same seed on every rank, so every rank holds the same full tensors), then
each repeated block of the model (the items of its outermost ``nn.ModuleList``: decoder or encoder layers)
and the root are sharded with ``fully_shard``: frozen base weights and adapter tensors alike become
``DTensor`` shards, gathered per block for its forward and backward.

The Trainer is told the model is already sharded, so it neither shards it again nor wraps it in DDP
(transformers' ``fsdp``/``fsdp_config`` arguments and accelerate's FSDP plugin act on GPUs only: on CPU,
accelerate 1.15 runs plain DDP with them, and a model sharded beforehand then fails in DDP's start with
``aten.cat.default got mixed torch.Tensor and DTensor``). Saving is a collective: every rank calls
``save_pretrained``, the shards are gathered and rank 0 writes a normal peft folder, atomically.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .options import RunOptions, UsageError
from .run_folder import is_main_process, world_size

#: Labels whose 2-process ``--fsdp`` run was checked against a 1-process run (lora in
#: ``tests/test_fsdp2_cli.py``, the others by hand the same way on the same tiny BERT);
#: a new label is refused until checked.
FSDP_METHODS = ("lora", "dora", "ia3", "loha", "lokr", "oft", "vera")


def check_fsdp_run(o: RunOptions, chat: bool) -> None:
    """Refuse an ``--fsdp`` run that would not be sharded, before the model is loaded or a folder written."""
    if not o.fsdp:
        return
    if world_size() < 2:
        raise UsageError("--fsdp shards the model over processes: launch it with "
                         "`torchrun --nproc_per_node=N -m deltatune train --fsdp ...` (N >= 2) or `accelerate launch`")
    if o.method not in FSDP_METHODS:
        raise UsageError(f"--fsdp supports the methods {list(FSDP_METHODS)}, not {o.method!r}")
    if chat:
        raise UsageError("--fsdp is not supported for chat data (its answers are generated on rank 0 alone, "
                         "which a sharded model cannot do); use DDP (torchrun without --fsdp)")
    if os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() in ("1", "true", "yes"):
        # Ranks other than 0 would load empty (meta) weights, which deltatune's own sharding never fills.
        raise UsageError("--fsdp loads the model on every rank: set fsdp_cpu_ram_efficient_loading: false "
                         "in the accelerate config")


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The items of the outermost ``nn.ModuleList`` s holding parameters (a transformer's layers), in order."""
    blocks: list[nn.Module] = []
    inside: set[str] = set()
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, nn.ModuleList) and any(True for _ in module.parameters()):
            blocks.extend(module)
            inside.add(name + ".")
    return blocks


def shard_model(model: nn.Module) -> int:
    """``fully_shard`` each repeated block, then the root; returns the number of blocks.

    Starts the process group (gloo on CPU, nccl on CUDA) if the launcher has not; the Trainer's accelerate
    state then uses it. On CUDA the model is moved to this rank's device first (``LOCAL_RANK``).
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if world_size() < 2:  # (``ab`` reaches here without check_fsdp_run)
        raise UsageError("--fsdp shards the model over processes: launch it with torchrun or accelerate launch")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        model.to(torch.device("cuda", torch.cuda.current_device()))
    blocks = repeated_blocks(model)
    if not blocks:
        raise UsageError("--fsdp found no layers to shard (no nn.ModuleList of layers in the model)")
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    if is_main_process():
        from torch.distributed.tensor import DTensor

        params = list(model.parameters())
        shards = sum(isinstance(p, DTensor) for p in params)
        print(f"fsdp: {len(blocks)} layers and the root sharded over {world_size()} processes "
              f"({shards} of {len(params)} parameters are DTensor shards)")
    return len(blocks)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def hand_over(trainer) -> None:
    """Tell ``trainer`` its model is sharded already, if it is (a no-op otherwise).

    ``is_distributed_loading_by_transformers`` is the Trainer's own switch for a model that owns its
    placement and gradient reduction (set by ``from_pretrained(distributed_config=...)``): with it the
    Trainer skips the DDP wrap and builds the optimizer over the ``DTensor`` shards. (The Trainer's
    ``model.to(device)`` at construction already ran: a no-op here, as the shards are on that device.)
    """
    if is_sharded(trainer.model):
        if not hasattr(trainer, "is_distributed_loading_by_transformers"):
            raise UsageError("--fsdp needs a transformers Trainer that accepts pre-sharded models (transformers >= 5)")
        trainer.is_distributed_loading_by_transformers = True


def save_adapter(model: nn.Module, folder: str) -> None:
    """Write the adapter folder. Called on every rank: a sharded model gathers its shards (a collective)
    and rank 0 writes; an unsharded one is written by rank 0 alone."""
    if is_sharded(model) or is_main_process():
        model.save_pretrained(folder)
