"""``get_layer_status`` / ``get_model_status``: what each adapter layer holds and how it is switched, with
peft's field names, so that code and notebooks written for peft can inspect a deltatune model.

A per-adapter flag that differs between the tensors (or layers) it summarises reads ``"irregular"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from torch import nn

from . import injection
from .modules_to_save import ModulesToSaveWrapper
from .quant.bnb import param_numel, quant_kind
from .registry import adapter_layer_types, get_method

Flag = Union[bool, Literal["irregular"]]


@dataclass
class LayerStatus:
    """One adapter layer (or modules_to_save wrapper), as peft's ``TunerLayerStatus``."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Flag]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Optional[str]


@dataclass
class ModelStatus:
    """The whole model, as peft's ``TunerModelStatus``: the layers' fields summarised."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Flag
    active_adapters: Union[list[str], Literal["irregular"]]
    merged_adapters: Union[list[str], Literal["irregular"]]
    requires_grad: dict[str, Flag]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[str, None, Literal["irregular"]]


def _one_flag(values) -> Flag:
    """True or False when every value is, else "irregular"."""
    values = list(values)
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _layer_status(name: str, module: nn.Module, active: Optional[list[str]]) -> LayerStatus:
    """``active``: the model's active adapters (peft reports them for every layer, also one that holds
    none of them); None for a model without a PeftModel: the layer's own."""
    if isinstance(module, ModulesToSaveWrapper):
        copies = dict(module.modules_to_save.items())
        own = [module.active] if module.active else []
        merged, enabled, backend = [], not module.disabled, None
    else:
        copies = dict(module.adapters.items())
        own, merged, enabled = list(module.active), list(module.merged_adapters), not module.disabled
        kind = quant_kind(module.base_layer)
        backend = None if kind is None else f"bitsandbytes {kind}"
    return LayerStatus(
        name=name, module_type=type(module).__name__, enabled=enabled, active_adapters=own if active is None else active,
        merged_adapters=merged,
        requires_grad={n: _one_flag(p.requires_grad for p in c.parameters()) for n, c in copies.items()},
        available_adapters=sorted(copies),
        devices={n: sorted({p.device.type for p in c.parameters()}) for n, c in copies.items()},
        quantization_backend=backend)


def get_layer_status(model: nn.Module) -> list[LayerStatus]:
    """The status of every adapter layer and modules_to_save wrapper of ``model`` (a PeftModel or a model
    adapted with ``inject_adapter_in_model``), in module order; ValueError if it has none."""
    peft_model = hasattr(model, "peft_config") and hasattr(model, "base_model")
    root = model.base_model.model if peft_model else model
    kinds = adapter_layer_types() + (ModulesToSaveWrapper,)
    modules = [(name, module) for name, module in injection.iter_modules(root) if isinstance(module, kinds)]
    if not modules:
        raise ValueError("the model has no adapter layers (adapt it with get_peft_model or inject_adapter_in_model)")
    prefix = "model." if root is not model else ""  # peft names layers from its tuner model: "model.<path>"
    active = list(model.active_adapters) if peft_model else None
    return [_layer_status(prefix + name, module, active) for name, module in modules]


def get_model_status(model: nn.Module) -> ModelStatus:
    """The summary of :func:`get_layer_status` for a PeftModel (or an adapted plain model)."""
    layers = get_layer_status(model)
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict) and hasattr(model, "base_model"):
        base_type = type(model.base_model.model).__name__
        names = {get_method(c.peft_type).config_cls.__name__.removesuffix("Config") + "Model" for c in configs.values()}
        adapter_type = names.pop() if len(names) == 1 else "irregular"
        peft_types = {n: c.peft_type.value for n, c in configs.items()}
        trainable, total = model.get_nb_trainable_parameters()
    else:
        base_type, adapter_type, peft_types = "other", "None", {}
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    actives = {tuple(s.active_adapters) for s in layers}
    merged = sorted({n for s in layers for n in s.merged_adapters})
    # a name merged somewhere but available and unmerged elsewhere: "irregular", as peft reports it
    irregular_merge = any(set(s.available_adapters) - set(s.merged_adapters) & set(merged) for s in layers)
    flags: dict[str, list] = {}
    devices: dict[str, set] = {}
    for s in layers:
        for n, flag in s.requires_grad.items():
            flags.setdefault(n, []).append(flag)
        for n, kinds in s.devices.items():
            devices.setdefault(n, set()).update(kinds)
    backends = {s.quantization_backend for s in layers}
    return ModelStatus(
        base_model_type=base_type, adapter_model_type=adapter_type, peft_types=peft_types,
        trainable_params=trainable, total_params=total, num_adapter_layers=len(layers),
        enabled=_one_flag(s.enabled for s in layers),
        active_adapters=list(actives.pop()) if len(actives) == 1 else "irregular",
        merged_adapters="irregular" if irregular_merge else merged,
        requires_grad={n: _one_flag(v) for n, v in flags.items()},
        available_adapters=sorted({n for s in layers for n in s.available_adapters}),
        devices={n: sorted(v) for n, v in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular")


__all__ = ["LayerStatus", "ModelStatus", "get_layer_status", "get_model_status"]


def get_nb_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (packed 4-bit storage counts every weight it holds)."""
    trainable = total = 0
    for p in model.parameters():
        n = param_numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print the counts as peft does: ``trainable params: ... || all params: ... || trainable%: ...``."""
    trainable, total = get_nb_trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {100 * trainable / max(total, 1):.4f}")
