"""LoRA variants as objects: each states its rules once, and every layer type and path asks it.

A variant answers, for one adapter ``ad`` of one layer:

- ``init(layer, ad)``: set up what it adds after ``A``/``B`` are initialised;
- ``params(ad)``: its tensors by role (checkpoint roles: ``lora_A``, ``lora_B``, ...);
- ``row_scale(layer, ad, dtype)``: the per-output-channel factor applied to ``W x + s B A x``, or None;
- ``apply(layer, ad, out, delta)``: ``out`` (the base output plus the adapters before this one) with this
  adapter's ``delta = s B A x`` applied;
- ``factors(layer, ad, weight, bias, dtype)``: the no-grad path's :class:`~.cache.Factors`, cached;
- ``merged_weight`` / ``unmerged_weight``: the base weight with the adapter merged in or taken out;
  ``merged_bias`` / ``unmerged_bias``: the base bias likewise (returned unchanged by variants that leave it);
- ``out_shift(layer, ad)``: a per-output-channel term the adapter adds, ``(out,)``, or None;
- ``fuses``: whether the training route may run the adapter inside the base layer's autograd node.

:data:`LORA` adds: ``y = out + s B A x``. :data:`DORA` (Liu et al., 2024) rescales each output channel to a
learned magnitude ``m``: ``y = b + (m / ||W + s B A||) * (out - b + s B A x)``, the norm detached (paper,
section 4.3), computed without the dense ``W + s B A`` and cached in the layer's
:class:`~.cache.LayerCache`. With several active adapters each DoRA adapter rescales what the ones before
it produced, in the active order, which is how peft combines them.

Layers supply ``delta_weight(name)``, ``_dora_views(ad) -> (W rows (out, k), A (r, k), B (out, r))``, the
output's channel dimension ``_channel_dim``, the weight's output dimension ``_weight_out_dim``,
``_magnitude_shape()``, ``_read_weight()`` and ``cache``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import functional as LF
from .cache import Factors


class LoraVariant:
    """Plain LoRA (and rsLoRA, which differs only in the scaling): ``y = out + s B A x``."""

    name = "lora"
    fuses = True

    def init(self, layer, ad) -> None:
        """Nothing beyond ``A`` and ``B``."""

    def empty(self, layer, ad) -> None:
        """Create the variant's own tensors empty (on ``meta``), to be loaded."""

    def params(self, ad) -> dict[str, nn.Parameter]:
        return {"lora_A": ad.lora_A, "lora_B": ad.lora_B}

    def row_scale(self, layer, ad, dtype: torch.dtype) -> Optional[Tensor]:
        return None

    def apply(self, layer, ad, out: Tensor, delta: Tensor) -> Tensor:
        return out + delta.to(out.dtype)

    def factors(self, layer, ad, weight: Tensor, bias: Optional[Tensor], dtype: torch.dtype) -> Factors:
        """The no-grad factors for inputs of ``dtype`` (cast once: half-precision bases with float32
        adapters run the rank-r products in the base's dtype), from the layer's cache; built for this call
        alone where nothing may be cached (see :class:`~.cache.LayerCache`), so that the route's arithmetic,
        and so its rounding, never depends on whether a cache was at hand."""
        entry = _entry(layer, ad, weight, bias)
        if entry is None:
            with torch.no_grad():
                return self._build_factors(layer, ad, weight, bias, dtype)
        if entry.factors is None or entry.factors_dtype is not dtype:
            with torch.no_grad():
                entry.factors = self._build_factors(layer, ad, weight, bias, dtype)
            entry.factors_dtype = dtype
        return entry.factors

    def _build_factors(self, layer, ad, weight, bias, dtype) -> Factors:
        A, B = ad.lora_A, ad.lora_B
        return Factors(A.t().to(dtype).contiguous(), (B * ad.scaling).t().to(dtype).contiguous(), None, None,
                       weight.t())

    def merged_weight(self, layer, name: str, weight: Tensor) -> Tensor:
        return LF.add_delta(weight, layer.delta_weight(name))

    def unmerged_weight(self, layer, name: str, weight: Tensor) -> Tensor:
        return LF.add_delta(weight, layer.delta_weight(name), sign=-1.0)

    def out_shift(self, layer, ad) -> Optional[Tensor]:
        return None

    def merged_bias(self, layer, name: str, bias: Tensor) -> Tensor:
        return bias

    def unmerged_bias(self, layer, name: str, bias: Tensor) -> Tensor:
        return bias


class BiasedLoraVariant(LoraVariant):
    """LoRA with a trainable bias on ``B`` (peft's ``lora_bias=True``): ``y = out + s (B A x + b_B)``.

    Merging adds ``s b_B`` to the base bias, so the base layer must have one.
    """

    name = "lora_bias"
    fuses = False  # (the fused training node has no place for the extra bias; the general route runs it)

    def init(self, layer, ad) -> None:
        """``b_B`` starts at zero, so the layer starts as the base computes it."""
        ad.lora_B_bias = nn.Parameter(ad.lora_B.new_zeros(ad.lora_B.shape[0]))

    def empty(self, layer, ad) -> None:
        ad.lora_B_bias = nn.Parameter(ad.lora_B.new_empty(ad.lora_B.shape[0]))

    def params(self, ad) -> dict[str, nn.Parameter]:
        return {**super().params(ad), "lora_B_bias": ad.lora_B_bias}

    def out_shift(self, layer, ad) -> Tensor:
        return ad.lora_B_bias * ad.scaling

    def apply(self, layer, ad, out: Tensor, delta: Tensor) -> Tensor:
        shift = self.out_shift(layer, ad).to(out.dtype)
        return out + delta.to(out.dtype) + LF.along(shift, out, layer._channel_dim)

    def factors(self, layer, ad, weight, bias, dtype):
        return None  # the no-grad route's factors have no bias: this adapter takes the general route

    def merged_weight(self, layer, name: str, weight: Tensor) -> Tensor:
        if getattr(layer.base_layer, "bias", None) is None:
            raise ValueError(f"adapter {name!r} has lora_bias=True but the base layer "
                             f"{type(layer.base_layer).__name__} has no bias to merge it into")
        return super().merged_weight(layer, name, weight)

    def merged_bias(self, layer, name: str, bias: Tensor) -> Tensor:
        ad = layer.adapters[name]
        return (bias.float() + ad.lora_B_bias.detach().float() * ad.scaling).to(bias.dtype)

    def unmerged_bias(self, layer, name: str, bias: Tensor) -> Tensor:
        ad = layer.adapters[name]
        return (bias.float() - ad.lora_B_bias.detach().float() * ad.scaling).to(bias.dtype)


class DoraVariant(LoraVariant):
    """DoRA: ``y = b + (m / ||W + s B A||) * (out - b + s B A x)`` per output channel."""

    name = "dora"

    def init(self, layer, ad) -> None:
        """``m`` starts at ``||W + s B A||`` per output channel, so the layer starts as plain LoRA would."""
        with torch.no_grad():
            norm = self.norm(layer, ad, cached=False)
        # A copy: a cached norm must not share storage with m, which training changes in place.
        m = norm.to(ad.lora_A.dtype).reshape(layer._magnitude_shape()).clone()
        ad.lora_magnitude_vector = nn.Parameter(m)

    def empty(self, layer, ad) -> None:
        m = ad.lora_B.new_empty(ad.lora_B.shape[0])  # one per output channel
        ad.lora_magnitude_vector = nn.Parameter(m.reshape(layer._magnitude_shape()))

    def params(self, ad) -> dict[str, nn.Parameter]:
        return {**super().params(ad), "lora_magnitude_vector": ad.lora_magnitude_vector}

    def norm(self, layer, ad, cached: bool = True) -> Tensor:
        """Detached ``||W + s B A||`` per output channel, ``(out,)``: ``||w_i||^2 + 2 s b_i . (A w_i) +
        s^2 b_i^T (A A^T) b_i`` (:func:`~.functional.dora_row_norm`), cached while its tensors are unchanged."""
        weight = layer.base_layer.weight
        entry = _entry(layer, ad, weight, getattr(layer.base_layer, "bias", None)) if cached else None
        if entry is not None and entry.norm is not None:
            return entry.norm
        # Built outside inference mode even when called inside it: the same cached norm serves training later
        # (autograd cannot keep a tensor made in inference mode for backward).
        # Float32 under autocast too: a half-precision norm would round the magnitudes' divisor.
        with torch.inference_mode(False), torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            rows, A, B = layer._dora_views(ad)  # (inference_mode first: it turns grad mode back on)
            norm = LF.dora_row_norm(rows, A, B, ad.scaling, w_sqnorm=self._base_sqnorm(layer, weight, rows, A.dtype))
        if entry is not None:
            entry.norm = norm
        return norm

    @staticmethod
    def _base_sqnorm(layer, weight: Tensor, rows: Tensor, dtype: torch.dtype) -> Tensor:
        """``||w_i||^2`` per base row, cached in the layer while the base weight is unchanged."""
        entry = layer.cache.lookup(None, (weight,))
        if entry is not None and entry.sqnorm is not None and entry.sqnorm.dtype is dtype:
            return entry.sqnorm
        sqnorm = rows.to(dtype).pow(2).sum(1)
        if entry is not None:
            entry.sqnorm = sqnorm
        return sqnorm

    def row_scale(self, layer, ad, dtype: torch.dtype) -> Tensor:
        """``m / ||W + s B A||``, ``(C,)``: differentiable in ``m``, the norm detached."""
        return (ad.lora_magnitude_vector.reshape(-1) / self.norm(layer, ad)).to(dtype)

    def apply(self, layer, ad, out: Tensor, delta: Tensor) -> Tensor:
        # Only y is kept for backward (see LF.dora_combine), not W x and the delta.
        return LF.dora_combine(out, delta.to(out.dtype), self.row_scale(layer, ad, out.dtype),
                               getattr(layer.base_layer, "bias", None), layer._channel_dim)

    def _build_factors(self, layer, ad, weight, bias, dtype) -> Factors:
        # y = scale * out + shift + (x A^T) (s * scale * B)^T, shift = b (1 - scale): the DoRA formula applied
        # to out = W x + b (the adapters before this one included).
        # scale and shift stay in the adapter's dtype: applied to a half-precision output they are rounded
        # once, with it, rather than twice.
        scale = ad.lora_magnitude_vector.reshape(-1) / self.norm(layer, ad)
        shift = None if bias is None else bias * (1 - scale)
        B_t = (ad.lora_B * (scale * ad.scaling)[:, None]).t().to(dtype).contiguous()
        return Factors(ad.lora_A.t().to(dtype).contiguous(), B_t, scale, shift, weight.t())

    def merged_weight(self, layer, name: str, weight: Tensor) -> Tensor:
        ad = layer.adapters[name]
        norm = self.norm(layer, ad, cached=False)
        ad.merge_norm = norm  # needed to undo the channel scaling exactly
        merged = LF.dora_merged_weight(weight, layer.delta_weight(name), ad.lora_magnitude_vector.detach().reshape(-1),
                                       norm, layer._weight_out_dim)
        return merged.to(weight.dtype)

    def unmerged_weight(self, layer, name: str, weight: Tensor) -> Tensor:
        ad = layer.adapters[name]
        norm, ad.merge_norm = ad.merge_norm, None
        restored = LF.dora_unmerged_weight(weight, layer.delta_weight(name), ad.lora_magnitude_vector.detach().reshape(-1),
                                           norm, layer._weight_out_dim)
        return restored.to(weight.dtype)


def _entry(layer, ad, weight: Tensor, bias: Optional[Tensor]):
    """Adapter ``ad``'s cache entry: one per adapter for all it derives (norm, factors), built from the same
    tensors; None where nothing may be cached."""
    params = ad._parameters  # (dict lookups: this runs per layer per decoded token)
    return layer.cache.lookup(ad, (params["lora_A"], params["lora_B"], params["lora_magnitude_vector"], weight, bias),
                              ad.scaling)


LORA = LoraVariant()
LORA_BIAS = BiasedLoraVariant()
DORA = DoraVariant()


def variant_for(use_dora: bool, lora_bias: bool = False) -> LoraVariant:
    if use_dora and lora_bias:
        raise ValueError("lora_bias=True cannot be combined with DoRA (use_dora=True), as in peft")
    return DORA if use_dora else LORA_BIAS if lora_bias else LORA
