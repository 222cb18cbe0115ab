"""AdaLoRA layers: ``y = base(x) + s / (r0 + 1e-5) * B (A * E) drop(x)`` per active adapter (Linear, Conv1D,
bitsandbytes 4/8-bit linear layers: the adapter runs beside the base, sized by its logical shape)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import adapter_state
from ...adapter_layer import logical_shape
from ..lora import functional as LF
from ..lora.layer import adapter_dtype


class SVDAdapter(nn.Module):
    """``lora_A (r, in)``, ``lora_E (r, 1)``, ``lora_B (out, r)``; ``r0`` (peft's ``ranknum``) is the initial
    rank and stays the divisor even after pruning or resizing, so a reloaded adapter computes the same."""

    def __init__(self, r: int, in_f: int, out_f: int, scaling: float, dropout: float, r0: int, device, dtype):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, in_f, device=device, dtype=dtype))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_f, r, device=device, dtype=dtype))
        self.scaling, self.dropout, self.r0 = float(scaling), float(dropout), int(r0)
        self.keep: Optional[Tensor] = None  # (r,) bool once ranks are pruned; saved tensors keep only these

    def factor(self) -> float:
        return self.scaling / (self.r0 + 1e-5)


@adapter_state.peft_surface
class SVDLinear(nn.Module):
    """AdaLoRA on ``nn.Linear``, GPT-2 ``Conv1D`` (``fan_in_fan_out``) or a bitsandbytes 4/8-bit linear layer:
    ``y = base(x) + s / (r0 + 1e-5) * B (A * E) drop(x)``, ``x: (..., in)`` -> ``y: (..., out)``."""

    checkpoint_kind = "adalora"

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False):
        super().__init__()
        adapter_state.init(self, base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        # (bitsandbytes 4-bit weights are packed: the sizes come from the logical shape, not weight.shape)
        self.out_features, self.in_features = logical_shape(base_layer, fan_in_fan_out)

    weight = property(adapter_state.base_weight)
    set_active = adapter_state.set_active
    set_disabled = adapter_state.set_disabled
    delete_adapter = adapter_state.delete_adapter
    _refresh = adapter_state.refresh

    def add_adapter(self, name: str, r: int, r0: int, scaling: float, dropout: float, init: bool = True,
                    autocast_adapter_dtype: bool = True, device=None) -> None:
        """Create adapter ``name`` on the base weight's device (``device="meta"``: empty, to be loaded)."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        weight = self.base_layer.weight
        ad = SVDAdapter(r, self.in_features, self.out_features, scaling, dropout, r0, device or weight.device,
                        adapter_dtype(weight, autocast_adapter_dtype))
        with torch.no_grad():  # E = 0: the layer starts as the base; A and B small random (as in the paper)
            nn.init.normal_(ad.lora_A, std=0.02)
            nn.init.normal_(ad.lora_B, std=0.02)
            if not init:
                nn.init.normal_(ad.lora_E)
        self.adapters[name] = ad

    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        ad = self.adapters[name]
        return {"lora_A": ad.lora_A, "lora_B": ad.lora_B, "lora_E": ad.lora_E}

    def saved_params(self, name: str) -> dict[str, Tensor]:
        """What goes into a file: only the triplets the rank pattern kept (peft's layout)."""
        ad = self.adapters[name]
        if ad.keep is None:
            return self.adapter_params(name)
        k = ad.keep
        return {"lora_A": ad.lora_A[k], "lora_B": ad.lora_B[:, k], "lora_E": ad.lora_E[k]}

    def delta_weight(self, name: str) -> Tensor:
        ad = self.adapters[name]
        delta = (ad.lora_B.float() @ (ad.lora_A.float() * ad.lora_E.float())) * ad.factor()
        return delta.t() if self.fan_in_fan_out else delta

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.base_layer(x, *args, **kwargs)
        for ad in self._run:
            xa = x if x.dtype == ad.lora_A.dtype else x.to(ad.lora_A.dtype)
            if ad.dropout > 0 and self.training:
                xa = F.dropout(xa, ad.dropout, True)
            delta = F.linear(F.linear(xa, ad.lora_A * ad.lora_E) * ad.factor(), ad.lora_B)
            out = out + delta.to(out.dtype)
        return out

    def merge(self, names: Optional[Sequence[str]] = None, safe: bool = False) -> None:
        """``W' = W + s / (r0 + 1e-5) * B (A * E)`` per adapter (see
        :func:`deltatune.adapter_state.merge_adapters`; 4/8-bit bases are quantized again, with a warning)."""
        adapter_state.merge_adapters(self, names, safe, self._merged_weight)

    def unmerge(self) -> None:
        adapter_state.unmerge_adapters(self, self._unmerged_weight)

    def _merged_weight(self, name: str, weight: Tensor) -> Tensor:
        return LF.add_delta(weight, self.delta_weight(name))

    def _unmerged_weight(self, name: str, weight: Tensor) -> Tensor:
        return LF.add_delta(weight, self.delta_weight(name), sign=-1.0)


def wrap_module(module: nn.Module) -> SVDLinear:
    from ..lora.layer import _conv1d_type

    conv1d = _conv1d_type()
    if conv1d and isinstance(module, conv1d):
        return SVDLinear(module, fan_in_fan_out=True)
    if isinstance(module, nn.Linear):
        return SVDLinear(module)
    raise TypeError(f"AdaLoRA does not support modules of type {type(module).__name__}; supported: torch.nn.Linear "
                    "and transformers' Conv1D")
