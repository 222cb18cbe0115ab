"""Pure tensor math of LoKr (low-rank Kronecker product; Yeh et al., 2023, as in LyCORIS and peft).

The update is a Kronecker product of a small matrix and a larger one, each of which may itself be a
low-rank product::

    dW = s * W1 ⊗ W2        W1: (a, c)   W2: (b, d[, *kernel])     out = a * b,  in = c * d
    (W1 ⊗ W2)[i * b + p, j * d + q] = W1[i, j] * W2[p, q]

``W1 = W1a @ W1b`` with ``decompose_both`` and a small enough rank, ``W2 = W2a @ W2b`` when the rank is
small against ``W2``'s size (or, with ``use_effective_conv2d``, a kernel rebuilt from a core tensor, see
:func:`deltatune.methods.loha.functional.rebuild_kernel`). ``(a, b)`` and ``(c, d)`` come from
:func:`factorization` of the output and input sizes.
"""

from __future__ import annotations

from torch import Tensor

from ..loha.functional import rebuild_kernel

__all__ = ["factorization", "kron", "kron_delta", "rebuild_kernel", "use_full_factors"]


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)`` with ``m * n = dimension``, as LyCORIS and peft do.

    With ``factor > 0`` dividing ``dimension``: ``(factor, dimension // factor)``, as given (not sorted).
    Otherwise ``m`` walks up through the divisors of ``dimension`` that are at most ``factor`` (any, for
    ``-1``), stopping at the first one that reaches ``dimension // m``: the pair nearest the square root
    that respects the limit, returned smaller first.

    Examples: ``128 -> (8, 16)``, ``127 -> (1, 127)``, ``(128, factor=4) -> (4, 32)``.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m = 1
    for d in range(2, dimension + 1):
        if dimension % d:
            continue
        if d > limit:
            break
        m = d
        if m >= dimension // m:  # passed the square root: the pair is as balanced as it gets
            break
    n = dimension // m
    return min(m, n), max(m, n)


def use_full_factors(r: int, shape: tuple, decompose_both: bool) -> tuple[bool, bool]:
    """Whether ``W1`` and ``W2`` are stored whole (rather than as rank-``r`` products), peft's rule.

    Args:
        r: The rank.
        shape: ``((a, b), (c, d))``: the output and input factorizations.
        decompose_both: Also factor ``W1`` when ``r < max(a, c) / 2``.

    Returns:
        ``(full W1, full W2)``: ``W2`` is whole unless ``r < max(b, d) / 2``.
    """
    (a, b), (c, d) = shape
    return not (decompose_both and r < max(a, c) / 2), not (r < max(b, d) / 2)


def kron_delta(w1: Tensor, w2: Tensor, scale: float = 1.0) -> Tensor:
    """``s * W1 ⊗ W2``, with the dimension handling of peft 0.21.

    Args:
        w1: ``(a, c)``.
        w2: ``(b, d)`` (linear), ``(b, d * prod(kernel))`` (flattened kernel), ``(b, d, kh, kw)`` (Conv2d
            kernel, or a rebuilt Conv1d kernel ``(b, d, k, 1)``; ``w1`` then acts as ``(a, c, 1, 1)``) or
            ``(b, d, k)`` (a whole Conv1d kernel).
        scale: ``s = alpha / r``.

    Returns:
        :func:`kron` of the two: ``(a * b, c * d[, *kernel])``. For a whole 3-D Conv1d kernel ``w1``
        is taken as ``(1, a, c)`` (``torch.kron``'s rule for fewer dimensions), giving
        ``(b, a * d, c * k)``: an odd layout, but the one peft's checkpoints were trained with, so it is
        kept (the caller reshapes to the weight's shape).
    """
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]  # the kernel dimensions belong to W2 alone
    return kron(w1, w2) * scale


def kron(x: Tensor, y: Tensor) -> Tensor:
    """The Kronecker product with ``torch.kron``'s rules: the tensor with fewer dimensions gets leading
    dimensions of size 1, then ``out[i_0 * m_0 + j_0, i_1 * m_1 + j_1, ...] = x[i_0, i_1, ...] * y[j_0, j_1, ...]``
    (``m_k = y.shape[k]``).

    Written as one broadcast product (``x`` on the even axes, ``y`` on the odd ones) and a reshape, rather
    than with ``torch.kron``, which fails in torch 2.13 on some inputs with size-1 dimensions (peft's
    LoKr on a Conv1d with ``use_effective_conv2d``: "view size is not compatible").
    """
    n = max(x.dim(), y.dim())
    x = x.reshape((1,) * (n - x.dim()) + tuple(x.shape))
    y = y.reshape((1,) * (n - y.dim()) + tuple(y.shape))
    xs = [s for size in x.shape for s in (size, 1)]
    ys = [s for size in y.shape for s in (1, size)]
    return (x.reshape(xs) * y.reshape(ys)).reshape([a * b for a, b in zip(x.shape, y.shape)])
