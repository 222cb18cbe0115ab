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
            rows, A2, B2 = layer._dora_views(ad)  # rows: dequantized for 4/8-bit bases
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


def add_dora(layer, out: Tensor, delta: Tensor, ad) -> Tensor:
    """Apply one DoRA adapter to ``out`` (the base output, plus adapters applied before this one):
    ``y = b + scale * (out - b + delta)``.

    With several active adapters each one rescales what the ones before it produced, in the active
    order, which is how peft combines them. Only ``y`` is kept for backward (see ``dora_combine``).
    """
    scale = (ad.lora_magnitude_vector.reshape(-1) / layer._dora.norm(layer, ad)).to(out.dtype)
    return LF.dora_combine(out, delta, scale, getattr(layer.base_layer, "bias", None), layer._channel_dim)


def dora_inference_(layer, out: Tensor, hidden: Tensor, ad) -> Tensor:
    """No-grad fast path of :func:`add_dora` for linear layers, in place on ``out``.

    ``out += s * hidden @ B^T`` (one addmm), then ``out = out * scale + b (1 - scale)`` with ``scale`` and
    the bias term cached until A, B, m or W change: four kernels per call, as cheap as decoding allows.
    """
    m = ad.lora_magnitude_vector
    norm = layer._dora.norm(layer, ad)
    key = (ad._norm_cache[0], m._version, m.data_ptr(), out.dtype)  # the norm's own key: versions of A, B, W
    cached = getattr(ad, "_scale_cache", None)
    if cached is None or cached[0] != key:
        scale = (m.reshape(-1) / norm).to(out.dtype)
        bias = getattr(layer.base_layer, "bias", None)
        shift = None if bias is None else (bias * (1 - scale)).to(out.dtype)
        cached = ad._scale_cache = (key, scale, shift)
    _, scale, shift = cached
    flat = out.view(-1, out.shape[-1])
    flat.addmm_(hidden.reshape(-1, hidden.shape[-1]).to(out.dtype), ad.lora_B.t().to(out.dtype), alpha=ad.scaling)
    flat.mul_(scale)
    if shift is not None:
        flat.add_(shift)
    return out
