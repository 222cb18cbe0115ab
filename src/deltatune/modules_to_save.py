"""Whole modules trained alongside adapters (e.g. a new classification head).

``ModulesToSaveWrapper`` keeps the untouched ``original_module`` and one trainable copy per adapter in
``modules_to_save`` (a ``ModuleDict``); ``forward`` runs the active adapter's copy, or the original
when adapters are disabled or the active adapter has no copy here.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn


class ModulesToSaveWrapper(nn.Module):
    """Dispatches to a per-adapter copy of ``original_module``."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False
        self.rows = None  # a mixed batch's RowPlan, for the duration of that call

    def add_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            raise ValueError(f"adapter {name!r} already has a copy of this module")
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:  # (nn.ModuleDict.pop takes no default)
            del self.modules_to_save[name]
        if self.active == name:
            self.active = None

    def set_active(self, names: Sequence[str]) -> None:
        """The first of ``names`` that has a copy here becomes active (copies cannot be summed)."""
        self.active = next((n for n in names if n in self.modules_to_save), None)

    def set_disabled(self, disabled: bool) -> None:
        self.disabled = disabled

    def current(self) -> nn.Module:
        if self.disabled or self.active is None:
            return self.original_module
        return self.modules_to_save[self.active]

    def route_rows(self, plan) -> None:
        """Run each row of the following calls through the copy of the adapter ``plan`` names for it (the
        original module for base rows and adapters without a copy here); None: back to the active one."""
        self.__dict__["rows"] = plan  # (set twice per call on every layer: skip nn.Module.__setattr__)

    def forward(self, *args, **kwargs):
        if self.rows is None:
            return self.current()(*args, **kwargs)
        return self._forward_rows(*args, **kwargs)

    def _forward_rows(self, x: Tensor, *args, **kwargs) -> Tensor:
        """One call of each distinct module on its rows of ``x`` (its first dimension: the batch, or a
        multiple of it), the results put back in row order."""
        plan = self.rows
        present = plan.present(self.modules_to_save._modules)
        slots = plan.slots(present, x.shape[0], x.device)
        modules = [self.original_module] + [self.modules_to_save[n] for n in present]
        parts, order = [], []
        for slot, module in enumerate(modules):
            index = (slots == slot).nonzero().flatten()
            if index.numel():
                parts.append(module(x.index_select(0, index), *args, **kwargs))
                order.append(index)
        if not all(isinstance(p, Tensor) for p in parts):
            raise TypeError(f"mixed-adapter batches: modules_to_save of type {type(self.original_module).__name__} "
                            f"return {type(parts[0]).__name__}, not a tensor")
        out = torch.cat(parts)
        return out.index_select(0, torch.argsort(torch.cat(order)))

    def __getattr__(self, name: str):
        # Attribute reads (``head.weight``, ``head.out_features``) see the module that runs.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.current(), name)
