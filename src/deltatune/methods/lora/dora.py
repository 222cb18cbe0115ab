"""DoRA (Liu et al., 2024) on top of any LoRA layer: ``y = b + m / ||W + s B A|| * (W x + s B A x)``.

The norm is taken per output channel (rows of ``W`` for Linear/Conv1D and convolutions, embedding
dimensions for Embedding), detached as in the paper (section 4.3), computed without the dense
``W + s B A`` and cached until ``A``, ``B`` or ``W`` change (the tensors' version counters tell).
Layers supply ``_dora_views(adapter) -> (W rows (out, k), A (r, k), B (out, r))``, the output's channel
dimension ``_channel_dim`` and the weight's output dimension ``_weight_out_dim``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import functional as LF


class DoraState:
    """Per-layer DoRA caches: ``||w_i||^2`` of the base and the norms used by merged adapters."""

    def __init__(self):
        self.w_sqnorm: Optional[tuple] = None
        self.merge_norms: dict[str, Tensor] = {}

    def norm(self, layer, ad, use_cache: bool = True) -> Tensor:
        """Detached ``||W + s B A||`` per output channel, ``(out,)``, cached while A, B and W are unchanged."""
        weight, A, B = layer.base_layer.weight, ad.lora_A, ad.lora_B
        key = (weight.data_ptr(), weight._version, A._version, B._version, A.data_ptr(), B.data_ptr(), ad.scaling)
        if use_cache and ad._norm_cache is not None and ad._norm_cache[0] == key:
            return ad._norm_cache[1]
        with torch.no_grad():
            rows, A2, B2 = layer._dora_views(ad)
            sq_key = (weight.data_ptr(), weight._version, A2.dtype)
            if self.w_sqnorm is None or self.w_sqnorm[0] != sq_key:
                self.w_sqnorm = (sq_key, rows.to(A2.dtype).pow(2).sum(1))
            norm = LF.dora_row_norm(rows, A2, B2, ad.scaling, w_sqnorm=self.w_sqnorm[1])
        ad._norm_cache = (key, norm)
        return norm

    def merged_weight(self, layer, name: str, weight: Tensor) -> Tensor:
        ad = layer.adapters[name]
        norm = self.norm(layer, ad, use_cache=False)
        self.merge_norms[name] = norm  # needed to undo the channel scaling exactly
        merged = LF.dora_merged_weight(weight, layer.delta_weight(name), ad.lora_magnitude_vector.detach().reshape(-1),
                                       norm, layer._weight_out_dim)
        return merged.to(weight.dtype)

    def unmerged_weight(self, layer, name: str, weight: Tensor) -> Tensor:
        ad = layer.adapters[name]
        restored = LF.dora_unmerged_weight(weight, layer.delta_weight(name), ad.lora_magnitude_vector.detach().reshape(-1),
                                           self.merge_norms.pop(name), layer._weight_out_dim)
        return restored.to(weight.dtype)


def add_dora(layer, out: Tensor, delta: Tensor, ad, state: dict) -> Tensor:
    """Add one DoRA adapter's contribution to ``out`` (the base output, plus earlier adapters).

    A lone adapter uses the fused combine (only the output kept for backward); several active adapters
    use peft's additive form ``y += (m/n - 1) * W x + (m/n) * delta`` so they combine as they do there.
    ``state`` carries ``W x`` (without bias) between adapters of one forward call.
    """
    ch = layer._channel_dim % out.dim()
    view = [1] * out.dim()
    view[ch] = -1
    scale = (ad.lora_magnitude_vector.reshape(-1) / layer._dora.norm(layer, ad)).to(out.dtype)
    bias = getattr(layer.base_layer, "bias", None)
    if len(layer._run) == 1 and delta.dtype == out.dtype:
        return LF.dora_combine(out, delta, scale, bias, ch)
    if "base_out" not in state:
        state["base_out"] = out if bias is None else out - bias.view(view)
    scale = scale.view(view)
    return out + state["base_out"] * (scale - 1) + delta * scale
