"""LoRA on ``nn.MultiheadAttention`` (CLIP/ViT-style vision towers), laid out as peft does.

``nn.MultiheadAttention`` keeps the query/key/value projection as one parameter ``in_proj_weight``
``(3E, E)`` and reads ``out_proj.weight`` directly (never calling ``out_proj``). Targeting the attention
module adapts both, each with its own rank-r pair per adapter, as peft does (one cannot be adapted
without the other):

- ``in_proj_weight``: this layer, a :class:`~.param.LoraParameter` (``lora_A: (r, E)``, ``lora_B: (3E, r)``);
- ``out_proj``: a :class:`~.linear.LoraLinear` put in the attention module's place of ``out_proj``
  (checkpoint keys ``<attn>.base_layer.out_proj.lora_A.weight``, ...), a layer of its own for activation,
  saving, loading and merging.

The forward runs the attention module with both weights adapted (``torch.func.functional_call``; the
module is not changed). Only ``_qkv_same_embed_dim`` attention is supported, as in peft. Dropout cannot be
applied inside the fused attention call: as in peft, it is not (a warning says so when it is set).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .linear import LoraLinear
from .param import LoraParameter


class LoraMultiheadAttention(LoraParameter):
    """LoRA on ``nn.MultiheadAttention``: ``in_proj_weight`` here, ``out_proj`` as a nested LoRA layer."""

    def __init__(self, base_layer: nn.MultiheadAttention):
        if not base_layer._qkv_same_embed_dim:
            raise TypeError("LoRA on nn.MultiheadAttention needs query, key and value of the same size "
                            "(_qkv_same_embed_dim), as in peft")
        if not isinstance(base_layer.out_proj, (nn.Linear, LoraLinear)):
            raise TypeError(f"LoRA on nn.MultiheadAttention needs an nn.Linear out_proj, got "
                            f"{type(base_layer.out_proj).__name__}")
        super().__init__(base_layer, "in_proj_weight")
        if not isinstance(base_layer.out_proj, LoraLinear):
            base_layer.out_proj = LoraLinear(base_layer.out_proj)

    def _out_layer(self) -> LoraLinear:
        return self.base_layer.out_proj

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float = 0.0, init=True,
                    autocast_adapter_dtype: bool = True, use_dora: bool = False, device=None,
                    lora_bias: bool = False) -> None:
        """Adapter ``name`` on ``in_proj_weight`` and on ``out_proj`` (same rank and scaling)."""
        self._check_options(use_dora, lora_bias)
        if dropout:
            warnings.warn("lora_dropout is not applied on nn.MultiheadAttention: the adapted weights go into one "
                          "fused attention call (peft does not apply it either)", UserWarning, stacklevel=3)
        super().add_adapter(name, r, scaling, 0.0, init, autocast_adapter_dtype, device=device)
        try:
            self._out_layer().add_adapter(name, r, scaling, 0.0, init, autocast_adapter_dtype, device=device)
        except Exception:
            del self.adapters[name]
            raise

    def forward(self, *args, **kwargs):
        out_layer = self._out_layer()
        run, out_run = self._run, out_layer._run
        if not run and not out_run:
            return self.base_layer(*args, **kwargs)
        weights = {}
        if run:
            param = self._param()
            delta = sum(self._adapter_delta(ad) for ad in run)
            weights["in_proj_weight"] = param + delta.to(param.dtype)
        if out_run:
            weight = out_layer.base_layer.weight
            delta = sum((ad.lora_B @ ad.lora_A) * ad.scaling for ad in out_run)
            weights["out_proj.base_layer.weight"] = weight + delta.to(weight.dtype)
        return torch.func.functional_call(self.base_layer, weights, args, kwargs)

    def _adapter_delta(self, ad):
        return (ad.lora_B @ ad.lora_A) * ad.scaling
