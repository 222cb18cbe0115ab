"""LoRA and DoRA in mixed-adapter batches: every row through its own adapter, in one pass per layer.

For the adapters ``u = 1..U`` a batch names in one layer, with row ``n``'s adapter ``u(n)`` (0: none),
the layer computes the base output for the whole batch once, then

    ``h = down(drop(x), [A_1; ...; A_U])``          all adapters' ``r_u`` channels, concatenated
    ``h[n] *= 1 on u(n)'s channels, 0 elsewhere``   (the row mask)
    ``y = scale[u(n)] * out + shift[u(n)] + up(h, [s_1 c_1 B_1, ..., s_U c_U B_U])``

where ``c_u`` is DoRA's per-channel ``m / ||W + s B A||`` (its variant's ``row_scale``; 1 for LoRA and base
rows), ``scale = c`` and ``shift = b (1 - c)``, which is DoRA's ``b + c (W x + s B A x)`` again. Ranks may
differ: the concatenation needs no padding, and the masked products are exact zeros. The cost is one
``sum_u r_u``-wide low-rank product over all rows, no per-adapter loop: cheap while the batch names a few
adapters. With many tokens per row (prefill) and several adapters, linear layers instead gather each row's
own rank-padded factors and run one batched product (``bmm``), whose cost does not grow with ``U``.

Without gradients the concatenated factors (cast to the input's dtype, scalings and DoRA's scale folded in)
are kept in the layer's :class:`~.cache.LayerCache` per set of adapters; with gradients they are built per
call from the parameters, so each row's gradient reaches its own adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

#: Mixed-batch stacks a layer keeps (per set of adapters): a server's changing batch compositions would
#: otherwise grow the cache without bound.
MAX_STACKS = 8

#: A gathered factor element costs about this many multiply-adds of a dense low-rank product (a copy
#: runs at memory speed, a GEMM at arithmetic speed); picks the route, see :func:`_gathers_pay`.
_GATHER_COST = 32


@dataclass
class Stack:
    """One layer's adapters of a mixed batch, in the layer's low-rank layout (see the module docstring).

    Attributes:
        names: The adapters, in slot order (slot ``i + 1`` is ``names[i]``; slot 0 is no adapter).
        ranks: Their ranks.
        down: The concatenated down factors in the layer's layout (linear: ``(in, sum r)``).
        up: The concatenated up factors, ``s_u c_u B_u``, in the layer's layout (linear: ``(sum r, out)``).
        scale: ``(U + 1, out)``: ``c_u`` per slot, ones for slot 0 and LoRA; None when no adapter rescales.
        shift: ``(U + 1, out)``: ``b (1 - c_u)``; None without a rescaling adapter or without a bias.
        add: ``(U + 1, out)``: what an adapter adds per output channel (``s b_B`` of ``lora_bias``), zeros
            for the others; None when none does.
        padded: Linear layers' per-slot factors for the gathered route, ``((U + 1, in, R), (U + 1, R, out))``
            with ``R = max r``, zero-padded; built when that route first runs.
    """

    names: tuple[str, ...]
    ranks: tuple[int, ...]
    down: Tensor
    up: Tensor
    scale: Optional[Tensor]
    shift: Optional[Tensor]
    add: Optional[Tensor] = None
    padded: Optional[tuple[Tensor, Tensor]] = None


def _build(layer, names: tuple[str, ...], dtype: torch.dtype) -> Stack:
    """The stack of ``names`` in ``layer``, differentiable in the adapters' parameters (DoRA's norm detached)."""
    ads = [layer.adapters[n] for n in names]
    bias = getattr(layer.base_layer, "bias", None)
    scales = [ad.variant.row_scale(layer, ad, torch.float32) for ad in ads]
    ups = []
    for ad, c in zip(ads, scales):
        B = ad.lora_B * ad.scaling if c is None else ad.lora_B * _as_column(c * ad.scaling, ad.lora_B)
        ups.append(B)
    down, up = layer._mixed_layout(torch.cat([ad.lora_A for ad in ads], 0), torch.cat(ups, 1))
    scale = shift = None
    if any(c is not None for c in scales):
        one = torch.ones(ads[0].lora_B.shape[0], device=ads[0].lora_B.device)
        scale = torch.stack([one] + [one if c is None else c for c in scales])
        if bias is not None:
            shift = bias.to(scale.dtype) * (1 - scale)
            shift = shift.to(dtype)
        scale = scale.to(dtype)
    adds = [ad.variant.out_shift(layer, ad) for ad in ads]
    add = None
    if any(a is not None for a in adds):
        zero = ads[0].lora_B.new_zeros(ads[0].lora_B.shape[0])
        add = torch.stack([zero] + [zero if a is None else a for a in adds]).to(dtype)
    return Stack(names, tuple(ad.r for ad in ads), down.to(dtype), up.to(dtype), scale, shift, add)


def _as_column(v: Tensor, B: Tensor) -> Tensor:
    """``v`` (one value per output channel) shaped to scale the rows of ``B`` (``(out, r, *ones)``)."""
    return v.reshape((-1,) + (1,) * (B.dim() - 1)).to(B.dtype)


def _stack(layer, mods: dict, names: tuple[str, ...], dtype: torch.dtype) -> Stack:
    """The no-grad stack, from the layer's cache while its tensors are unchanged (``mods``: the layer's
    adapters by name)."""
    # (Runs per layer per call: one plain loop over the adapters.)
    tensors, scalings, rescales = [], [], False
    for n in names:
        ad = mods[n]
        p = ad._parameters
        scaling = ad.scaling
        if scaling.__class__ is Tensor:  # (hot-swap scalings: no stamp that covers them)
            return _build(layer, names, dtype)
        scalings.append(scaling)
        tensors.append(p["lora_A"])
        tensors.append(p["lora_B"])
        extra = p["lora_B_bias"]
        if extra is not None:
            tensors.append(extra)
        extra = p["lora_magnitude_vector"]
        if extra is not None:
            tensors.append(extra)
            rescales = True
    if rescales:  # (DoRA's scale and shift also derive from the base weight and bias; LoRA's factors do not)
        base = layer._modules["base_layer"]
        tensors += (base.weight, getattr(base, "bias", None))
    entry = layer.cache.lookup(("mixed", names, dtype), tuple(tensors), tuple(scalings))
    if entry is None:
        return _build(layer, names, dtype)
    if entry.stack is None:
        entry.stack = _build(layer, names, dtype)
        keys = [k for k in layer.cache.entries if isinstance(k, tuple)]
        for old in keys[:-MAX_STACKS]:
            del layer.cache.entries[old]
    return entry.stack


def _mask(plan, stack: Stack, slots: Tensor, rows: int, dtype: torch.dtype) -> Tensor:
    """``(rows, sum r)``: 1 where a channel belongs to the row's adapter, 0 elsewhere (shared by every
    layer of the call with the same adapters and ranks)."""
    key = ("mask", stack.names, stack.ranks, rows, dtype, slots.device)
    mask = plan.memo.get(key)
    if mask is None:
        owner = torch.repeat_interleave(torch.arange(1, len(stack.ranks) + 1), torch.tensor(stack.ranks))
        mask = (slots[:, None] == owner.to(slots.device)[None, :]).to(dtype)
        plan.memo[key] = mask
    return mask


def _dropout(layer, x: Tensor, slots: Tensor, names: tuple[str, ...]) -> Tensor:
    """``x`` with each row's adapter's dropout applied (as ``F.dropout`` with that row's ``p``)."""
    if not layer.training:
        return x
    p = torch.tensor([0.0] + [layer.adapters[n].dropout for n in names], device=x.device)
    if not bool((p > 0).any()):
        return x
    p_row = p[slots].to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
    keep = torch.rand_like(x) >= p_row
    return x * keep / (1 - p_row)


def _along_channels(v: Tensor, like: Tensor, channel_dim: int) -> Tensor:
    """Per-row channel values ``(rows, C)`` shaped to broadcast over ``like`` (``(rows, ..., C, ...)``)."""
    shape = [1] * like.dim()
    shape[0] = v.shape[0]
    shape[channel_dim] = v.shape[1]
    return v.reshape(shape)


def _gathers_pay(layer, x: Tensor, rows: int, stack: Stack) -> bool:
    """Whether the gathered route is cheaper: per row ``tokens * max r`` against ``tokens * sum r``
    multiply-adds per feature, plus ``max r`` gathered factor elements per feature (see ``_GATHER_COST``)."""
    tokens = x.numel() // (rows * x.shape[-1])
    if tokens == 1 or len(stack.ranks) < 2 or not getattr(layer, "_mixed_gathers", False):
        return False
    r_max, r_sum = max(stack.ranks), sum(stack.ranks)
    return tokens * (r_sum - r_max) > _GATHER_COST * r_max


def _padded(stack: Stack) -> tuple[Tensor, Tensor]:
    """Per-slot factors ``(U + 1, in, R)`` and ``(U + 1, R, out)`` from the concatenated linear layout."""
    if stack.padded is not None:
        return stack.padded
    r_max = max(stack.ranks)
    downs, ups = [stack.down.new_zeros(stack.down.shape[0], r_max)], [stack.up.new_zeros(r_max, stack.up.shape[1])]
    start = 0
    for r in stack.ranks:
        downs.append(F.pad(stack.down[:, start:start + r], (0, r_max - r)))
        ups.append(F.pad(stack.up[start:start + r], (0, 0, 0, r_max - r)))
        start += r
    padded = (torch.stack(downs), torch.stack(ups))
    if not torch.is_grad_enabled():
        stack.padded = padded
    return padded


@dataclass
class _Rows:
    """What one layer needs for one call's rows: its adapters' stack, each row's slot, the row mask."""

    stack: Stack
    slots: Tensor
    mask: Tensor  # (rows, sum r) in the stack's dtype
    scale: Optional[Tensor] = None  # (rows, out): c per row, when an adapter rescales
    add: Optional[Tensor] = None  # (rows, out): what each row's adapter adds per channel, when one does


def _rows(layer, x: Tensor, plan, grad: bool) -> Optional[_Rows]:
    """The layer's :class:`_Rows` for input ``x``; None if no row names an adapter of this layer.

    Without gradients it is kept in the plan for the rest of the call (a generate call's decoding steps
    reuse it: the weights do not change within one call); with gradients the stack is built per call.
    Row slots and masks depend only on the adapters present (and their ranks), so layers holding the same
    adapters share them through the plan.
    """
    rows = x.shape[0]
    memo = plan.memo
    key = (id(layer), rows, x.dtype)
    if not grad:
        found = memo.get(key)
        if found is not None:
            return found
    mods = layer._modules["adapters"]._modules  # (per layer per call: no nn.Module.__getattr__)
    names = tuple([n for n in plan.unique if n in mods])
    if not names:
        return None
    dtype = x.dtype if x.is_floating_point() and not grad else mods[names[0]].lora_A.dtype
    stack = _build(layer, names, dtype) if grad else _stack(layer, mods, names, dtype)
    shared_key = ("rows", names, stack.ranks, rows, dtype)
    shared = memo.get(shared_key)
    if shared is None:
        slots = plan.slots(names, rows, x.device)
        shared = memo[shared_key] = (slots, _mask(plan, stack, slots, rows, dtype))
    slots, mask = shared
    found = _Rows(stack, slots, mask, None if stack.scale is None else stack.scale.index_select(0, slots),
                  None if stack.add is None else stack.add.index_select(0, slots))
    if not grad:
        memo[key] = found
    return found


def forward(layer, x: Tensor, out: Tensor, plan) -> Tensor:
    """The output of ``layer`` for a mixed batch: ``out`` is the base layer's output for the whole batch.

    ``x: (rows, ...)`` is the layer's input, ``rows`` the batch (or a multiple, see ``RowPlan.slots``).
    """
    grad = torch.is_grad_enabled()
    found = _rows(layer, x, plan, grad)
    if found is None:
        return out
    stack, slots = found.stack, found.slots
    rows, dtype = x.shape[0], stack.down.dtype
    h_in = x if not x.is_floating_point() or x.dtype == dtype else x.to(dtype)
    h_in = _dropout(layer, h_in, slots, stack.names) if x.is_floating_point() else h_in
    ch = layer._channel_dim
    if found.scale is not None:  # a rescaling (DoRA) adapter: y = c * out + b (1 - c) + ...
        scaled = out * _along_channels(found.scale.to(out.dtype), out, ch)
        if stack.shift is not None:
            scaled = scaled + _along_channels(stack.shift.index_select(0, slots).to(out.dtype), out, ch)
        out = scaled
    if found.add is not None:  # (lora_bias)
        out = out + _along_channels(found.add.to(out.dtype), out, ch)
    if _gathers_pay(layer, h_in, rows, stack):
        down, up = _padded(stack)
        h3 = h_in.reshape(rows, -1, h_in.shape[-1])
        delta = torch.bmm(torch.bmm(h3, down.index_select(0, slots)), up.index_select(0, slots)).view(out.shape)
    else:
        h = layer._down(h_in, stack.down)
        h = h * _along_channels(found.mask, h, ch)
        delta = layer._up(h, stack.up)
    if not grad and delta.dtype == out.dtype and not out.requires_grad:
        return out.add_(delta) if out.is_contiguous() else out + delta
    return out + delta.to(out.dtype)


def linear_no_grad(layer, x: Tensor, weight: Tensor, bias: Optional[Tensor], plan) -> Tensor:
    """:func:`forward` for a plain ``nn.Linear`` base without gradients, ``x`` in the weight's dtype: the
    base GEMM accumulates into the low-rank result (or the result into the base's, for DoRA and half
    precision), in as few ops as a decoded token allows. ``y = c * (x W^T) + b + (mask * (x A^T)) B'``.
    """
    found = _rows(layer, x, plan, False)
    if found is None:
        return F.linear(x, weight, bias)
    stack, slots = found.stack, found.slots
    shape, rows = x.shape, x.shape[0]
    x2 = x.reshape(-1, shape[-1])
    tokens = x2.shape[0] // rows
    if _gathers_pay(layer, x, rows, stack):
        down, up = _padded(stack)
        out = F.linear(x2, weight, None if found.scale is not None else bias).view(rows, tokens, -1)
        if found.scale is not None:
            out.mul_(found.scale[:, None])
            if bias is not None:
                out.add_(bias)
        # (index_select: several times faster than indexing with a tensor, on the CPU)
        out.baddbmm_(torch.bmm(x2.view(rows, tokens, -1), down.index_select(0, slots)), up.index_select(0, slots))
        if found.add is not None:
            out.add_(found.add[:, None])
        return out.view(*shape[:-1], out.shape[-1])
    h = torch.mm(x2, stack.down)
    (h if tokens == 1 else h.view(rows, tokens, -1)).mul_(found.mask if tokens == 1 else found.mask[:, None])
    if found.scale is None and weight.dtype in (torch.float32, torch.float64):
        out = torch.mm(h, stack.up) if bias is None else torch.addmm(bias, h, stack.up)
        out.addmm_(x2, weight.t())
    elif found.scale is not None and tokens == 1:
        # DoRA at decode: ``(b + delta) + c * (x W^T)``, one op fewer than scaling the base output in place
        out = torch.mm(h, stack.up) if bias is None else torch.addmm(bias, h, stack.up)
        out.addcmul_(torch.mm(x2, weight.t()), found.scale)
    else:
        out = torch.mm(x2, weight.t())
        if found.scale is not None:
            (out if tokens == 1 else out.view(rows, tokens, -1)).mul_(
                found.scale if tokens == 1 else found.scale[:, None])
        out.addmm_(h, stack.up)
        if bias is not None:
            out.add_(bias)
    if found.add is not None:
        (out if tokens == 1 else out.view(rows, tokens, -1)).add_(found.add if tokens == 1 else found.add[:, None])
    return out.view(*shape[:-1], out.shape[-1])
