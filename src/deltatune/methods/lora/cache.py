"""Values a LoRA layer derives from its weights and keeps between calls: one :class:`LayerCache` per layer.

What is kept (per adapter, :class:`Entry`): DoRA's detached norm ``||W + s B A||`` per output channel and
the no-grad path's factors (:class:`Factors`); per layer: ``||w_i||^2`` of the base rows.

An entry is valid while the tensors it was built from are the same objects holding the same data:

- identities (a replacement allocated at a freed tensor's address cannot pass for it);
- version counters (every in-place PyTorch op bumps them: a load, a merge, a plain optimizer step);
- data addresses (new data given through ``.data``; the entry keeps the old data alive, so no other tensor
  can take its address);
- their ``requires_grad`` flags;
- and, for tensors that train, no gradient since it was built. Fused optimizer kernels
  (``AdamW(fused=True)``, transformers' default) update parameters without bumping their versions, but an
  optimizer changes a parameter only when it holds a gradient. So the entries that depend on a trainable
  tensor are dropped when autograd accumulates a gradient into it (a hook the cache registers once per
  tensor; it only ever drops this cache's entries, and does nothing once the cache is gone), and no entry
  is used or built while such a tensor holds a gradient.

Not seen: in-place writes through ``.data`` (``p.data.mul_(2)``: ``.data`` has a version counter of its
own and the address stays); call ``layer.cache.clear()`` after such an edit.

Explicit invalidation (:meth:`LayerCache.clear`) comes from the layer on merge/unmerge, adapter changes and
dtype/device conversions. Tensors made under ``torch.inference_mode`` have no version counter and traced
graphs (``torch.compile``) cannot check any: nothing is cached for them. Copies and pickles of a layer get
an empty cache.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor


_is_compiling = torch.compiler.is_compiling


@dataclass(frozen=True)
class Factors:
    """One adapter in the layout the no-grad path's small matmuls run fastest in (see ``inference.py``).

    Attributes:
        A_t: ``A^T``, ``(in, r)``, contiguous, in the compute dtype.
        B_t: ``(s * scale * B)^T``, ``(r, out)``, contiguous, in the compute dtype (``scale`` = 1 for LoRA).
        scale: DoRA's ``m / ||W + s B A||``, ``(out,)``; None for LoRA.
        shift: DoRA's ``b * (1 - scale)``, ``(out,)``; None without DoRA or bias.
        W_t: ``W^T``, a view of the base weight (no transpose op per decoded token).
    """

    A_t: Tensor
    B_t: Tensor
    scale: Optional[Tensor]
    shift: Optional[Tensor]
    W_t: Tensor


@dataclass
class Entry:
    """Cached values and the tensors they were built from.

    Attributes:
        sources: The tensors (identity checks), ``None`` where absent (no bias, no magnitude).
        stamp: Their versions, data addresses and ``requires_grad`` flags, and the adapter's scaling (a
            tensor scaling: the tensor and its version), as a list.
        keep: Their data, kept alive so that no other tensor can take one of the addresses in ``stamp``.
        norm: DoRA's detached ``||W + s B A||`` per output channel, ``(out,)``.
        factors: The no-grad path's :class:`Factors`, built for ``factors_dtype`` inputs.
        factors_dtype: The input dtype ``factors`` were cast for.
        sqnorm: ``||w_i||^2`` per base row (the layer's base entry only).
        stack: A mixed batch's :class:`~.mixed.Stack` (entries keyed by a set of adapters, not one adapter).
    """

    sources: tuple
    stamp: list
    keep: tuple
    norm: Optional[Tensor] = None
    factors: Optional[Factors] = None
    factors_dtype: Optional[torch.dtype] = None
    sqnorm: Optional[Tensor] = None
    stack: Optional[object] = None


@dataclass
class LayerCache:
    """The derived values of one LoRA layer (see the module docstring for when they are valid).

    Attributes:
        entries: Per adapter module (by identity) its :class:`Entry`; per ``("mixed", names, dtype)`` a mixed
            batch's.
        base: The base weight's entry (``sqnorm``).
    """

    entries: dict = field(default_factory=dict)
    base: Optional[Entry] = None
    _watched: dict = field(default_factory=dict)  # id(tensor) -> (weakref to it, hook handle)

    def clear(self) -> None:
        """Drop every cached value (hooks stay: they only ever clear)."""
        self.entries.clear()
        self.base = None

    def is_empty(self) -> bool:
        return not self.entries and self.base is None

    def lookup(self, owner, tensors: tuple, scaling=0.0) -> Optional[Entry]:
        """The valid entry of ``owner`` (an adapter module, or None for the base entry) for ``tensors``, a
        fresh empty one if the old one is stale, or None when nothing may be cached now."""
        # (Runs per layer per decoded token: plain loops, no generators.)
        if _is_compiling():
            return None
        stamp = []
        try:
            for t in tensors:
                if t is None:
                    stamp.append(None)
                    continue
                grad_on = t.requires_grad
                if grad_on and t.grad is not None:
                    return None  # an optimizer step may follow that leaves the versions alone
                # requires_grad too: a tensor unfrozen after an entry was built must be watched from then on
                stamp.append((t._version, t.data_ptr(), grad_on))
        except RuntimeError:  # inference tensors: no version counter
            return None
        # A tensor scaling (a model prepared for hot-swapping) is changed in place: its version says when.
        stamp.append(scaling if scaling.__class__ is not Tensor else (scaling, scaling._version))
        entry = self.base if owner is None else self.entries.get(owner)
        if entry is not None and entry.stamp == stamp:
            for a, b in zip(entry.sources, tensors):
                if a is not b:
                    break
            else:
                return entry
        if not self._watch(tensors):
            return None
        keep = tuple(t.detach() for t in tensors if t is not None)
        entry = Entry(tensors, stamp, keep)
        if owner is None:
            self.base = entry
        else:
            self.entries[owner] = entry
        return entry

    def _watch(self, tensors: tuple) -> bool:
        """Hook every trainable tensor of ``tensors`` once, so that a gradient reaching it clears the cache."""
        for t in tensors:
            if t is None or not t.requires_grad:
                continue
            seen = self._watched.get(id(t))
            if seen is not None and seen[0]() is t:
                continue
            if not t.is_leaf:  # no gradient is accumulated into it: cannot tell when it changes
                return False
            handle = t.register_post_accumulate_grad_hook(_clearer(weakref.ref(self)))
            self._watched[id(t)] = (weakref.ref(t), handle)
        return True

    def release(self) -> None:
        """Clear and remove the hooks from the tensors (for a caller that keeps the tensors but drops the
        layer and wants no hook left on them)."""
        self.clear()
        for _, handle in self._watched.values():
            handle.remove()
        self._watched.clear()

    # Copies and pickles start empty: a deep copy would turn cached views of the base weight into full
    # copies of it, and hooks belong to the original's tensors.
    def __deepcopy__(self, memo) -> "LayerCache":
        return LayerCache()

    def __reduce__(self):
        return (LayerCache, ())


def _clearer(cache_ref):
    def clear(tensor) -> None:
        cache = cache_ref()
        if cache is None:
            return
        cache.entries.clear()
        # The base entry (||w_i||^2) only if the base weight itself trains: it would be rebuilt every step.
        if cache.base is not None and any(t is tensor for t in cache.base.sources):
            cache.base = None
    return clear
