"""Pure tensor math of LoHa (low-rank Hadamard product, FedPara; Hyeon-Woo et al., 2022).

The update is the element-wise (Hadamard) product of two rank-``r`` products, so its rank can reach
``r^2`` for the parameters of two rank-``r`` LoRA pairs::

    dW = s * (W1a @ W1b) ⊙ (W2a @ W2b)        W1a, W2a: (out, r)    W1b, W2b: (r, in_flat)

For a convolution ``in_flat = in_channels / groups * prod(kernel)``. With ``use_effective_conv2d`` each
product instead passes through a core tensor ``t: (r, r, kh, kw)`` (a Tucker/CP-style factorisation of
the kernel)::

    rebuild(t, wa, wb)[p, q, k, l] = sum_{i, j} t[i, j, k, l] * wa[i, p] * wb[j, q]
    dW = s * rebuild(t1, W1a, W1b) ⊙ rebuild(t2, W2a, W2b)     wa: (r, out)   wb: (r, in)

Both are differentiable by autograd (peft writes the backward by hand to save memory; the values are the
same).
"""

from __future__ import annotations

import torch
from torch import Tensor


def hadamard_delta(w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, scale: float = 1.0) -> Tensor:
    """``s * (w1a @ w1b) ⊙ (w2a @ w2b)``.

    Args:
        w1a, w2a: ``(out, r)``.
        w1b, w2b: ``(r, in_flat)``.
        scale: ``s = alpha / r``.

    Returns:
        ``(out, in_flat)``.
    """
    return (w1a @ w1b) * (w2a @ w2b) * scale


def rebuild_kernel(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """A kernel from its core and two mode factors: ``K[p, q, k, l] = sum_ij t[i, j, k, l] wa[i, p] wb[j, q]``.

    Args:
        t: ``(r, r, kh, kw)`` (``kw = 1`` for a Conv1d kernel).
        wa: ``(r, out)``, the output-channel mode.
        wb: ``(r, in)``, the input-channel mode.

    Returns:
        ``(out, in, kh, kw)``.
    """
    return torch.einsum("ijkl,ip,jq->pqkl", t, wa, wb)


def hadamard_delta_cp(t1: Tensor, w1a: Tensor, w1b: Tensor, t2: Tensor, w2a: Tensor, w2b: Tensor,
                      scale: float = 1.0) -> Tensor:
    """``s * rebuild(t1, w1a, w1b) ⊙ rebuild(t2, w2a, w2b)``, each as :func:`rebuild_kernel`.

    Returns:
        ``(out, in, kh, kw)``.
    """
    return rebuild_kernel(t1, w1a, w1b) * rebuild_kernel(t2, w2a, w2b) * scale
