"""Pure tensor math of trainable tokens: a few rows of a weight replaced by trainable ones.

With ``W: (V, D)`` the stored weight (an embedding's ``(num_embeddings, dim)``, or a linear output head's
``(out, in)``), ``idx: (k,)`` the listed token ids and ``R: (k, D)`` their trainable rows,
``W' = W`` with ``W'[idx[j]] = R[j]``. Neither the embedding lookup nor the head ever builds ``W'``
(``V x D``, large for real vocabularies): they compute the base output and overwrite the listed tokens'
part of it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def replace_rows(W: Tensor, index: Tensor, rows: Tensor) -> Tensor:
    """``W'``: a copy of ``W: (V, D)`` whose rows ``index: (k,)`` are ``rows: (k, D)`` (cast to ``W``'s dtype)."""
    return W.index_copy(0, index.to(W.device), rows.to(device=W.device, dtype=W.dtype))


def slot_table(token_indices: Sequence[int], size: int, device=None) -> Tensor:
    """``(size,)`` long tensor: ``t[idx[j]] = j`` for the listed ids, ``-1`` for every other id."""
    table = torch.full((size,), -1, dtype=torch.long, device=device)
    table[torch.as_tensor(list(token_indices), dtype=torch.long, device=device)] = torch.arange(
        len(token_indices), dtype=torch.long, device=device)
    return table


def renorm_rows(rows: Tensor, max_norm: float, norm_type: float) -> Tensor:
    """``rows`` with each row's ``norm_type``-norm capped at ``max_norm``, as ``nn.Embedding(max_norm=...)``
    caps looked-up rows (``r * max_norm / (|r| + 1e-7)`` where ``|r| > max_norm``), without changing the
    stored rows in place."""
    norms = rows.detach().norm(p=norm_type, dim=-1, keepdim=True)
    scale = torch.where(norms > max_norm, max_norm / (norms + 1e-7), torch.ones_like(norms))
    return rows * scale


def embed_with_rows(out: Tensor, x: Tensor, slots: Tensor, rows: Tensor, padding_slot: Optional[int] = None,
                    scale: Optional[Tensor] = None) -> Tensor:
    """An embedding's output with the listed tokens' vectors taken from ``rows``.

    Args:
        out: The base embedding's output, ``(..., D)`` for ids ``x: (...)``.
        x: Token ids.
        slots: :func:`slot_table` of the listed ids, ``(V,)``.
        rows: ``R: (k, D)``.
        padding_slot: The slot of the embedding's ``padding_idx`` if it is listed: its row gets no
            gradient, as the base embedding's padding row gets none.
        scale: A scalar the base embedding multiplies its output by (e.g. Gemma's ``embed_scale``).

    Returns:
        ``(..., D)``: ``out[p] = R[slot(x[p])] * scale`` where ``x[p]`` is listed, else ``out[p]``.
    """
    slot = slots[x]
    hit = slot >= 0
    picked = F.embedding(slot.clamp(min=0), rows, padding_idx=padding_slot)
    if scale is not None:
        picked = picked * scale.to(picked.dtype)
    return torch.where(hit.unsqueeze(-1), picked.to(out.dtype), out)


def head_with_rows(out: Tensor, x: Tensor, index: Tensor, rows: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """A linear head's output ``x W^T + b`` with the listed tokens' logits computed from ``rows``.

    Args:
        out: The base head's output, ``(..., V)`` for ``x: (..., D)``.
        index: ``idx: (k,)``.
        rows: ``R: (k, D)``.
        bias: The head's bias ``(V,)``, if any.

    Returns:
        ``(..., V)``: ``out[..., idx[j]] = x R[j]^T + b[idx[j]]``, every other logit as in ``out``.
    """
    cols = F.linear(x, rows.to(x.dtype), None if bias is None else bias[index].to(x.dtype))
    return out.index_copy(out.dim() - 1, index, cols.to(out.dtype))
