"""Pure tensor math of VeRA.

Shapes: ``x: (..., in)``, shared projections ``A: (r, max_in)``, ``B: (max_out, r)`` of which a layer uses
``A_s = A[:, :in]`` and ``B_s = B[:out, :]``; trainable ``λ_d: (r,)``, ``λ_b: (out,)``. With
``Λ = diag(λ)``, one adapter adds ``Λ_b B_s Λ_d A_s x`` to the layer's output, so merging adds
``ΔW = (λ_b[:, None] * B_s) @ (λ_d[:, None] * A_s)`` (``(out, in)``; transposed for weights stored
``(in, out)``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """``U(-bound, bound)`` with ``bound = sqrt(6 / fan_in)`` (``fan_in = shape[1]``; Kaiming with gain
    ``sqrt(2)``), drawn from ``generator`` on the CPU in float32.

    The bound is evaluated as ``sqrt(3) * (sqrt(2) / sqrt(fan_in))``, the order in which peft evaluates it, so
    that the float values are bit-identical.
    """
    bound = math.sqrt(3.0) * (math.sqrt(2.0) / math.sqrt(shape[1]))
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(seed: int, r: int, max_in: int, max_out: int) -> tuple[Tensor, Tensor]:
    """The shared pair ``(A: (r, max_in), B: (max_out, r))``: a CPU generator seeded with ``seed`` draws
    ``A`` first, then ``B``, each :func:`kaiming_uniform`."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    A = kaiming_uniform((r, max_in), generator)
    B = kaiming_uniform((max_out, r), generator)
    return A, B


def delta(x: Tensor, A: Tensor, B: Tensor, lambda_d: Tensor, lambda_b: Tensor) -> Tensor:
    """``Λ_b B Λ_d A x`` for row vectors: ``λ_b * ((λ_d * (x A^T)) B^T)``; ``A: (r, in)``, ``B: (out, r)``
    (already sliced), result ``(..., out)``."""
    return lambda_b * ((lambda_d * (x @ A.T)) @ B.T)


def delta_weight(A: Tensor, B: Tensor, lambda_d: Tensor, lambda_b: Tensor) -> Tensor:
    """``ΔW = Λ_b B Λ_d A``: ``(out, in)``."""
    return (lambda_b[:, None] * B) @ (lambda_d[:, None] * A)
