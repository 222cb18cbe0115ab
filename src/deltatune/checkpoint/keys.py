"""Key mapping: deltatune's tensors under the key names HuggingFace PEFT writes, and back.

A layer's adapter tensor is keyed as the module path (adapter name left out) plus the suffix its method
registered for the role (``registry.Method.checkpoint_keys``), e.g. ``...q_proj.lora_A.weight``. Other
tensors (modules_to_save copies, biases, prompts, a method's shared tensors such as ``base_model.vera_A``)
keep the names :mod:`deltatune.adapter_tensors` gives them.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

from torch import Tensor, nn

from ..adapter_tensors import named_tensors
from ..registry import adapter_key_suffixes, checkpoint_suffixes, shared_tensor_names
from .errors import CheckpointError
from .sharded import full_value

#: The prefix of a PeftModel's keys for modules of the base model.
ROOT = "base_model.model."

#: Module names that wrappers insert into parameter names: FSDP (1) and activation checkpointing.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def without_wrappers(key: str) -> str:
    """``key`` without the module names FSDP or checkpoint wrappers inserted (anywhere in it), as the
    wrapped model's own ``state_dict()`` and a saved adapter name it."""
    for segment in _WRAPPER_SEGMENTS:
        if segment in key:
            key = key.replace(segment, "")
    return key


def _hf_key(name: str, layer: nn.Module, role: str) -> str:
    return f"{name}.{checkpoint_suffixes(layer.checkpoint_kind)[role]}"


def adapter_tensors(model: nn.Module, adapter_name: str, bias: str = "none",
                    peft_layout: bool = False, for_save: bool = False) -> dict[str, Tensor]:
    """The live tensors of one adapter under their HF keys (relative to ``model``).

    See :func:`deltatune.adapter_tensors.named_tensors` for what is included and the arguments.
    """
    return named_tensors(model, adapter_name, bias, peft_layout, for_save, layer_key=_hf_key)


def _is_prompt_adapter(model: nn.Module, adapter_name: str) -> bool:
    prompts = getattr(model, "prompt_encoder", None)
    return isinstance(prompts, nn.ModuleDict) and adapter_name in prompts


def to_peft_keys(model: nn.Module, tensors: dict[str, Tensor], adapter_name: str) -> dict[str, Tensor]:
    """A PeftModel's keys as peft writes them: prompt-learning adapters have no tuner module between
    the PeftModel and the base model, so their module keys start ``base_model.`` (not ``base_model.model.``)."""
    if not _is_prompt_adapter(model, adapter_name):
        return tensors
    return {("base_model." + k[len(ROOT):] if k.startswith(ROOT) else k): v for k, v in tensors.items()}


def from_peft_keys(model: nn.Module, weights: dict[str, Tensor], adapter_name: str) -> dict[str, Tensor]:
    """Keys of a peft file (or state dict, with or without the ``base_model.model.`` prefix) as this
    PeftModel names its tensors; root keys such as ``prompt_embeddings`` name no module and stay, and so do
    the tuner-level keys of a method's shared tensors (``base_model.vera_A``)."""
    prompt = _is_prompt_adapter(model, adapter_name)
    tuner_keys = {f"base_model.{name}" for name in shared_tensor_names()}
    out = {}
    for key, value in weights.items():
        if "." not in key or key.startswith(ROOT) or key in tuner_keys:
            out[key] = value
        elif prompt and key.startswith("base_model."):
            out[ROOT + key[len("base_model."):]] = value
        else:
            out[ROOT + key] = value
    return out


def adapted_module_names(keys: Iterable[str]) -> list[str]:
    """The modules a state dict's adapter keys belong to (``x.lora_A.weight`` -> ``x``), in order; keys of
    other tensors (modules_to_save copies, biases, prompts) are left out. A ``base_model.model.`` prefix is
    dropped."""
    suffixes = [f".{s}" for s in adapter_key_suffixes()]  # longest first: "lora_A.weight" before "lora_A"
    names: dict[str, None] = {}
    for key in keys:
        key = key[len(ROOT):] if key.startswith(ROOT) else key
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if suffix is not None:
            names[key[: -len(suffix)]] = None
    return list(names)


def rename_keys(weights: dict[str, Tensor], key_mapping: Optional[dict[str, str]]) -> dict[str, Tensor]:
    """peft's ``key_mapping``: regular-expression ``pattern -> replacement`` pairs applied to each file key
    without its ``base_model.model.`` prefix (the first pattern that matches renames it), e.g.
    ``{r"^language_model\\.blocks": "model.layers"}`` for a checkpoint of a model whose modules were renamed."""
    if not key_mapping:
        return weights
    rules = []
    for pattern, replacement in key_mapping.items():
        try:
            rules.append((re.compile(pattern), replacement))
        except re.error as exc:
            raise ValueError(f"key_mapping pattern {pattern!r} is not a regular expression: {exc}") from None
    out: dict[str, Tensor] = {}
    for key, value in weights.items():
        prefix = ROOT if key.startswith(ROOT) else ""
        rest = key[len(prefix):]
        for rule, replacement in rules:
            rest, hits = rule.subn(replacement, rest)
            if hits:
                break
        if prefix + rest in out:
            raise CheckpointError(f"key_mapping renames two checkpoint keys to {prefix + rest!r}")
        out[prefix + rest] = value
    return out


def saved_tensors(model: nn.Module, adapter_name: str, bias: str = "none") -> dict[str, Tensor]:
    """The live tensors that go into one adapter's file, under peft's keys without wrapper names
    (``DTensor`` shards on a sharded model)."""
    live = adapter_tensors(model, adapter_name, bias, peft_layout=True, for_save=True)
    # (an FSDP1-wrapped model: keys as its own state_dict() and a saved adapter name them, without the wrappers)
    return to_peft_keys(model, {without_wrappers(k): v for k, v in live.items()}, adapter_name)


def state_dict_for_save(model: nn.Module, adapter_name: str, bias: str = "none",
                        state_dict: Optional[dict[str, Tensor]] = None) -> dict[str, Tensor]:
    """Detached, contiguous CPU copies of :func:`saved_tensors` (what goes into the file).

    ``state_dict``: take the values from it (by ``model.state_dict()`` names, e.g. the full state dict of a
    sharded model gathered on rank 0) instead of the live tensors; every tensor must be in it. Without it,
    ``DTensor`` shards are gathered (a collective: every rank must save).
    """
    tensors = saved_tensors(model, adapter_name, bias)
    if state_dict is not None:
        picked = values_from_state_dict(model, tensors, state_dict)
        absent = [k for k in tensors if k not in picked]
        if absent:
            raise CheckpointError(f"state_dict has no values for {len(absent)} tensor(s) of adapter {adapter_name!r}, "
                                  f"e.g. {absent[:3]} (pass the model's full state dict); nothing was written")
        tensors = picked
    empty = [k for k, v in tensors.items() if v.is_meta]
    if empty:
        raise CheckpointError(f"adapter {adapter_name!r} has {len(empty)} tensor(s) without values (created with "
                              f"low_cpu_mem_usage=True and never loaded), e.g. {empty[:3]}")
    return {k: full_value(v.detach()).to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def values_from_state_dict(model: nn.Module, tensors: dict[str, Tensor], state_dict: dict) -> dict[str, Tensor]:
    """The values ``state_dict`` (keyed as ``model.state_dict()`` names them) holds for the live ``tensors``
    (matched by identity, so any key scheme of ``tensors`` works); tensors it lacks are left out, except
    non-persistent buffers (e.g. VeRA's frozen projections), which no state dict holds: those are taken live."""
    internal = {id(t): without_wrappers(n) for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    out = {k: state_dict[internal[id(v)]] for k, v in tensors.items() if internal.get(id(v)) in state_dict}
    transient = _non_persistent_buffers(model)
    out.update({k: v for k, v in tensors.items() if k not in out and id(v) in transient})
    return out


def _non_persistent_buffers(model: nn.Module) -> set[int]:
    """``id`` of every buffer of ``model`` registered with ``persistent=False``."""
    return {id(m._buffers[n]) for m in model.modules() for n in m._non_persistent_buffers_set
            if m._buffers.get(n) is not None}


__all__ = ["ROOT", "adapted_module_names", "adapter_tensors", "from_peft_keys", "rename_keys", "saved_tensors",
           "state_dict_for_save", "to_peft_keys", "values_from_state_dict"]
