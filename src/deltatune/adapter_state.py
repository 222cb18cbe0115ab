"""Which adapters of an adapter layer run: bookkeeping shared by every method's layers.

A layer keeps ``adapters`` (``nn.ModuleDict`` name -> adapter module), ``active`` and ``merged`` (name
lists) and ``disabled``; ``_run`` is the list of adapter modules its forward applies, recomputed only when
one of those changes. Layers take these functions as methods (``set_active = adapter_state.set_active``)
instead of inheriting them, so each method's layer class stays a direct ``nn.Module``.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn


def init(layer: nn.Module, base_layer: nn.Module) -> None:
    """Give ``layer`` its base layer and empty adapter state (call from ``__init__``)."""
    layer.base_layer = base_layer
    layer.adapters = nn.ModuleDict()
    layer.active = []
    layer.merged = []
    layer.disabled = False
    layer._run = []


def refresh(layer) -> None:
    layer._run = [] if layer.disabled else [layer.adapters[n] for n in layer.active if n not in layer.merged]


def set_active(layer, names: Sequence[str]) -> None:
    """Run the named adapters (those this layer has; others are ignored), in this order."""
    layer.active = [n for n in names if n in layer.adapters]
    refresh(layer)


def set_disabled(layer, disabled: bool) -> None:
    layer.disabled = disabled
    refresh(layer)


def delete_adapter(layer, name: str) -> None:
    if name in layer.merged:
        raise ValueError(f"adapter {name!r} is merged into the weights; unmerge it before deleting it")
    del layer.adapters[name]
    set_active(layer, [n for n in layer.active if n != name])


def base_weight(layer):
    """The base layer's weight (so code reading ``layer.weight`` keeps working)."""
    return layer.base_layer.weight
