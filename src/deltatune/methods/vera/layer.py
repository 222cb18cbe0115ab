"""VeRA layers: wrap a frozen ``nn.Linear`` / GPT-2 ``Conv1D`` and add ``Λ_b B Λ_d A x`` per active adapter,
with ``A``, ``B`` slices of the adapter's shared frozen projections (:mod:`.shared`)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ... import adapter_state
from ...adapter_layer import logical_shape
from ..lora.layer import _conv1d_type, adapter_dtype
from . import functional as VF
from .shared import Projections


class VeraAdapter(nn.Module):
    """One adapter in one layer: trainable ``vera_lambda_b: (out,)``, ``vera_lambda_d: (r,)``, the shared
    :class:`~.shared.Projections` and the input dropout."""

    def __init__(self, projections: Projections, out_features: int, dropout: float, device=None, dtype=None):
        super().__init__()
        r = projections.r
        self.vera_lambda_b = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        self.vera_lambda_d = nn.Parameter(torch.zeros(r, device=device, dtype=dtype))
        self.projections = projections
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def r(self) -> int:
        return self.projections.r


@adapter_state.peft_surface
class VeraLayer(nn.Module):
    """``y = base(x) + sum_a λ_b^a * ((λ_d^a * (drop(x) A_s^T)) B_s^T)`` over the active adapters ``a``."""

    checkpoint_kind = "vera"

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False):
        super().__init__()
        adapter_state.init(self, base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self.out_features, self.in_features = logical_shape(base_layer, fan_in_fan_out)[:2]
        self.rows = None  # a mixed batch's RowPlan, for the duration of that call (see route_rows)

    weight = property(adapter_state.base_weight)
    set_active = adapter_state.set_active
    set_disabled = adapter_state.set_disabled
    delete_adapter = adapter_state.delete_adapter
    _refresh = adapter_state.refresh

    @property
    def r(self) -> dict:
        return {n: a.r for n, a in self.adapters.items()}

    # ------------------------------------------------------------------ bookkeeping
    def add_adapter(self, name: str, projections: Projections, dropout: float = 0.0, init: bool = True,
                    d_initial: float = 0.1, autocast_adapter_dtype: bool = True, device=None) -> None:
        """Create adapter ``name`` on the base weight's device; ``init``: ``λ_b = 0``, ``λ_d = d_initial``
        (else ``λ_b = 1``, ``λ_d ~ N(0, 1)``). ``device="meta"``: empty, to be loaded."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        others = {a.projections.seed for a in self.adapters.values()} - {projections.seed}
        if others:
            raise ValueError(f"VeRA adapters of one model must share projection_prng_key (as in peft): this layer "
                             f"has {sorted(others)}, the new adapter {projections.seed}")
        weight = self.base_layer.weight
        adapter = VeraAdapter(projections, self.out_features, dropout, device=device or weight.device,
                              dtype=adapter_dtype(weight, autocast_adapter_dtype))
        if not adapter.vera_lambda_b.is_meta:
            with torch.no_grad():
                if init:
                    adapter.vera_lambda_d.fill_(d_initial)
                else:
                    adapter.vera_lambda_b.fill_(1.0)
                    adapter.vera_lambda_d.normal_()
        self.adapters[name] = adapter

    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        ad = self.adapters[name]
        return {"vera_lambda_b": ad.vera_lambda_b, "vera_lambda_d": ad.vera_lambda_d}

    # ------------------------------------------------------------------ forward
    def _delta(self, ad: VeraAdapter, x: Tensor) -> Tensor:
        lam_d, lam_b = ad.vera_lambda_d, ad.vera_lambda_b
        A, B = ad.projections.sliced(self.in_features, self.out_features, lam_d)
        return VF.delta(ad.dropout(x.to(lam_d.dtype)), A, B, lam_d, lam_b)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.rows is not None:
            return self._forward_rows(x, out)
        for ad in self._run:
            out = out + self._delta(ad, x).to(out.dtype)
        return out

    def route_rows(self, plan) -> None:
        """Run each row of the following calls through the adapter ``plan`` names for it (a
        :class:`~deltatune.row_routing.RowPlan`; None: back to the active adapters)."""
        self.rows = plan

    def _forward_rows(self, x: Tensor, out: Tensor) -> Tensor:
        """Each adapter's delta computed on its own rows only and added there (base rows, and rows of
        adapters this layer lacks, keep the base output)."""
        present = self.rows.present(self.adapters)
        if not present:
            return out
        slots = self.rows.slots(present, x.shape[0], x.device)
        out = out.clone()
        for i, name in enumerate(present):
            index = (slots == i + 1).nonzero().flatten()
            if index.numel():
                part = self._delta(self.adapters[name], x.index_select(0, index)).to(out.dtype)
                out = out.index_add(0, index, part)
        return out

    # ------------------------------------------------------------------ merging
    def merge(self, names: Optional[Sequence[str]] = None, safe: bool = False) -> None:
        """Add ``ΔW = Λ_b B Λ_d A`` into the base weight (transposed for ``Conv1D``)."""
        adapter_state.merge_adapters(self, names, safe, self._merged_weight)

    def unmerge(self) -> None:
        """Subtract every merged ``ΔW`` again, last merged first."""
        adapter_state.unmerge_adapters(self, self._unmerged_weight)

    def delta_weight(self, name: str) -> Tensor:
        """Adapter ``name``'s ``ΔW`` in the stored layout, float32 or wider."""
        ad = self.adapters[name]
        lam_d, lam_b = ad.vera_lambda_d.detach(), ad.vera_lambda_b.detach()
        wide = torch.promote_types(lam_d.dtype, torch.float32)
        A, B = ad.projections.sliced(self.in_features, self.out_features, lam_d.to(wide))
        dw = VF.delta_weight(A, B, lam_d.to(wide), lam_b.to(wide))
        return dw.T if self.fan_in_fan_out else dw

    def _merged_weight(self, name: str, weight: Tensor) -> Tensor:
        dw = self.delta_weight(name)
        return weight.to(torch.promote_types(weight.dtype, dw.dtype)) + dw.to(weight.device)

    def _unmerged_weight(self, name: str, weight: Tensor) -> Tensor:
        dw = self.delta_weight(name)
        return weight.to(torch.promote_types(weight.dtype, dw.dtype)) - dw.to(weight.device)


def is_linear(module: nn.Module) -> bool:
    """What ``"all-linear"`` selects: ``nn.Linear`` and transformers' ``Conv1D``."""
    return isinstance(module, (nn.Linear, _conv1d_type()))


def wrap_module(module: nn.Module) -> VeraLayer:
    conv1d = _conv1d_type()
    if conv1d and isinstance(module, conv1d):
        return VeraLayer(module, fan_in_fan_out=True)
    if isinstance(module, nn.Linear):
        return VeraLayer(module)
    raise TypeError(f"VeRA does not support modules of type {type(module).__name__}; supported: torch.nn.Linear "
                    "and transformers' Conv1D")
