"""The no-grad route of LoRA and DoRA on ``nn.Linear`` (evaluation, decoding, serving).

Without gradients the factors can be kept in the layout the small matmuls run fastest in: ``A^T (in, r)``
and ``(s B)^T (r, out)``, contiguous, cast to the input's dtype (so a half-precision base with float32
adapters runs its rank-r products in half precision too, from factors cast once). With a transposed
operand, the rank-r matmuls of one decoded token took 2-3x longer on the CPU. Each variant builds its
:class:`~.cache.Factors` (DoRA folds its per-row scale into ``B``: ``y = scale * out + shift + (x A^T)
(s * scale * B)^T``) and the layer's :class:`~.cache.LayerCache` keeps them while they are valid.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .functional import FOLDABLE, plus_low_rank, scaled_rows


def _fold_pays(tokens: int, weight: Tensor) -> bool:
    """Whether folding the adapters into a temporary weight is cheaper than applying them to ``tokens``
    rows: the rank-r path costs ``tokens * r * (in + out)`` multiply-adds (its ``r``-deep product writing
    a ``(tokens, out)`` output runs at half a big GEMM's rate), the fold ``r * in * out`` and one
    weight-sized write. Float32/64 only: a half-precision sum ``W + s B A`` would round the small delta
    at the weight's magnitude."""
    out_f, in_f = weight.shape
    return tokens * (in_f + out_f) >= 2 * in_f * out_f and weight.dtype in FOLDABLE


def _factors(layer, ad, x: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """The adapter's factors for ``x``, or None where this route does not apply (dropout due in training
    mode, ``x`` in another dtype than the base weight)."""
    if (layer.training and ad.dropout > 0.0) or x.dtype is not weight.dtype:
        return None
    return ad.variant.factors(layer, ad, weight, bias, x.dtype)


def _folded_weight(layer, x: Tensor, weight: Tensor, bias: Optional[Tensor], run) -> Optional[Tensor]:
    """A temporary ``W'`` with ``x W'^T + b`` equal to the base with every adapter of ``run`` applied in
    order: ``W' = scale * W' + (s scale B) A`` per adapter (``scale`` = 1 for LoRA; DoRA rescales everything
    before it, as in :func:`forward`); None if one of them has no factors here (dropout due)."""
    folded = weight
    for ad in run:
        f = _factors(layer, ad, x, weight, bias)
        if f is None:
            return None
        folded = plus_low_rank(scaled_rows(folded, f.scale), weight, f.B_t.t(), f.A_t.t(), 1.0)
    return folded


def forward(layer, x: Tensor, weight: Tensor, bias: Optional[Tensor], run) -> Tensor:
    """``x W^T + b`` with the adapters of ``run`` applied in order, without gradients; ``x: (..., in)``.

    Many tokens (prefill, batched evaluation; see :func:`_fold_pays`): the adapters are folded into a
    temporary weight used for one GEMM and dropped, a merge that lasts one call. Otherwise a plain LoRA
    adapter first in ``run`` goes before the base: its ``(x A^T) (s B)^T`` is written first and the base
    GEMM accumulates into it, one read-write pass over the output fewer than adding it afterwards.
    Adapters this route does not apply to (dropout due in training mode) go through the general route.

    A decoded token spends as much time here on per-op overhead as on arithmetic (a few microseconds per
    op against a small matrix-vector product), so the common cases take as few ops as they can: LoRA three
    (two rank-r products and the base GEMM into their result), DoRA four.
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
        f = _factors(layer, ad, x, weight, bias)
        if f is None:
            if out is None:
                out = F.linear(x, weight, bias)
            out = layer._apply_run(x, out, [ad])
            continue
        if out is None:
            # LoRA first: the delta, then the base GEMM adds into it (float32/64; in half precision a
            # GEMM accumulating into an existing output measured slower than the base's own, on the CPU)
            if f.scale is None and weight.dtype in FOLDABLE:
                xa = torch.mm(x, f.A_t)
                out = torch.mm(xa, f.B_t) if bias is None else torch.addmm(bias, xa, f.B_t)
                out.addmm_(x, f.W_t)
                continue
            out = torch.mm(x, f.W_t) if bias is None else torch.addmm(bias, x, f.W_t)
        if f.scale is not None:
            out.mul_(f.scale)
            if f.shift is not None:
                out.add_(f.shift)
        out.addmm_(torch.mm(x, f.A_t), f.B_t)
    return out.view(*shape[:-1], out.shape[-1])
