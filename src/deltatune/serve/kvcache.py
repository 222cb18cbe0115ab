"""Per-sequence key/value caches for iteration-level batching.

Each running sequence keeps its own cache (per layer a ``(1, heads, length, dim)`` key and value). A
decode step stacks the running sequences' caches, left-padded with zeros to the longest (the attention
mask hides the padding), runs the new tokens, and appends each row's new key/value to its own cache. So
sequences can join and leave between steps without touching the others' caches.
"""

from __future__ import annotations

from typing import Optional

import torch

#: Per layer (key, value), each ``(1, heads, length, dim)``.
LayerCache = list[tuple[torch.Tensor, torch.Tensor]]


def plain_layers(past) -> Optional[list]:
    """The layers of a model's returned cache if every layer is a plain growing one, else None (sliding
    windows and other layouts cannot be stacked and split this way)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = getattr(past, "layers", None)
    if not isinstance(past, DynamicCache) or not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    return layers


def stack(caches: list[LayerCache]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """Left-pad ``caches`` (one per row) to the longest; returns per-layer keys, values and each row's length."""
    lengths = [c[0][0].shape[-2] for c in caches]
    longest = max(lengths)
    keys, values = [], []
    for layer in range(len(caches[0])):
        for out, part in ((keys, 0), (values, 1)):
            rows = []
            for cache, length in zip(caches, lengths):
                t = cache[layer][part]
                if length < longest:
                    t = torch.cat([t.new_zeros(*t.shape[:-2], longest - length, t.shape[-1]), t], dim=-2)
                rows.append(t)
            out.append(torch.cat(rows))
    return keys, values, lengths


def as_model_cache(keys: list[torch.Tensor], values: list[torch.Tensor]):
    """A transformers cache holding these per-layer keys and values."""
    from transformers.cache_utils import DynamicCache

    return DynamicCache(ddp_cache_data=list(zip(keys, values)))


def row_caches(keys: list[torch.Tensor], values: list[torch.Tensor], lengths: list[int]) -> list[LayerCache]:
    """Split batched per-layer keys/values (left-padded) into one cache per row of ``lengths`` positions."""
    return [[(k[i:i + 1, :, k.shape[-2] - n:], v[i:i + 1, :, v.shape[-2] - n:]) for k, v in zip(keys, values)]
            for i, n in enumerate(lengths)]


def append(cache: LayerCache, keys: list[torch.Tensor], values: list[torch.Tensor], row: int) -> LayerCache:
    """``cache`` with row ``row`` of the new positions ``keys``/``values`` appended."""
    return [(torch.cat([k, nk[row:row + 1]], dim=-2), torch.cat([v, nv[row:row + 1]], dim=-2))
            for (k, v), nk, nv in zip(cache, keys, values)]
