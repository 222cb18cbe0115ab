"""Which adapters of an adapter layer run: bookkeeping shared by every method's layers.

A layer keeps ``adapters`` (``nn.ModuleDict`` name -> adapter module), ``active`` and ``merged_adapters`` (name
lists) and ``disabled``; ``_run`` is the list of adapter modules its forward applies, recomputed only when
one of those changes. Layers take these functions as methods (``set_active = adapter_state.set_active``)
instead of inheriting them, so each method's layer class stays a direct ``nn.Module``.

Merging is bookkeeping too (a merged adapter stops running): :func:`merge_adapters` and
:func:`unmerge_adapters` are the one merge loop of every method; a method supplies only its per-adapter
math, ``merged_weight(name, W) -> W'`` and its inverse (and, if it changes the bias, the same for ``b``).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .adapter_layer import read_weight, write_weight

#: ``(adapter name, current tensor) -> new tensor``: one adapter's merge (or unmerge) math.
Update = Callable[[str, Tensor], Tensor]


def init(layer: nn.Module, base_layer: nn.Module) -> None:
    """Give ``layer`` its base layer and empty adapter state (call from ``__init__``)."""
    layer.base_layer = base_layer
    layer.adapters = nn.ModuleDict()
    layer.active = []
    layer.merged_adapters = []
    layer.disabled = False
    layer._run = []


def refresh(layer) -> None:
    layer._run = [] if layer.disabled else [layer.adapters[n] for n in layer.active if n not in layer.merged_adapters]


def set_active(layer, names: Sequence[str]) -> None:
    """Run the named adapters (those this layer has; others are ignored), in this order."""
    layer.active = [n for n in names if n in layer.adapters]
    refresh(layer)


def set_disabled(layer, disabled: bool) -> None:
    layer.disabled = disabled
    refresh(layer)


def delete_adapter(layer, name: str) -> None:
    if name in layer.merged_adapters:
        raise ValueError(f"adapter {name!r} is merged into the weights; unmerge it before deleting it")
    del layer.adapters[name]
    set_active(layer, [n for n in layer.active if n != name])


def base_weight(layer):
    """The base layer's weight (so code reading ``layer.weight`` keeps working)."""
    return layer.base_layer.weight


class PeftLayerSurface:
    """What code written for peft reads and calls on an adapter layer, as views onto the state above
    (class attributes a layer class copies: ``active_adapters = PeftLayerSurface.active_adapters``, ...).
    """

    @property
    def active_adapters(self) -> list[str]:
        return list(self.active)

    @property
    def merged(self) -> bool:
        """Whether any adapter is merged into the base weight."""
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self.disabled

    def enable_adapters(self, enabled: bool) -> None:
        set_disabled(self, not enabled)

    def set_adapter(self, adapter_names) -> None:
        """Run ``adapter_names`` (a name or a list); as in peft, their tensors become trainable and the other
        adapters' frozen."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.set_active(names)
        for name, adapter in self.adapters.items():
            adapter.requires_grad_(name in names)


def peft_surface(cls: type) -> type:
    """Give layer class ``cls`` the members of :class:`PeftLayerSurface` (a decorator, no inheritance)."""
    for name, member in vars(PeftLayerSurface).items():
        if not name.startswith("_"):
            setattr(cls, name, member)
    return cls


def merge_adapters(layer, names: Optional[Sequence[str]], safe: bool, merged_weight: Update,
                   merged_bias: Optional[Update] = None) -> None:
    """Fold adapters into ``layer.base_layer``, one at a time; the shared body of every ``merge``.

    For each of ``names`` (default: ``layer.active``) that the layer has and has not merged yet:
    ``W <- merged_weight(name, W)`` and, when ``merged_bias`` is given and the base has a bias,
    ``b <- merged_bias(name, b)``; then ``name`` is appended to ``layer.merged_adapters``. ``W`` comes from
    :func:`~deltatune.adapter_layer.read_weight` (dequantized float32 for 4/8-bit bases) and goes back
    through :func:`~deltatune.adapter_layer.write_weight` (quantized again, with a warning).

    Args:
        layer: An :class:`~deltatune.adapter_layer.AdapterLayer`.
        names: Adapters to merge, in order; None: the active ones.
        safe: Check every new tensor for NaN/inf before anything of that adapter is written; raise
            ValueError (the weights keep their values) if one is found.
        merged_weight: ``(name, W in stored layout) -> W'`` (any float dtype; cast on write).
        merged_bias: ``(name, b) -> b'``, for methods that scale the bias ((IA)^3 output scaling).
    """
    try:
        for name in layer.active if names is None else names:
            if name in layer.merged_adapters or name not in layer.adapters:
                continue
            _apply(layer, name, merged_weight, merged_bias, safe)
            layer.merged_adapters.append(name)
    finally:  # an adapter merged before an error stays merged, and stops running
        refresh(layer)


def unmerge_adapters(layer, unmerged_weight: Update, unmerged_bias: Optional[Update] = None) -> None:
    """Undo every merge of ``layer``, last merged first: ``W <- unmerged_weight(name, W)`` (and the bias
    likewise). An adapter leaves ``layer.merged_adapters`` only once its weights are written back, so an error in
    its math (say, an (IA)^3 vector with a zero) leaves it merged and the weights consistent with that."""
    try:
        while layer.merged_adapters:
            _apply(layer, layer.merged_adapters[-1], unmerged_weight, unmerged_bias, safe=False)
            layer.merged_adapters.pop()
    finally:
        refresh(layer)


def _apply(layer, name: str, weight_fn: Update, bias_fn: Optional[Update], safe: bool) -> None:
    """Compute adapter ``name``'s new weight (and bias) first, check them if ``safe``, then write both."""
    base = layer.base_layer
    bias = getattr(base, "bias", None) if bias_fn is not None else None
    with torch.no_grad():
        new_w = weight_fn(name, read_weight(base))
        new_b = None if bias is None else bias_fn(name, bias)
        if safe and not all(torch.isfinite(t).all() for t in (new_w, new_b) if t is not None):
            raise ValueError(f"merging adapter {name!r} into {type(base).__name__} produced NaN/inf values; "
                             "the weights were left unchanged")
        write_weight(base, new_w)
        if new_b is not None and new_b is not bias:  # (a method may leave the bias as it is)
            bias.copy_(new_b)
