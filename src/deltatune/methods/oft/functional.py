"""Pure tensor math of OFT: skew-symmetric blocks, their Cayley transforms, COFT's projection, and the
block-diagonal rotation applied to inputs or folded into weights.

Parameters: ``vec: (n_blocks, b (b - 1) / 2)``, one row per block, the strict upper triangle of a ``(b, b)``
block in row-major order (``torch.triu_indices(b, b, 1)``). ``Q = U - U^T`` where ``U`` holds ``vec`` above the
diagonal, so ``Q^T = -Q``.

Two transforms, as peft 0.21 computes them (note the opposite sign conventions: for small ``Q`` the series
approximates the *transpose* of the exact transform):

- exact Cayley: ``R = (I - Q)(I + Q)^{-1}``, i.e. ``(I + S)(I - S)^{-1}`` with ``S = -Q``; orthogonal for any ``Q``.
- Cayley-Neumann with ``n`` terms: ``(I + Q)(I - Q)^{-1} = I + 2 sum_{k>=1} Q^k`` truncated as
  ``I`` (n = 1), ``I + 2Q`` (n = 2), else ``I + 2 (Q + ... + Q^{m-1}) + Q^m`` with ``m = max(n - 1, 3)``;
  orthogonal only up to the truncation error.

A layer with blocks ``R_1..R_r`` rotates a row vector ``x: (..., r * b)`` blockwise, ``x_i -> x_i R_i`` (``x BD``
with ``BD = diag(R_1, ..., R_r)``); a weight ``W: (out, r * b)`` computing ``x W^T`` then equals
``W' = W BD^T`` applied to the unrotated ``x``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def skew(vec: Tensor, block_size: int) -> Tensor:
    """``Q = U - U^T`` per block: ``(n_blocks, n_elements) -> (n_blocks, b, b)``."""
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=vec.device)
    upper = vec.new_zeros(vec.shape[0], block_size, block_size)
    upper[:, rows, cols] = vec
    return upper - upper.transpose(-2, -1)


def unskew(Q: Tensor) -> Tensor:
    """The inverse of :func:`skew`: the strict upper triangle of each block, ``(n, b, b) -> (n, b (b-1)/2)``."""
    b = Q.shape[-1]
    rows, cols = torch.triu_indices(b, b, 1, device=Q.device)
    return Q[:, rows, cols]


def cayley(vec: Tensor, block_size: int) -> Tensor:
    """Exact Cayley transform per block, ``R = (I - Q)(I + Q)^{-1}``: ``(n, b, b)``.

    Solved as ``X (I + Q) = I - Q`` (no explicit inverse); computed in float32 or wider.
    """
    Q = skew(vec, block_size)
    Q = Q.float() if Q.dtype in (torch.float16, torch.bfloat16) else Q
    eye = torch.eye(block_size, device=Q.device, dtype=Q.dtype).expand_as(Q)
    return torch.linalg.solve(eye + Q, eye - Q, left=False).to(vec.dtype)


def cayley_neumann(vec: Tensor, block_size: int, terms: int) -> Tensor:
    """Truncated Neumann series of ``(I + Q)(I - Q)^{-1}`` per block (see the module docstring): ``(n, b, b)``."""
    Q = skew(vec, block_size)
    R = torch.eye(block_size, device=Q.device, dtype=Q.dtype).repeat(Q.shape[0], 1, 1)
    if terms == 1:
        return R
    if terms == 2:
        return R + 2 * Q
    last = max(terms - 1, 3)  # peft's loop: n = 3 and n = 4 both end at Q^3
    power = Q
    for _ in range(1, last):  # adds 2 Q^k for k = 1 .. last - 1
        R = R + 2 * power
        power = torch.bmm(power, Q)
    return R + power  # + Q^last


def rotations(vec: Tensor, block_size: int, neumann: bool, terms: int) -> Tensor:
    """The blocks ``R_i`` of one adapter: :func:`cayley_neumann` or :func:`cayley`, ``(n, b, b)``."""
    return cayley_neumann(vec, block_size, terms) if neumann else cayley(vec, block_size)


def coft_project(vec: Tensor, block_size: int, eps: float) -> Tensor:
    """COFT's constraint: each block's ``Q`` scaled back onto the Frobenius ball of radius
    ``eps / sqrt(n_blocks)`` when outside it (``Q -> radius * Q / ||Q||_F``), left alone inside; same shape
    as ``vec``. Idempotent."""
    Q = skew(vec, block_size)
    radius = eps / math.sqrt(vec.shape[0])
    norm = torch.linalg.matrix_norm(Q, keepdim=True)  # Frobenius
    inside = norm <= radius
    scaled = radius * Q / torch.where(inside, torch.ones_like(norm), norm)  # (no 0/0 for zero blocks)
    return unskew(torch.where(inside, Q, scaled))


def expand_blocks(R: Tensor, n_blocks: int) -> Tensor:
    """``(1, b, b)`` (a shared block) repeated to ``(n_blocks, b, b)``; other shapes unchanged."""
    return R.expand(n_blocks, -1, -1) if R.shape[0] == 1 and n_blocks > 1 else R


def drop_blocks(R: Tensor, p: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """Multiplicative dropout: ``floor(p * n)`` blocks of ``R: (n, b, b)``, chosen at random, replaced by the
    identity. A single (shared) block is never dropped."""
    n, b, _ = R.shape
    k = int(p * n)
    if n == 1 or k == 0:
        return R
    drop = torch.zeros(n, dtype=torch.bool, device=R.device)
    drop[torch.randperm(n, generator=generator)[:k].to(R.device)] = True
    eye = torch.eye(b, device=R.device, dtype=R.dtype).expand_as(R)
    return torch.where(drop.view(n, 1, 1), eye, R)


def block_diagonal(R: Tensor) -> Tensor:
    """``BD = diag(R_1, ..., R_n)``: ``(n, b, b) -> (n b, n b)`` (for reference and tests; the layers never
    build it)."""
    return torch.block_diag(*R.unbind(0))


def rotate_input(x: Tensor, R: Tensor) -> Tensor:
    """``x BD``: each length-``b`` slice of the last dimension times its block, ``x_i R_i``; ``x: (..., n b)``."""
    n, b, _ = R.shape
    blocks = x.reshape(*x.shape[:-1], n, b)
    return torch.einsum("...nk,nkc->...nc", blocks, R).reshape(x.shape)


def rotate_weight(W: Tensor, R: Tensor) -> Tensor:
    """``W BD^T`` for ``W: (out, n b)`` (a conv weight flattened to ``(out, in k k)``): the weight that gives on
    ``x`` what ``W`` gives on ``x BD``."""
    n, b, _ = R.shape
    out = torch.einsum("onk,nck->onc", W.reshape(W.shape[0], n, b), R)
    return out.reshape(W.shape)


def inverse_blocks(R: Tensor) -> Tensor:
    """``R_i^{-1}`` per block, in float32 or wider (exact for both transforms, which need not be orthogonal
    when truncated)."""
    R32 = R.float() if R.dtype in (torch.float16, torch.bfloat16) else R
    return torch.linalg.inv(R32)
