"""Whole modules trained alongside adapters (e.g. a new classification head).

``ModulesToSaveWrapper`` keeps the untouched ``original_module`` and one trainable copy per adapter in
``modules_to_save`` (a ``ModuleDict``); ``forward`` runs the active adapter's copy, or the original
when adapters are disabled or the active adapter has no copy here.
"""

from __future__ import annotations

import copy
from typing import Sequence

from torch import nn


class ModulesToSaveWrapper(nn.Module):
    """Dispatches to a per-adapter copy of ``original_module``."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False

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

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)

    def __getattr__(self, name: str):
        # Attribute reads (``head.weight``, ``head.out_features``) see the module that runs.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.current(), name)
