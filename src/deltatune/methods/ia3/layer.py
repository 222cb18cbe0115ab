"""(IA)^3 layers: wrap a frozen ``base_layer`` and rescale its output (or input) per active adapter.

The base may be a bitsandbytes 4/8-bit linear layer: the forward only calls it, the vector sizes come from
its logical shape, and merging goes through the dequantized weight (:mod:`deltatune.adapter_layer`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ... import adapter_state
from ...adapter_layer import logical_shape
from ..lora.layer import adapter_dtype
from . import functional as IF


class IA3Adapter(nn.Module):
    """One adapter's vector ``ia3_l`` in peft's storage shape: ``(out, 1)`` for output scaling,
    ``(1, in)`` for input (feed-forward) scaling, ``(1, C, 1, ...)`` for convolutions."""

    def __init__(self, shape: Sequence[int], feedforward: bool, device=None, dtype=None):
        super().__init__()
        self.ia3_l = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
        self.feedforward = feedforward

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}, size={self.ia3_l.numel()}"


@adapter_state.peft_surface
class IA3Layer(nn.Module):
    """``y = base(x) * l`` (output scaling) or ``y = base(x * l)`` (feed-forward modules); several active
    adapters multiply. Works on ``nn.Linear``, GPT-2 ``Conv1D``, ``nn.Conv1d/2d/3d`` and bitsandbytes
    ``Linear4bit`` / ``Linear8bitLt``."""

    checkpoint_kind = "ia3"

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False):
        super().__init__()
        adapter_state.init(self, base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self._conv = isinstance(base_layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        # (bitsandbytes 4-bit weights are packed: the sizes come from the logical shape, not weight.shape)
        self.out_features, self.in_features = logical_shape(base_layer, fan_in_fan_out)[:2]

    weight = property(adapter_state.base_weight)
    set_active = adapter_state.set_active
    set_disabled = adapter_state.set_disabled
    delete_adapter = adapter_state.delete_adapter
    _refresh = adapter_state.refresh

    # ------------------------------------------------------------------ shapes
    def _shape(self, feedforward: bool) -> tuple[int, ...]:
        """``ia3_l``'s storage shape (see :class:`IA3Adapter`), from the logical weight shape."""
        size = self.in_features if feedforward else self.out_features
        if self._conv:
            return (1, size) + (1,) * (self.base_layer.weight.dim() - 2)
        return (1, size) if feedforward else (size, 1)

    # ------------------------------------------------------------------ bookkeeping
    def add_adapter(self, name: str, feedforward: bool, init: bool = True, autocast_adapter_dtype: bool = True,
                    device=None) -> None:
        """Create adapter ``name`` on the base weight's device (``device="meta"``: empty, to be loaded)."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        weight = self.base_layer.weight
        adapter = IA3Adapter(self._shape(feedforward), feedforward, device=device or weight.device,
                             dtype=adapter_dtype(weight, autocast_adapter_dtype))
        if not init and not adapter.ia3_l.is_meta:
            with torch.no_grad():
                adapter.ia3_l.normal_(1.0, 0.2)
        self.adapters[name] = adapter

    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        return {"ia3_l": self.adapters[name].ia3_l}

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if not self._run:
            return self.base_layer(x, *args, **kwargs)
        ch = 1 if self._conv else -1
        scale_in = scale_out = None
        for ad in self._run:
            l = ad.ia3_l.reshape(-1)
            if ad.feedforward:
                scale_in = l if scale_in is None else scale_in * l
            else:
                scale_out = l if scale_out is None else scale_out * l
        if scale_in is not None:
            x = x * IF.along(scale_in, x, ch).to(x.dtype)
        out = self.base_layer(x, *args, **kwargs)
        if scale_out is not None:
            out = out * IF.along(scale_out, out, ch).to(out.dtype)
        return out

    # ------------------------------------------------------------------ merging
    def _weight_dims(self) -> tuple[int, int]:
        """(output dim, input dim) of the base weight."""
        return (1, 0) if self.fan_in_fan_out else (0, 1)

    def merge(self, names: Optional[Sequence[str]] = None, safe: bool = False) -> None:
        """Fold the vectors into the weight (rows for output scaling, columns for input scaling) and,
        for output scaling, into the bias: ``W' = diag(l) W, b' = b * l`` or ``W' = W diag(l)``. On a
        4/8-bit base the weight is dequantized, scaled and quantized again (with a warning)."""
        adapter_state.merge_adapters(self, names, safe, self._merged_weight, self._merged_bias)

    def unmerge(self) -> None:
        """Undo every merge, last merged first (``W' = diag(1 / l) W`` ...); a vector with a zero entry
        cannot be undone and raises ValueError, leaving that adapter merged."""
        adapter_state.unmerge_adapters(self, self._unmerged_weight, self._unmerged_bias)

    def _merged_weight(self, name: str, weight: Tensor, inverse: bool = False) -> Tensor:
        ad = self.adapters[name]
        out_dim, in_dim = self._weight_dims()
        return IF.scale_weight(weight, self._vector(name, inverse), in_dim if ad.feedforward else out_dim, inverse)

    def _unmerged_weight(self, name: str, weight: Tensor) -> Tensor:
        return self._merged_weight(name, weight, inverse=True)

    def _merged_bias(self, name: str, bias: Tensor, inverse: bool = False) -> Tensor:
        """Output scaling multiplies the bias too; input scaling leaves it as it is."""
        if self.adapters[name].feedforward:
            return bias
        return IF.scale_weight(bias, self._vector(name, inverse), 0, inverse)

    def _unmerged_bias(self, name: str, bias: Tensor) -> Tensor:
        return self._merged_bias(name, bias, inverse=True)

    def _vector(self, name: str, inverse: bool) -> Tensor:
        """Adapter ``name``'s ``l`` as a flat ``(n,)`` tensor; dividing by it needs every entry nonzero."""
        l = self.adapters[name].ia3_l.detach().reshape(-1)
        if inverse and (l == 0).any():
            raise ValueError("cannot unmerge an (IA)^3 vector that has zero entries (division by zero)")
        return l


def wrap_module(module: nn.Module) -> IA3Layer:
    from ..lora.layer import _conv1d_type

    conv1d = _conv1d_type()
    if conv1d and isinstance(module, conv1d):
        return IA3Layer(module, fan_in_fan_out=True)
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups != 1:
            raise TypeError(f"(IA)^3 on grouped convolutions (groups={module.groups}) is not supported")
        return IA3Layer(module)
    raise TypeError(f"(IA)^3 does not support modules of type {type(module).__name__}; supported: torch.nn.Linear, "
                    "torch.nn.Conv1d/2d/3d and transformers' Conv1D")
