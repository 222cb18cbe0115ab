"""Pure tensor math of (IA)^3 rescaling.

``l_out: (out,)`` scales outputs, ``l_in: (in,)`` scales inputs. For a weight ``W (out, in)``,
``(W x) * l_out = (diag(l_out) W) x`` and ``W (x * l_in) = (W diag(l_in)) x``, so merging multiplies
rows or columns of ``W`` (and, for output scaling, the bias).
"""

from __future__ import annotations

from torch import Tensor


def along(v: Tensor, like: Tensor, dim: int) -> Tensor:
    """``v`` (``(n,)``) reshaped to broadcast along dimension ``dim`` of ``like`` (size 1 elsewhere)."""
    shape = [1] * like.dim()
    shape[dim] = -1
    return v.reshape(shape)


def scale_weight(W: Tensor, l: Tensor, dim: int, inverse: bool = False) -> Tensor:
    """``W`` with dimension ``dim`` multiplied (or divided, to unmerge) by ``l``, in float32 or wider."""
    factor = along(l.float(), W, dim)
    W32 = W.float() if W.dtype != factor.dtype else W
    return W32 / factor if inverse else W32 * factor
