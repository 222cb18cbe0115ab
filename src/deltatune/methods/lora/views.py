"""peft's per-adapter mappings on a LoRA layer, as views onto deltatune's ``layer.adapters``.

Code written for peft reads and edits adapters through ``layer.lora_A[name].weight``,
``layer.lora_B[name].weight``, ``layer.lora_magnitude_vector[name].weight``, ``layer.r[name]``,
``layer.scaling[name]``, ``layer.lora_alpha[name]`` and ``layer.lora_dropout[name]``. deltatune keeps one
:class:`~.layer.LoraAdapter` per name instead; these mappings read and write its fields, so the two never
disagree.

``lora_alpha`` is not stored: an adapter holds only its scaling ``s``, and alpha is read back as
``s * r`` (``s * sqrt(r)`` for an rsLoRA adapter, one whose ``use_rslora`` attribute is true). Writing
alpha therefore sets ``s`` to ``alpha / r`` (``alpha / sqrt(r)``). peft keeps alpha in a separate dict,
where a write changes nothing until ``set_scale`` / ``unscale_layer`` recomputes the scaling from it; here
the write takes effect at once, as that recomputation would.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping
from typing import Iterator

from torch import nn


class _Holder:
    """``.weight`` of one adapter tensor: reads give the parameter; an assigned parameter replaces it."""

    __slots__ = ("_adapter", "_role")

    def __init__(self, adapter: nn.Module, role: str):
        self._adapter, self._role = adapter, role

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self._adapter, self._role)

    @weight.setter
    def weight(self, value: nn.Parameter) -> None:
        old = getattr(self._adapter, self._role)
        if not isinstance(value, nn.Parameter) or value.shape != old.shape:
            raise ValueError(f"{self._role} must be replaced by an nn.Parameter of shape {tuple(old.shape)}")
        setattr(self._adapter, self._role, value)

    @property
    def bias(self):
        """``lora_B[name].bias``: the adapter's ``lora_bias`` (None without one), as peft's ``nn.Linear`` has."""
        return getattr(self._adapter, f"{self._role}_bias", None)

    def __repr__(self) -> str:
        return f"{self._role}({tuple(self.weight.shape)})"


class _View(Mapping):
    """``{adapter name: value}`` over a layer's adapters; ``read`` gives the value of one adapter."""

    def __init__(self, layer, read, only=None):
        self._layer, self._read, self._only = layer, read, only  # only: which adapters belong (None: all)

    def _names(self) -> list[str]:
        return [n for n, ad in self._layer.adapters.items() if self._only is None or self._only(ad)]

    def __getitem__(self, name: str):
        if name not in self._names():
            raise KeyError(name)
        return self._read(self._layer.adapters[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return repr(dict(self))


class _Scalings(_View, MutableMapping):
    """``layer.scaling``: writable, as peft code sets ``scaling[name]`` to rescale an adapter."""

    def __setitem__(self, name: str, value: float) -> None:
        self._layer.adapters[name].set_scaling(value)  # (the layer's cache stamps the scaling: it follows)

    def __delitem__(self, name: str) -> None:
        raise TypeError("delete the adapter itself (delete_adapter), not its scaling")


def _alpha_divisor(adapter) -> float:
    """What alpha is divided by to give the scaling: ``r``, or ``sqrt(r)`` for an rsLoRA adapter."""
    return math.sqrt(adapter.r) if adapter.use_rslora else adapter.r


class _Alphas(_View, MutableMapping):
    """``layer.lora_alpha``: read as ``s * r`` (rsLoRA: ``s * sqrt(r)``); a write sets ``s`` from it."""

    def __setitem__(self, name: str, value: float) -> None:
        # A bool is an int to Python, but lora_alpha=True is a mistake, not the number 1.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"lora_alpha[{name!r}] must be a finite number, got {value!r}")
        adapter = self._layer.adapters[name]
        adapter.set_scaling(value / _alpha_divisor(adapter))

    def __delitem__(self, name: str) -> None:
        raise TypeError("delete the adapter itself (delete_adapter), not its lora_alpha")


def _read_alpha(adapter) -> float:
    return float(adapter.scaling) * _alpha_divisor(adapter)


def _tensor_view(role: str):
    def view(layer) -> _View:
        return _View(layer, lambda ad: _Holder(ad, role))
    return property(view, doc=f"peft's ``{role}[name].weight``: adapter ``name``'s ``{role}``.")


def _magnitudes(layer) -> _View:
    """DoRA adapters only (as in peft, where the mapping holds the adapters that use DoRA)."""
    return _View(layer, lambda ad: _Holder(ad, "lora_magnitude_vector"),
                 only=lambda ad: ad.lora_magnitude_vector is not None)


lora_A = _tensor_view("lora_A")
lora_B = _tensor_view("lora_B")
lora_magnitude_vector = property(_magnitudes, doc=_magnitudes.__doc__)
r = property(lambda layer: _View(layer, lambda ad: ad.r), doc="peft's ``r[name]``: adapter ``name``'s rank.")
scaling = property(lambda layer: _Scalings(layer, lambda ad: ad.scaling),
                   doc="peft's ``scaling[name]``: adapter ``name``'s ``s`` (writable).")
lora_alpha = property(lambda layer: _Alphas(layer, _read_alpha),
                      doc="peft's ``lora_alpha[name]``: adapter ``name``'s alpha (writable; sets its scaling).")
lora_dropout = property(lambda layer: _View(layer, lambda ad: nn.Dropout(ad.dropout) if ad.dropout else nn.Identity()),
                        doc="peft's ``lora_dropout[name]``: a module applying adapter ``name``'s dropout rate.")

#: The names :func:`install` puts on a layer class.
NAMES = ("lora_A", "lora_B", "lora_magnitude_vector", "r", "scaling", "lora_alpha", "lora_dropout")


def install(cls: type) -> type:
    """Give LoRA layer class ``cls`` the views (a decorator)."""
    for name in NAMES:
        setattr(cls, name, globals()[name])
    return cls
