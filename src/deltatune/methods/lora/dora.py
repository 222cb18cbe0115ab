"""DoRA (Liu et al., 2024) on top of any LoRA layer: ``y = b + m / ||W + s B A|| * (W x + s B A x)``.

The norm is taken per output channel (rows of ``W`` for Linear/Conv1D and convolutions, embedding
dimensions for Embedding), detached as in the paper (section 4.3), computed without the dense
``W + s B A`` and cached until ``A``, ``B`` or ``W`` change (the tensors' version counters tell, and
:mod:`deltatune.cache_epoch` for optimizer steps that leave them alone).
Layers supply ``_dora_views(adapter) -> (W rows (out, k), A (r, k), B (out, r))``, the output's channel
dimension ``_channel_dim`` and the weight's output dimension ``_weight_out_dim``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import cache_epoch
from . import functional as LF


class DoraState:
    """Per-layer DoRA caches: ``||w_i||^2`` of the base (with the weight it came from) and the norms used
    by merged adapters."""

    def __init__(self):
        self.w_sqnorm: Optional[tuple] = None
        self.merge_norms: dict[str, Tensor] = {}

    def norm(self, layer, ad, use_cache: bool = True) -> Tensor:
        """Detached ``||W + s B A||`` per output channel, ``(out,)``, cached while A, B and W are unchanged."""
        weight, A, B = layer.base_layer.weight, ad.lora_A, ad.lora_B
        # A traced graph cannot check tensor versions, and inference tensors have none: recompute every call.
        key = None if torch.compiler.is_compiling() else _cache_key(weight, A, B, ad.scaling)
        if key is None:
            with torch.no_grad():
                return LF.dora_row_norm(*layer._dora_views(ad), ad.scaling)
        # The cache holds the tensors it was built from and compares identities (a replacement allocated at
        # a freed tensor's address, with the same version count, cannot pass for it), versions and data
        # addresses (new data given through ``.data``; A's and B's old data are kept alive with the cache, so
        # their addresses cannot be taken by other data). Module conversions (``.to``, ``.half``) drop it.
        cached = ad._norm_cache
        if (use_cache and cached is not None and cached[0] is weight and cached[1] is A and cached[2] is B
                and cached[3] == key):
            return cached[4]
        # Built outside inference mode even when called inside it: the same cached norm serves training later
        # (autograd cannot keep a tensor made in inference mode for backward).
        with torch.inference_mode(False), torch.no_grad():  # (in this order: the first turns grad mode on)
            rows, A2, B2 = layer._dora_views(ad)  # rows: dequantized for 4/8-bit bases
            # (a trainable base may be changed by fused optimizer steps, which leave versions alone)
            sq_key = key[:2] + (A2.dtype, weight.requires_grad and key[-1])  # W's version and address, epoch
            if self.w_sqnorm is None or self.w_sqnorm[0] is not weight or self.w_sqnorm[1] != sq_key:
                self.w_sqnorm = (weight, sq_key, rows.to(A2.dtype).pow(2).sum(1))
            norm = LF.dora_row_norm(rows, A2, B2, ad.scaling, w_sqnorm=self.w_sqnorm[2])
        ad._norm_cache = (weight, A, B, key, norm, (A.detach(), B.detach()))
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


def _cache_key(weight: Tensor, A: Tensor, B: Tensor, scaling: float) -> Optional[tuple]:
    """``(W version, W address, A and B versions and addresses, scaling, optimizer-step epoch)``, or None
    for tensors made under ``torch.inference_mode`` (they have no version counter)."""
    try:
        return (weight._version, weight.data_ptr(), A._version, B._version, A.data_ptr(), B.data_ptr(), scaling,
                cache_epoch.current())
    except RuntimeError:
        return None


def add_dora(layer, out: Tensor, delta: Optional[Tensor], ad) -> Tensor:
    """Apply one DoRA adapter to ``out`` (the base output, plus adapters applied before this one):
    ``y = b + scale * (out - b + delta)`` (``delta=None``: ``out`` already includes it; rescaled in place).

    With several active adapters each one rescales what the ones before it produced, in the active
    order, which is how peft combines them. Only ``y`` is kept for backward (see ``dora_combine``).
    """
    return LF.dora_combine(out, delta, row_scale(layer, ad, out.dtype), getattr(layer.base_layer, "bias", None),
                           layer._channel_dim)


def row_scale(layer, ad, dtype: torch.dtype) -> Tensor:
    """``m / ||W + s B A||`` per output channel, ``(C,)``: differentiable in ``m``, the norm detached."""
    return (ad.lora_magnitude_vector.reshape(-1) / layer._dora.norm(layer, ad)).to(dtype)
