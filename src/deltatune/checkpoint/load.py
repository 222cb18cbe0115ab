"""Load planning: resolve and check every checkpoint tensor against the model, then copy all or nothing."""

from __future__ import annotations

import re
import warnings
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..adapter_tensors import shared_key_prefix
from ..injection import assign_parameters
from ..registry import shared_tensor_hooks
from .errors import CheckpointError
from .keys import adapter_tensors, without_wrappers
from .sharded import as_target_layout


class LoadResult(NamedTuple):
    """What :func:`load_into` did not load (the fields of peft's and torch's load results)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def load_into(model: nn.Module, state_dict: dict[str, Tensor], adapter_name: str, bias: str = "none",
              ignore_mismatched_sizes: bool = False) -> LoadResult:
    """Copy checkpoint tensors into adapter ``adapter_name`` of ``model``; all-or-nothing.

    Every key is resolved and every shape checked before the first tensor is copied, so a bad
    checkpoint raises :class:`CheckpointError` and leaves the model unchanged (``ignore_mismatched_sizes``:
    tensors of another shape are skipped with a warning instead). A method's shared tensors (``base_model.vera_A``)
    are checked and put in place by the method (``registry.Method.load_shared_tensors``; their shapes follow
    its rules, not ``ignore_mismatched_sizes``). Keys naming other model parameters
    (e.g. a base embedding peft saved with ``save_embedding_layers``) are loaded as well. Tensors created
    empty on the ``meta`` device (``low_cpu_mem_usage``) are replaced by the loaded values.

    Returns:
        The adapter keys the checkpoint did not provide (missing keys); unexpected keys raise instead.
    """
    prompts = getattr(model, "prompt_encoder", None)
    if isinstance(prompts, nn.ModuleDict) and adapter_name in prompts and hasattr(prompts[adapter_name], "prepare_load"):
        prompts[adapter_name].prepare_load()  # e.g. P-tuning: the file holds final prompts, not encoder weights
    # Keys are compared in a canonical form without ``.base_layer``: a bias saved as
    # ``x.base_layer.bias`` (its layer had an adapter then) is ``x.bias`` on a plain layer now.
    wanted = {_unwrapped(k): v for k, v in adapter_tensors(model, adapter_name, bias, peft_layout=True).items()}
    others = None  # the model's other parameters by name: a walk over all of them, made only when needed
    shared_keys, put_shared = _shared_plan(model, state_dict, adapter_name)
    plan, skipped = [], []
    for key, tensor in sorted(state_dict.items()):  # (the first bad key named does not depend on file order)
        if key in shared_keys:
            continue
        target = wanted.get(_unwrapped(key))
        if target is None:
            if others is None:
                others = {_unwrapped(n): p for n, p in model.named_parameters()}
            target = others.get(_unwrapped(key))
        if target is None:
            close = [k for k in wanted if k.rsplit(".", 2)[0] == key.rsplit(".", 2)[0]][:3]
            hint = f"; keys near it in the model: {close}" if close else ""
            raise CheckpointError(
                f"checkpoint key {key!r} matches nothing in the model (is this adapter for another "
                f"base model?){hint}"
            )
        if tuple(tensor.shape) != tuple(target.shape):
            if ignore_mismatched_sizes:
                skipped.append((key, f"{key}: {tuple(tensor.shape)} vs {tuple(target.shape)}"))
                continue
            raise CheckpointError(
                f"checkpoint key {key!r} has shape {tuple(tensor.shape)} but the model expects "
                f"{tuple(target.shape)}; the model was left unchanged"
            )
        plan.append((target, tensor))
    provided = {_unwrapped(k) for k in state_dict} - {_unwrapped(k) for k, _ in skipped}
    empty = [k for k, t in wanted.items() if t.is_meta and k not in provided]
    if empty:  # created on meta (low_cpu_mem_usage) and not in the file: they would have no values
        raise CheckpointError(f"the checkpoint has no values for {len(empty)} tensor(s) of adapter {adapter_name!r} "
                              f"that were created empty (low_cpu_mem_usage), e.g. {empty[:3]}; nothing was loaded")
    with torch.no_grad():
        for put in put_shared:
            put()
        for target, tensor in plan:
            if not target.is_meta:  # (into a DTensor shard: this rank's part of the full checkpoint tensor)
                target.copy_(as_target_layout(tensor, target))
    assign_parameters(model, [(t, v) for t, v in plan if t.is_meta])  # copy_ into meta does nothing
    if skipped:
        warnings.warn(f"ignore_mismatched_sizes: {len(skipped)} tensor(s) of another shape were not loaded: "
                      f"{[m for _, m in skipped[:5]]}", UserWarning, stacklevel=3)
    return LoadResult([k for k in wanted if k not in provided], [])


def _shared_plan(model: nn.Module, state_dict: dict[str, Tensor], adapter_name: str) -> tuple[set[str], list]:
    """The checkpoint keys of methods' shared tensors and, checked by each method, the functions that put
    them in place (a method's check failing raises :class:`CheckpointError`)."""
    prefix = shared_key_prefix(model)
    keys, puts = set(), []
    for method in shared_tensor_hooks():
        given = {name: state_dict[prefix + name] for name in method.shared_names if prefix + name in state_dict}
        keys.update(prefix + name for name in given)
        try:
            puts.append(method.load_shared_tensors(model, adapter_name, given))
        except ValueError as exc:
            raise CheckpointError(f"{exc}; the model was left unchanged") from None
    return keys, puts


_BASE_TENSOR = re.compile(r"\.base_layer\.([^.]+)$")


def _unwrapped(key: str) -> str:
    # Only a base tensor's own ``.base_layer.`` (``x.base_layer.bias``): layers nested for several targeted
    # parameters of one module keep theirs (``experts.base_layer.lora_A.weight``, as peft nests them).
    return _BASE_TENSOR.sub(r".\1", without_wrappers(key))


def warn_missing(missing: list[str], adapter_name: str) -> None:
    """Warn (once, listing a few) about adapter tensors a loaded checkpoint did not provide."""
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        warnings.warn(f"adapter {adapter_name!r}: {len(missing)} tensors were not in the checkpoint and keep "
                      f"their initial values: {shown}", stacklevel=3)


__all__ = ["LoadResult", "load_into", "warn_missing"]
