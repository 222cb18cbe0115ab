"""Tensor math for combining adapters: pure functions, no model and no state.

Task tensors ``t_1 .. t_n`` all have one shape; weights ``w_1 .. w_n`` are plain floats. The merges
(following TIES-merging, Yadav et al. 2023, and DARE, Yu et al. 2023, with weights as peft applies them):

- ``weighted_sum``: ``sum_i w_i t_i`` (task arithmetic);
- ``magnitude_prune``: ``sum_i w_i trim(t_i)``;
- ``ties``: ``disjoint_merge(w_i trim(t_i), elect_sign(trim(t_i)))``;
- ``dare_linear``: ``sum_i w_i drop(t_i)``;
- ``dare_ties``: ``disjoint_merge(w_i drop(t_i), elect_sign(drop(t_i)))``;

with ``trim`` keeping the ``density`` fraction of largest magnitudes, ``drop`` keeping each entry with
probability ``density`` and dividing the kept ones by ``density`` (so ``E[drop(t)] = t``), and the sign
elected from the *unweighted* trimmed/dropped tensors. :func:`truncated_svd` turns a combined delta into
low-rank factors.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

SIGN_METHODS = ("total", "frequency")
#: The merge rules :func:`merge` knows, and whether each needs a ``density``.
MERGES = {"weighted_sum": False, "magnitude_prune": True, "ties": True, "dare_linear": True, "dare_ties": True}


def magnitude_trim(t: Tensor, density: float) -> Tensor:
    """Keep the ``k = int(density * t.numel())`` entries of largest ``|t|``, zero the rest.

    Args:
        t: Any shape.
        density: Fraction kept, in ``[0, 1]``; ``>= 1`` returns ``t`` itself.

    Returns:
        ``t * mask`` (same shape), ``mask`` 1 on the top-``k`` of ``|t|``.
    """
    if density >= 1:
        return t
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[torch.topk(t.abs().reshape(-1), k=k).indices] = 1
    return t * mask.reshape(t.shape)


def dare_drop(t: Tensor, density: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """DARE's random drop with rescale: ``t * m / density``, ``m_j ~ Bernoulli(density)`` i.i.d.

    Args:
        t: Any shape (floating point).
        density: Keep probability in ``(0, 1]``; ``>= 1`` returns ``t`` itself and draws nothing.
        generator: Source of the mask (default: torch's global generator, so ``torch.manual_seed``
            reproduces it); one ``torch.bernoulli`` call of ``t``'s shape.

    Returns:
        Same shape as ``t``; ``E[result] = t``.
    """
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def elect_sign(stacked: Tensor, method: str = "total") -> Tensor:
    """TIES sign election: which entries agree with the per-position majority sign.

    Args:
        stacked: ``(n, *shape)``, the task tensors stacked on dim 0.
        method: ``"total"``: the majority sign is the sign of ``sum_i t_i``; ``"frequency"``: of
            ``sum_i sign(t_i)``. Ties (a zero sum) elect ``+``.

    Returns:
        Bool ``(n, *shape)``: ``sign(t_i) == elected`` (zeros never agree).
    """
    if method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {method!r}")
    sign = stacked.sign()
    total = stacked.sum(0) if method == "total" else sign.sum(0)
    elected = torch.where(total >= 0, 1.0, -1.0).to(sign.dtype)
    return sign == elected


def disjoint_merge(weighted: Tensor, agree: Tensor) -> Tensor:
    """TIES disjoint mean: per position, the mean over the tensors that agree with the elected sign.

    Args:
        weighted: ``(n, *shape)``, the weighted task tensors ``w_i t_i``.
        agree: Bool ``(n, *shape)`` from :func:`elect_sign`.

    Returns:
        ``(*shape)``: ``sum_i agree_i w_i t_i / max(1, sum_i agree_i)``.
    """
    kept = (weighted * agree).sum(0)
    return kept / agree.sum(0).clamp(min=1).to(kept.dtype)


def _weighted(stacked: Tensor, weights: Sequence[float]) -> Tensor:
    """``w_i t_i`` for ``stacked: (n, *shape)``."""
    w = torch.as_tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    return stacked * w.reshape((-1,) + (1,) * (stacked.dim() - 1))


def merge(rule: str, tensors: Sequence[Tensor], weights: Sequence[float], density: Optional[float] = None,
          majority_sign_method: str = "total", generator: Optional[torch.Generator] = None) -> Tensor:
    """Combine task tensors by one rule of :data:`MERGES` (formulas in the module docstring).

    Args:
        rule: ``"weighted_sum"``, ``"magnitude_prune"``, ``"ties"``, ``"dare_linear"`` or ``"dare_ties"``.
        tensors: ``n`` tensors of one shape.
        weights: ``n`` floats.
        density: Fraction kept by trim/drop (rules that prune).
        majority_sign_method: See :func:`elect_sign` (TIES rules).
        generator: For DARE's drops, drawn per tensor in the given order.

    Returns:
        One tensor of the common shape.
    """
    if rule not in MERGES:
        raise ValueError(f"unknown merge rule {rule!r}; known: {sorted(MERGES)}")
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(f"need one weight per tensor and at least one tensor, got {len(tensors)} and {len(weights)}")
    if MERGES[rule] and density is None:
        raise ValueError(f"merge rule {rule!r} needs a density")
    if rule in ("magnitude_prune", "ties"):
        tensors = [magnitude_trim(t, density) for t in tensors]
    elif rule in ("dare_linear", "dare_ties"):
        tensors = [dare_drop(t, density, generator) for t in tensors]
    stacked = torch.stack(list(tensors))
    if rule in ("ties", "dare_ties"):
        return disjoint_merge(_weighted(stacked, weights), elect_sign(stacked, majority_sign_method))
    return _weighted(stacked, weights).sum(0)


def truncated_svd(delta: Tensor, rank: int, clamp: Optional[float] = None, full_matrices: bool = True,
                  driver: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors of a matrix: ``B @ A ~= delta`` (best approximation in Frobenius norm).

    ``delta = U S V^T``; ``B = U[:, :k] diag(S[:k])``, ``A = V^T[:k]``. With ``clamp`` (a quantile
    ``q`` in ``[0, 1]``), ``h = quantile(concat(B, A), q)`` over all their (signed) entries and both are
    clamped to ``[-h, h]`` (kohya's sd-scripts heuristic, as peft applies it). When ``rank`` exceeds
    ``min(out, in)``, the factors are padded with zero rows/columns to ``rank`` (the product is exact).

    Args:
        delta: ``(out, in)``.
        rank: ``k > 0``.
        clamp: Optional quantile for clamping.
        full_matrices, driver: Passed to ``torch.linalg.svd`` (``driver`` only on CUDA).

    Returns:
        ``(A, B)``: ``A: (rank, in)``, ``B: (out, rank)``, in ``delta``'s dtype.
    """
    if delta.dim() != 2:
        raise ValueError(f"truncated_svd needs a matrix, got shape {tuple(delta.shape)}")
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(rank, S.shape[0])
    B = U[:, :k] @ torch.diag(S[:k])
    A = Vh[:k, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B = B.clamp(-high, high)
        A = A.clamp(-high, high)
    if k < rank:
        A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1)
    return A, B
