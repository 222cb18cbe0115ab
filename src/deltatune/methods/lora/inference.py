"""The no-grad path of LoRA and DoRA on ``nn.Linear`` (evaluation, decoding, serving).

Without gradients the factors can be kept in the layout the small matmuls run fastest in: ``A^T (in, r)``
and ``(s B)^T (r, out)``, contiguous. With a transposed operand, the rank-r matmuls of one decoded token
took 2-3x longer on the CPU (``addmm_`` 10 us vs 3.6 us, ``x A^T`` 9 us vs 4.3 us, 2 threads). DoRA folds
its per-row scale ``m / ||W + s B A||`` into that factor:

    y = scale * out + shift + (x A^T) (s * scale * B)^T,    shift = b * (1 - scale)

which is ``b + scale * (W x + s B A x)`` applied to ``out = W x + b`` (the adapters before it included).

The factors are cached on the adapter (``r * (in + out)`` numbers, like the adapter itself) and rebuilt
when ``A`` or ``B`` change (identity, version counter, data address), for DoRA also ``m`` and the base
weight and bias, after any optimizer step (:mod:`deltatune.cache_epoch`: fused kernels leave versions
alone) and after a dtype or device conversion of the layer; so a cached factor is never stale after an
optimizer step, a load, a merge, a conversion or a replaced tensor.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import cache_epoch
from .functional import FOLDABLE, plus_low_rank, scaled_rows


def _factors(layer, ad, x: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """``(A^T, (s [scale] B)^T, scale, shift, W^T)`` of one adapter, from the cache when still valid; None
    where the fast path does not apply (dtypes differ, or dropout is due in training mode). ``W^T`` is a
    view of the base weight, kept so a decoded token does not pay for one more op per layer."""
    # Dict lookups instead of nn.Module attribute access: this runs per layer per decoded token.
    params = ad._parameters
    A, B, m = params["lora_A"], params["lora_B"], params["lora_magnitude_vector"]
    if layer.training and ad.dropout > 0.0:
        return None
    # Valid while the same tensors hold the same data: identities (a replacement allocated at a freed
    # tensor's address cannot pass for it), version counters (in-place changes), data addresses (new data
    # given through ``.data``; the cache keeps the old data alive, so no other tensor can take its address)
    # and the optimizer-step counter. Module conversions (``.to``, ``.half``) also drop the cache.
    try:
        key = (A._version, B._version, A.data_ptr(), B.data_ptr(), weight.data_ptr(), ad.scaling, cache_epoch.current())
        if m is not None:  # DoRA's factors also depend on the base weight's values and the bias
            key += (m._version, m.data_ptr(), weight._version, bias is not None and (bias._version, bias.data_ptr()))
    except RuntimeError:  # tensors made under torch.inference_mode have no version counter: no cache
        return None
    cached = ad._inference
    if (cached is not None and cached[0] is A and cached[1] is B and cached[2] is m and cached[3] is weight
            and cached[4] is bias and cached[5] == key):
        return cached[7] if x.dtype is cached[6] else None
    if not x.dtype == A.dtype == weight.dtype:
        return None
    with torch.no_grad():
        scale = shift = None
        row_scale = torch.tensor(ad.scaling, dtype=B.dtype, device=B.device)
        if m is not None:
            scale = m.reshape(-1) / layer._dora.norm(layer, ad)
            shift = None if bias is None else bias * (1 - scale)
            row_scale = scale * ad.scaling
        B_t = (B * row_scale.reshape(-1, 1)).t().contiguous()
        factors = (A.t().contiguous(), B_t, scale, shift, weight.t())  # W^T: keeps W's data alive
    keep = [t.detach() for t in (A, B, m, bias) if t is not None]  # (the data the addresses belong to)
    ad._inference = (A, B, m, weight, bias, key, x.dtype, factors, keep)
    return factors


def _fold_pays(tokens: int, weight: Tensor) -> bool:
    """Whether folding the adapters into a temporary weight is cheaper than applying them to ``tokens``
    rows: the rank-r path costs ``tokens * r * (in + out)`` multiply-adds (its ``r``-deep product writing
    a ``(tokens, out)`` output runs at half a big GEMM's rate), the fold ``r * in * out`` and one
    weight-sized write. Float32/64 only: a half-precision sum ``W + s B A`` would round the small delta
    at the weight's magnitude."""
    out_f, in_f = weight.shape
    return tokens * (in_f + out_f) >= 2 * in_f * out_f and weight.dtype in FOLDABLE


def _folded_weight(layer, x: Tensor, weight: Tensor, bias: Optional[Tensor], run) -> Optional[Tensor]:
    """A temporary ``W'`` with ``x W'^T + b`` equal to the base with every adapter of ``run`` applied in
    order: ``W' = W + s B A`` per LoRA adapter, ``W' = scale * (W' + s B A)`` per DoRA adapter (which
    rescales everything before it, as in :func:`forward`); None if one of them has no fast path."""
    folded = weight
    for ad in run:
        factors = _factors(layer, ad, x, weight, bias)
        if factors is None:
            return None
        A_t, B_t, scale = factors[0], factors[1], factors[2]  # B_t: (s [scale] B)^T
        folded = plus_low_rank(scaled_rows(folded, scale), weight, B_t.t(), A_t.t(), 1.0)
    return folded


def forward(layer, x: Tensor, weight: Tensor, bias: Optional[Tensor], run) -> Tensor:
    """``x W^T + b`` with the adapters of ``run`` applied in order, without gradients; ``x: (..., in)``.

    Many tokens (prefill, batched evaluation; see :func:`_fold_pays`): the adapters are folded into a
    temporary weight used for one GEMM and dropped, a merge that lasts one call. Otherwise a plain LoRA
    adapter first in ``run`` goes before the base: its ``(x A^T) (s B)^T`` is written first and the base
    GEMM accumulates into it, one read-write pass over the output fewer than adding it afterwards.
    Adapters the fast path does not apply to go through ``layer._add_deltas``.

    A decoded token spends as much time here on per-op overhead as on arithmetic (a few microseconds per
    op and per Python-level view against a ~40 us matrix-vector product), so the common cases take as few
    ops as they can: LoRA three (two rank-r products and the base GEMM into their result), DoRA four.
    """
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    if _fold_pays(x.shape[0], weight):
        folded = _folded_weight(layer, x, weight, bias, run)
        if folded is not None:
            out = F.linear(x, folded, bias)
            return out.view(*shape[:-1], out.shape[-1])
    out = None
    for ad in run:
        factors = _factors(layer, ad, x, weight, bias)
        if factors is None:
            if out is None:
                out = F.linear(x, weight, bias)
            out = layer._add_deltas(x, out, [ad], False, inplace=True)
            continue
        A_t, B_t, scale, shift, W_t = factors
        if out is None:
            if scale is None:  # LoRA first: the delta, then the base GEMM adds into it
                xa = torch.mm(x, A_t)
                out = torch.mm(xa, B_t) if bias is None else torch.addmm(bias, xa, B_t)
                out.addmm_(x, W_t)
                continue
            out = torch.mm(x, W_t) if bias is None else torch.addmm(bias, x, W_t)
        if scale is not None:
            out.mul_(scale)
            if shift is not None:
                out.add_(shift)
        out.addmm_(torch.mm(x, A_t), B_t)
    return out.view(*shape[:-1], out.shape[-1])
