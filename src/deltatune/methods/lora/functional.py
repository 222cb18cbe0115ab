"""Pure tensor math of LoRA, shared by the layers' forward/merge and by offline merging.

Shapes: ``A: (r, in)``, ``B: (out, r)`` for linear layers; ``A: (r, in, *k)``, ``B: (out, r, 1...)``
for convolutions; ``A: (r, num_embeddings)``, ``B: (dim, r)`` for embeddings. ``s`` is the scaling.
"""

from __future__ import annotations

import math
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


def sample_dropped(n: int, p: float, device) -> Tensor:
    """Flat indices of the dropped elements of an ``n``-element tensor: iid Bernoulli(p) per element.

    Instead of one random number per element, draw the gaps between dropped elements, which are iid
    Geometric(p) for an iid Bernoulli(p) sequence: about ``n * p`` draws (5% of ``n`` at p = 0.05), so
    the mask is both cheaper to sample and compact to keep for backward. The ``k``-th position is the sum
    of the first ``k + 1`` gaps minus one.
    """
    mean = n * p
    count = int(mean + 6.0 * math.sqrt(mean * (1.0 - p)) + 16)
    gaps = _geometric(count, p, device)
    gaps[0] -= 1
    positions = gaps.cumsum_(0)
    kept = int(torch.searchsorted(positions, n))  # sorted: a binary search, not a mask
    while kept == positions.numel() and positions[-1] < n - 1:  # too few gaps drawn (probability ~1e-9)
        positions = torch.cat([positions, _geometric(count, p, device).cumsum_(0).add_(positions[-1])])
        kept = int(torch.searchsorted(positions, n))
    return positions[:kept]


def _geometric(count: int, p: float, device) -> Tensor:
    """``count`` iid Geometric(p) draws on {1, 2, ...} by inverse CDF, ``floor(log U / log(1 - p)) + 1``
    with ``U = 1 - rand`` uniform on (0, 1]: ``P(G > k) = P(U <= (1 - p)^k) = (1 - p)^k``. The quotient is
    never negative, so the integer cast is the floor. (3-4x faster than ``Tensor.geometric_`` on the CPU;
    each pass over the draws costs about as much as drawing them, hence as few passes as possible.)"""
    u = torch.rand(count, device=device).neg_().add_(1.0)  # in place: a new buffer costs more than a pass
    return u.log_().mul_(1.0 / math.log1p(-p)).to(torch.int64).add_(1)


def _masked_copy(x2: Tensor, positions: Tensor) -> Tensor:
    """``mask * x``: a copy of ``x2`` with the dropped elements zeroed (``drop(x)`` without its ``1 / (1 - p)``,
    which goes on the rank-r side: an ``r``-wide multiply instead of an input-wide one)."""
    out = x2.clone()
    out.view(-1).index_fill_(0, positions, 0.0)
    return out


#: Dtypes in which ``W + s B A`` may be formed as a temporary (see :func:`_folds`).
FOLDABLE = (torch.float32, torch.float64)


def _folds(tokens: int, weight: Tensor, dim: int) -> bool:
    """Whether ``s B A`` folded into a temporary weight beats the rank-r path on ``tokens`` rows.

    The ``r``-deep product that writes the rank-r path's ``(tokens, width)`` result runs at half a big
    GEMM's rate on the CPU (its cost follows its output size); the fold writes a ``(out, in)`` weight
    instead: cheaper when ``tokens >= width``, the weight's other side (``weight.shape[dim]``: ``in``
    forward, ``out`` backward). Float32/64 only: in half precision ``W + s B A`` would round a small
    delta away at the weight's magnitude, systematically.
    """
    return tokens >= weight.shape[dim] and weight.dtype in FOLDABLE


class _LoraLinear(torch.autograd.Function):
    """``y = [b + scale * (W x] + s * B A drop(x)[)]`` for ``x: (..., in)`` as one autograd node.

    - ``weight`` given (a plain ``nn.Linear`` base, ``x: (tokens, in)``): the base runs here too. Many
      tokens and no dropout (see :func:`_folds`): one GEMM with the temporary ``W + s B A``; else the
      adapter's result is written first and the base GEMM accumulates into it. In backward both paths'
      input gradients are built in one buffer (no second input-sized gradient, no add), the same way.
      ``scale`` (a per-output-row factor, ``(out,)``, e.g. DoRA's ``m / ||W + s B A||``) rescales each
      output row. It goes on ``W`` and ``B`` when there are more tokens than input features (a
      weight-sized pass instead of an output-sized one); only ``y`` is kept for its gradient,
      ``sum_t g (y - b) / scale``.
    - ``weight`` None: the delta ``s B A drop(x)`` itself, ``(..., out)``.

    Dropout (``p > 0``) keeps no dropped-out copy of ``x``: what is saved is ``x`` itself, the rank-r
    intermediate ``s A drop(x)`` and the dropped positions (~p * n int32); ``drop(x)`` is rebuilt in
    backward from those positions for ``dA`` only. With ``p > 0`` the positions are a second output.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale, scaling: float, p: float):
        x2 = x.reshape(-1, x.shape[-1])
        keep_scale = 1.0 / (1.0 - p)
        ctx.scaling, ctx.keep_scale = scaling, keep_scale
        if p > 0.0:
            positions = sample_dropped(x2.numel(), p, x.device)
            hidden = F.linear(_masked_copy(x2, positions), A).mul_(scaling * keep_scale)  # s A drop(x)
            compact = positions.to(torch.int32) if x2.numel() < 2**31 else positions
            ctx.mark_non_differentiable(positions)
        else:
            hidden = F.linear(x2, A).mul_(scaling)  # (tokens, r)
            compact = None
        if weight is None:
            out = F.linear(hidden, B, bias)
            if x.dim() != 2:
                out = out.view(*x.shape[:-1], out.shape[-1])
        elif scale is not None and x2.shape[0] < weight.shape[1]:  # few tokens: rescale the output
            out = F.linear(hidden, B).addmm_(x2, weight.t()).mul_(scale)
            if bias is not None:
                out.add_(bias)
        else:
            W, Bs = scaled_rows(weight, scale), scaled_rows(B, scale)
            if p == 0.0 and _folds(x2.shape[0], weight, 1):
                out = F.linear(x2, plus_low_rank(W, weight, Bs, A, scaling), bias)
            else:  # the base GEMM adds into the delta (beta = 1)
                out = F.linear(hidden, Bs, bias).addmm_(x2, W.t())
        ctx.save_for_backward(x, weight, bias, A, B, scale, hidden, compact, out if scale is not None else None)
        return (out, positions) if p > 0.0 else out

    @staticmethod
    def backward(ctx, grad_out, *_grad_positions):
        x, weight, bias, A, B, scale, hidden, compact, y = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        tokens = x2.shape[0]
        positions = None if compact is None else compact.long()
        Bs = scaled_rows(B, scale)
        # d loss / d(A x) (tokens, r); with dropout d loss / d(A mask x), so the keep scale is on it
        grad_hidden = torch.mm(g, Bs).mul_(ctx.scaling if positions is None else ctx.scaling * ctx.keep_scale)
        grad_x = grad_w = grad_b = grad_A = grad_B = grad_scale = None
        if need[4]:
            grad_B = scaled_rows(g.t() @ hidden, scale)  # hidden already carries s
        spare = None  # an input-sized buffer the input gradient may reuse
        if need[3]:
            if positions is None:
                grad_A = grad_hidden.t() @ x2
            else:
                spare = _masked_copy(x2, positions)
                grad_A = grad_hidden.t() @ spare
        if need[0]:
            if weight is not None and positions is None and _folds(tokens, weight, 0):
                W = scaled_rows(weight, scale)
                grad_x = torch.mm(g, plus_low_rank(W, weight, Bs, A, ctx.scaling))
            else:
                grad_x = torch.mm(grad_hidden, A) if spare is None else torch.mm(grad_hidden, A, out=spare)
                if positions is not None:
                    grad_x.view(-1).index_fill_(0, positions, 0.0)
                if weight is not None:  # the base's input gradient, into the same buffer
                    if scale is None or tokens >= weight.shape[1]:
                        grad_x.addmm_(g, scaled_rows(weight, scale))
                    else:
                        grad_x.addmm_(g * scale, weight)
            if grad_x.shape != x.shape:  # (a same-shape reshape is a view, which autograd cannot add into in place)
                grad_x = grad_x.reshape(x.shape)
        if need[1]:
            grad_w = scaled_rows(g.t() @ x2, scale)
        if need[2]:
            grad_b = g.sum(0)
        if need[5]:  # dy/dscale = W x + s B A drop(x) = (y - b) / scale, a column-wise dot with g
            g_sum = None if bias is None else g.sum(0)
            grad_scale = _scale_grad(torch.linalg.vecdot(g, y, dim=0), bias, g_sum, scale)
        return grad_x, grad_w, grad_b, grad_A, grad_B, grad_scale, None, None


def _scale_grad(gy: Tensor, bias: Tensor | None, g_sum: Tensor | None, scale: Tensor) -> Tensor:
    """DoRA's ``d loss / d scale = sum g (y - b) / scale`` per channel from ``gy = sum g y`` and ``g_sum = sum g``."""
    return (gy if bias is None else gy - bias * g_sum) / scale


def scaled_rows(M: Tensor, scale: Tensor | None) -> Tensor:
    """``M`` with row ``i`` times ``scale[i]`` (a new tensor), or ``M`` itself for ``scale=None``."""
    return M if scale is None else M * scale[:, None]


def plus_low_rank(W: Tensor, weight: Tensor, B: Tensor, A: Tensor, scaling: float) -> Tensor:
    """``W + s B A`` as a temporary, in place when ``W`` is already one (not the layer's ``weight``)."""
    return torch.addmm(W, B, A, alpha=scaling) if W is weight else W.addmm_(B, A, alpha=scaling)


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float,
                p: float = 0.0, scale: Tensor | None = None) -> Tensor:
    """``b + scale * (x W^T + s * B A drop(x))`` for ``x: (tokens, in)`` in one autograd node (see
    :class:`_LoraLinear`); ``p`` is the training-mode dropout probability (0 for none), ``scale`` DoRA's
    ``m / ||W + s B A||`` per output row (None for plain LoRA)."""
    out = _LoraLinear.apply(x, weight, bias, A, B, scale, scaling, p)
    return out[0] if p > 0.0 else out


def linear_delta_dropout(x: Tensor, A: Tensor, B: Tensor, scaling: float, p: float,
                         return_positions: bool = False):
    """Training-mode ``s * B A drop(x)`` with a compact dropout mask (see :class:`_LoraLinear`).

    Each element of ``x`` is kept with probability ``1 - p`` and scaled by ``1 / (1 - p)``, exactly as
    ``F.dropout``; ``return_positions`` also returns the flat indices that were dropped (for tests).
    """
    out, positions = _LoraLinear.apply(x, None, None, A, B, None, scaling, p)
    return (out, positions) if return_positions else out


def lora_delta(x: Tensor, A: Tensor, B: Tensor, scaling: float, p: float = 0.0) -> Tensor:
    """``s * B A drop(x)`` for ``x: (..., in)``: with ``p > 0`` the compact-mask dropout of
    :func:`linear_delta_dropout`, else the plain product (:func:`linear_delta`)."""
    if p > 0.0:
        return linear_delta_dropout(x, A, B, scaling, p)
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
               dilation, dropout: float = 0.0, training: bool = False, groups: int = 1) -> Tensor:
    """``s * conv_B(conv_A(drop(x)))``: ``A`` carries the base kernel, ``B`` is a 1x1 conv (grouped as the
    base is, ``B: (out, r / groups, 1, ...)``, as peft lays it out)."""
    if dropout > 0.0 and training:
        x = F.dropout(x, p=dropout, training=True)
    hidden = conv(x, A, None, stride, padding, dilation)
    return conv(hidden * scaling, B, None, 1, 0, 1, groups)


def conv_delta_weight(A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """The single kernel equal to ``conv_B . conv_A``: ``W[o, i, k] = s * sum_r B[o, r] A[r, i, k]``."""
    B2 = B.reshape(B.shape[0], B.shape[1])
    return torch.einsum("or,ri...->oi...", B2, A) * scaling


def dora_row_norm(W: Tensor, A: Tensor, B: Tensor, scaling: float, fan_in_fan_out: bool = False,
                  w_sqnorm: Tensor | None = None) -> Tensor:
    """Per-output-row norm ``||w_i + s b_i A||`` without forming the ``(out, in)`` matrix ``W + s B A``.

    ``||w_i + s b_i A||^2 = ||w_i||^2 + 2 s b_i . (A w_i) + s^2 b_i^T (A A^T) b_i``: extra memory is
    ``O(out * r + r^2)``. ``w_sqnorm`` (``||w_i||^2``, constant while the base is frozen) may be passed in.
    Computed in ``A``'s dtype (float32 for half bases); returns ``(out,)``.
    """
    rows = (W.t() if fan_in_fan_out else W).to(A.dtype)  # (out, in)
    if w_sqnorm is None:
        w_sqnorm = rows.pow(2).sum(1)
    WA = rows @ A.t()  # (out, r)
    cross = (B * WA).sum(1)
    quad = ((B @ (A @ A.t())) * B).sum(1)
    return (w_sqnorm + (2.0 * scaling) * cross + (scaling * scaling) * quad).clamp_min(0).sqrt()


class _DoraCombine(torch.autograd.Function):
    """``y = b + scale * (W x + delta)`` from the base output ``out = W x + b`` and the LoRA ``delta``.

    Autograd of the plain expression keeps two out-sized tensors per layer (``W x`` and ``delta``, for
    the gradient of ``scale``); this keeps only the output ``y`` (which the next op usually keeps
    anyway: attention keeps q/k/v, the MLP keeps gate/up) and recovers ``W x + delta = (y - b) / scale``
    in backward. ``scale = m / ||W + s B A||`` and ``b`` are ``(C,)`` along the channel dimension ``ch``.
    """

    @staticmethod
    def forward(ctx, out, delta, scale, bias, ch: int):
        view = [1] * out.dim()
        view[ch] = -1
        y = (out + delta).mul_(scale.view(view))  # y = scale * (out + delta) + b (1 - scale)
        if bias is not None:
            y.add_((bias * (1 - scale)).view(view))
        ctx.save_for_backward(y, scale, bias)
        ctx.view, ctx.reduce = view, [d for d in range(out.dim()) if d != ch]
        return y

    @staticmethod
    def backward(ctx, g):
        y, scale, bias = ctx.saved_tensors
        grad_in = g * scale.view(ctx.view)
        grad_scale = grad_bias = None
        g_sum = g.sum(ctx.reduce) if bias is not None else None
        if ctx.needs_input_grad[2]:
            # dy/dscale = W x + delta = (y - b) / scale, summed against g over all but the channel dim
            if ctx.view[-1] == -1:  # channels last: a column-wise dot, no g * y temporary (2x faster)
                gy = torch.linalg.vecdot(g.reshape(-1, y.shape[-1]), y.reshape(-1, y.shape[-1]), dim=0)
            else:
                gy = (g * y).sum(ctx.reduce)
            grad_scale = _scale_grad(gy, bias, g_sum, scale)
        if bias is not None and ctx.needs_input_grad[3]:
            grad_bias = g_sum * (1 - scale)  # the direct path; the path through ``out`` gives g * scale
        return grad_in, grad_in if ctx.needs_input_grad[1] else None, grad_scale, grad_bias, None


def dora_combine(out: Tensor, delta: Tensor, scale: Tensor, bias: Tensor | None, ch: int = -1) -> Tensor:
    """``b + scale * (out - b + delta)`` for one DoRA adapter; ``out`` is the base output with bias."""
    return _DoraCombine.apply(out, delta, scale, bias, ch % out.dim())


def along(v: Tensor, like: Tensor, dim: int) -> Tensor:
    """``v`` (one value per channel) shaped to broadcast along dimension ``dim`` of ``like``."""
    shape = [1] * like.dim()
    shape[dim] = -1
    return v.view(shape)


def dora_merged_weight(W: Tensor, delta: Tensor, magnitude: Tensor, norm: Tensor, out_dim: int = 0) -> Tensor:
    """``(m / ||W + dW||) * (W + dW)`` per output channel (dimension ``out_dim`` of ``W``), float32 or wider."""
    compute = torch.promote_types(W.dtype, torch.float32)
    scale = along(magnitude.to(compute) / norm.to(compute), W, out_dim)
    return (W.to(compute) + delta.to(compute)) * scale


def dora_unmerged_weight(merged: Tensor, delta: Tensor, magnitude: Tensor, norm: Tensor, out_dim: int = 0) -> Tensor:
    """Inverse of :func:`dora_merged_weight` given the ``norm`` used when merging."""
    compute = torch.promote_types(merged.dtype, torch.float32)
    scale = along(norm.to(compute) / magnitude.to(compute), merged, out_dim)
    return merged.to(compute) * scale - delta.to(compute)


def pissa_factors(W: Tensor, r: int, scaling: float, niter: int | None = None) -> tuple[Tensor, Tensor]:
    """PiSSA (Meng et al., 2024): ``A, B`` from the top-``r`` singular triplets of ``W (out, in)``.

    ``W ~ U_r S_r V_r^T``; ``A = sqrt(S_r / s) V_r^T``, ``B = U_r sqrt(S_r / s)`` so ``s B A = U_r S_r V_r^T``.
    ``niter`` selects the randomized low-rank SVD with that many subspace iterations. Float32.
    """
    W = W.float()
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
        Vh = V.t()
    root = torch.sqrt(S / scaling)
    return root[:, None] * Vh, U * root[None, :]


def olora_factors(W: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """OLoRA (Buyukakyuz, 2024): ``W = Q R``; ``A = R[:r]`` (r, in), ``B = Q[:, :r]`` (out, r). Float32."""
    Q, R = torch.linalg.qr(W.float())
    return R[:r].contiguous(), Q[:, :r].contiguous()


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
