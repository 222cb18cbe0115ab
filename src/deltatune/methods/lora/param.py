"""LoRA on a named ``nn.Parameter`` (``LoraConfig(target_parameters=[...])``), e.g. mixture-of-experts
weights that transformers 5 keeps as one 3-D tensor per projection instead of ``nn.Linear`` modules.

A :class:`LoraParameter` wraps the module owning the parameter (or, for a second parameter of the same
module, the first one's wrapper: wrappers nest through ``base_layer`` as peft nests its ``ParamWrapper``,
so checkpoint keys agree: the module's last targeted parameter is outermost). Per adapter, for a parameter
of shape ``(E, out, in)`` (``E`` experts; a 2-D ``(out, in)`` parameter is ``E = 1``), peft's layout:

    ``lora_A: (E r, in)`` viewed as ``A_e = A[e r:(e + 1) r]``, ``(r, in)``
    ``lora_B: (out, r E)`` viewed as ``(out, r, E)``, ``B_e = B[:, :, e]``, ``(out, r)``
    ``W_e <- W_e + s B_e A_e``

The forward computes the adapted parameter and runs the owning module with it in place of the stored one
(``torch.func.functional_call``: the module itself is not changed); merging writes it into the parameter.
As in peft: no dropout, no DoRA, no ``lora_bias``; and these layers do not route rows (mixed-adapter
batches refuse them).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .layer import LoraAdapter, LoraLayer, adapter_dtype
from .variants import LORA


def param_delta(A: Tensor, B: Tensor, scaling: float, experts: int, transposed: bool = False) -> Tensor:
    """``s B_e A_e`` per expert: ``(E, out, in)`` (``(E, in, out)`` if ``transposed``); ``(out, in)`` for E = 1."""
    r = A.shape[0] // experts
    A3 = A.reshape(experts, r, A.shape[1])  # (E, r, in)
    B3 = B.reshape(B.shape[0], r, experts).permute(2, 0, 1)  # (E, out, r)
    delta = torch.bmm(B3, A3) * scaling  # (E, out, in)
    if transposed:
        delta = delta.transpose(1, 2)
    return delta[0] if experts == 1 else delta


class LoraParameter(LoraLayer):
    """LoRA on one parameter ``parameter_name`` of the module at the bottom of the ``base_layer`` chain."""

    route_rows = None  # (mixed-adapter batches: refused, see row_routing.check)

    def __init__(self, base_layer: nn.Module, parameter_name: str):
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        param = self._param()
        if param.dim() not in (2, 3):
            raise TypeError(f"target_parameters: {parameter_name!r} has {param.dim()} dimensions; LoRA takes 2-D "
                            "and 3-D (experts) parameters")
        owner = self._owner()
        # transformers' MoE experts store (E, out, in) unless the module says is_transposed (then (E, in, out))
        self.transposed = param.dim() == 3 and bool(getattr(owner, "is_transposed", False))
        self.experts = param.shape[0] if param.dim() == 3 else 1
        if param.dim() == 2:
            self.out_features, self.in_features = param.shape
        elif self.transposed:
            self.in_features, self.out_features = param.shape[1:]
        else:
            self.out_features, self.in_features = param.shape[1:]

    def _owner(self) -> nn.Module:
        module = self.base_layer
        while isinstance(module, LoraParameter):
            module = module.base_layer
        return module

    def _param(self) -> nn.Parameter:
        return self._owner()._parameters[self.parameter_name]

    def _path(self) -> str:
        """The parameter's name as seen from ``self.base_layer`` (through inner wrappers)."""
        depth, module = 0, self.base_layer
        while isinstance(module, LoraParameter):
            depth, module = depth + 1, module.base_layer
        return "base_layer." * depth + self.parameter_name

    @property
    def weight(self):  # (the layer surface reads a base weight; here it is the targeted parameter)
        return self._param()

    def _check_options(self, use_dora: bool, lora_bias: bool) -> None:
        if use_dora or lora_bias:
            raise TypeError("target_parameters: DoRA and lora_bias are not available on parameters (as in peft)")

    def _shapes(self, r):
        return (r * self.experts, self.in_features), (self.out_features, r * self.experts)

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float = 0.0, init=True,
                    autocast_adapter_dtype: bool = True, use_dora: bool = False, device=None,
                    lora_bias: bool = False) -> None:
        """Create adapter ``name`` (see :meth:`LoraLayer.add_adapter`); dropout, DoRA, lora_bias and
        PiSSA/OLoRA initialisations are refused, as peft refuses them on parameters."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        self._check_options(use_dora, lora_bias)
        if dropout:
            raise ValueError("target_parameters: lora_dropout must be 0 (x cannot be factored out of B A x per "
                             "expert, as in peft)")
        if isinstance(init, str) and init.startswith(("pissa", "olora")):
            raise ValueError(f"target_parameters: init_lora_weights={init!r} is not available on parameters")
        param = self._param()
        a_shape, b_shape = self._shapes(r)
        adapter = LoraAdapter(a_shape, b_shape, scaling, 0.0, LORA, device=device or param.device,
                              dtype=adapter_dtype(param, autocast_adapter_dtype))
        adapter.r = r  # (per expert; lora_A holds E r rows)
        if not adapter.lora_A.is_meta:
            self._init_adapter(adapter, init)
        self.adapters[name] = adapter

    def delta_weight(self, name: str) -> Tensor:
        ad = self.adapters[name]
        return param_delta(ad.lora_A.float(), ad.lora_B.float(), ad.scaling, self.experts, self.transposed)

    def forward(self, *args, **kwargs):
        run = self._run
        if not run:
            return self.base_layer(*args, **kwargs)
        param = self._param()
        delta = None
        for ad in run:
            d = param_delta(ad.lora_A, ad.lora_B, ad.scaling, self.experts, self.transposed)
            delta = d if delta is None else delta + d
        adapted = param + delta.to(param.dtype)
        return torch.func.functional_call(self.base_layer, {self._path(): adapted}, args, kwargs)

    # ------------------------------------------------------------------ merging (the parameter, not a weight)
    def merge(self, names: Optional[Sequence[str]] = None, safe: bool = False) -> None:
        """Add the adapters' deltas into the parameter (computed in float32, cast once); ``safe``: check for
        NaN/inf before writing."""
        self.cache.clear()
        param = self._param()
        try:
            for name in self.active if names is None else names:
                if name in self.merged_adapters or name not in self.adapters:
                    continue
                new = param.detach().float() + self.delta_weight(name)
                if safe and not torch.isfinite(new).all():
                    raise ValueError(f"merging adapter {name!r} into {self.parameter_name!r} produced NaN/inf values; "
                                     "the parameter was left unchanged")
                with torch.no_grad():
                    param.copy_(new.to(param.dtype))
                self.merged_adapters.append(name)
        finally:
            self._refresh()

    def unmerge(self) -> None:
        self.cache.clear()
        param = self._param()
        try:
            while self.merged_adapters:
                name = self.merged_adapters[-1]
                with torch.no_grad():
                    param.copy_((param.detach().float() - self.delta_weight(name)).to(param.dtype))
                self.merged_adapters.pop()
        finally:
            self._refresh()

    def _read_weight(self) -> Tensor:
        return self._param().detach()


def wrap_parameter(module: nn.Module, parameter_name: str) -> LoraParameter:
    """A fresh wrapper for ``module``'s parameter ``parameter_name`` (``module`` may be another wrapper)."""
    return LoraParameter(module, parameter_name)
