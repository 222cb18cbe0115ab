"""Pure tensor math of LoRA, shared by the layers' forward/merge and by offline merging.

Shapes: ``A: (r, in)``, ``B: (out, r)`` for linear layers; ``A: (r, in, *k)``, ``B: (out, r, 1...)``
for convolutions; ``A: (r, num_embeddings)``, ``B: (dim, r)`` for embeddings. ``s`` is the scaling.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def linear_delta(x: Tensor, A: Tensor, B: Tensor, scaling: float, dropout: float = 0.0,
                 training: bool = False) -> Tensor:
    """``s * B A drop(x)`` for ``x: (..., in)`` -> ``(..., out)``.

    The ``(x A^T) B^T`` order keeps the intermediate at rank ``r``; the scaling is applied to that
    small intermediate rather than to the ``out``-sized result.
    """
    if dropout > 0.0 and training:
        x = F.dropout(x, p=dropout, training=True)
    return F.linear(F.linear(x, A) * scaling, B)


def linear_delta_weight(A: Tensor, B: Tensor, scaling: float, fan_in_fan_out: bool = False) -> Tensor:
    """``s * B @ A``: ``(out, in)``, or ``(in, out)`` for fan-in-fan-out (Conv1D) weights."""
    delta = (B @ A) * scaling
    return delta.T if fan_in_fan_out else delta


def embedding_delta(ids: Tensor, A: Tensor, B: Tensor, scaling: float, padding_idx=None,
                    max_norm=None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                    sparse: bool = False) -> Tensor:
    """``s * (A^T[ids]) B^T`` for integer ``ids: (...)`` -> ``(..., dim)``."""
    rows = F.embedding(ids, A.T, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    return F.linear(rows * scaling, B)


def embedding_delta_weight(A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """``s * (B @ A)^T``: ``(num_embeddings, dim)``, the layout of ``nn.Embedding.weight``."""
    return ((B @ A) * scaling).T


def conv_delta(x: Tensor, A: Tensor, B: Tensor, scaling: float, conv: Callable, stride, padding,
               dilation, dropout: float = 0.0, training: bool = False) -> Tensor:
    """``s * conv_B(conv_A(drop(x)))``: ``A`` carries the base kernel, ``B`` is a 1x1 conv."""
    if dropout > 0.0 and training:
        x = F.dropout(x, p=dropout, training=True)
    hidden = conv(x, A, None, stride, padding, dilation)
    return conv(hidden * scaling, B)


def conv_delta_weight(A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """The single kernel equal to ``conv_B . conv_A``: ``W[o, i, k] = s * sum_r B[o, r] A[r, i, k]``."""
    B2 = B.reshape(B.shape[0], B.shape[1])
    return torch.einsum("or,ri...->oi...", B2, A) * scaling


def add_delta(weight: Tensor, delta: Tensor, *, sign: float = 1.0, safe: bool = False,
              name: str = "layer") -> Tensor:
    """``weight + sign * delta``, computed in float32 (at least) and cast once to ``weight``'s dtype.

    With ``safe=True`` the result is checked for NaN/inf before it is returned, so a broken adapter
    never reaches the model's weights.
    """
    compute = torch.promote_types(weight.dtype, torch.float32)
    new = weight.to(compute) + sign * delta.to(device=weight.device, dtype=compute)
    if safe and not torch.isfinite(new).all():
        raise ValueError(f"merging the adapter into {name} produced NaN/inf values; the weights were left unchanged")
    return new.to(weight.dtype)
