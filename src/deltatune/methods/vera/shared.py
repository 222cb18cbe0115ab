"""VeRA's shared random projections: one frozen ``(A, B)`` pair per adapter, held by every layer of it.

peft keeps the pair on its tuner model and sizes it from all of the adapter's target modules before the first
layer is made: ``A: (r, max_in)``, ``B: (max_out, r)``. deltatune's injection hands a method one layer at a
time and no model, so the pair is built lazily instead: the layers that receive one adapter in one
injection *join* a :class:`Projections` object (recording their sizes), and the tensors are drawn the first
time any of them computes (forward, merge), from the largest sizes joined, i.e. from the same sizes peft
uses. Being an ``nn.Module`` held by each of those layers' adapters, the pair moves with ``model.to(...)``
once and is deep-copied once with its model; its buffers are not persistent (they are not adapter
weights and never enter a checkpoint; see ``VeraConfig.save_projection``).

Which calls form one injection: consecutive calls for the same config object and adapter name, until a
module name repeats (the same config injected into a second model) or the pair has been drawn. (Limit: one
config object injected into two models with disjoint module names, with no forward in between, would size
one pair over both.)

Several adapters: peft's later VeRA adapters reuse the first adapter's pair; here each adapter draws its own
from its own config and targets, which is the same pair when ``r``, the seed and the largest sizes agree
(peft needs equal ``r`` anyway), and otherwise what loading that adapter alone gives in either library.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor, nn

from . import functional as VF


class Projections(nn.Module):
    """The pair of one adapter: ``vera_A: (r, max_in)``, ``vera_B: (max_out, r)``, drawn on first use."""

    def __init__(self, seed: int, r: int):
        super().__init__()
        self.seed, self.r = seed, r
        self.sizes: dict[str, tuple[int, int]] = {}  # module name -> (in, out)
        self.register_buffer("vera_A", None, persistent=False)
        self.register_buffer("vera_B", None, persistent=False)

    @property
    def drawn(self) -> bool:
        return self.vera_A is not None

    def join(self, module_name: str, in_features: int, out_features: int) -> None:
        self.sizes[module_name] = (in_features, out_features)

    def sliced(self, in_features: int, out_features: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(A[:, :in], B[:out, :])`` on ``like``'s device and dtype (drawing the pair first if needed)."""
        if not self.drawn:
            max_in = max(i for i, _ in self.sizes.values())
            max_out = max(o for _, o in self.sizes.values())
            A, B = VF.projections(self.seed, self.r, max_in, max_out)
            self.vera_A, self.vera_B = A.to(like.device), B.to(like.device)
        A, B = self.vera_A[:, :in_features], self.vera_B[:out_features, :]
        return A.to(dtype=like.dtype), B.to(dtype=like.dtype)

    def extra_repr(self) -> str:
        shape = tuple(self.vera_A.shape) if self.drawn else "not drawn yet"
        return f"seed={self.seed}, r={self.r}, layers={len(self.sizes)}, vera_A={shape}"


#: The projections being filled by the current injection, weakly held (a model that is deleted takes its
#: projections with it): ``(config, adapter name, Projections)``.
_current: Optional[tuple[weakref.ref, str, weakref.ref]] = None


def projections_for(config, adapter_name: str, module_name: str) -> Projections:
    """The :class:`Projections` a layer of ``adapter_name`` in module ``module_name`` joins (see the module
    docstring for which calls share one)."""
    global _current
    if _current is not None:
        cfg, name, ref = _current[0](), _current[1], _current[2]()
        if cfg is config and name == adapter_name and ref is not None and not ref.drawn \
                and module_name not in ref.sizes:
            return ref
    proj = Projections(config.projection_prng_key, config.r)
    _current = (weakref.ref(config), adapter_name, weakref.ref(proj))
    return proj
