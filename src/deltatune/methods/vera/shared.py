"""VeRA's shared random projections: one frozen ``(A, B)`` pair per adapter, held by every layer of it.

peft keeps the pair on its tuner model and sizes it from all of the adapter's target modules before the first
layer is made: ``A: (r, max_in)``, ``B: (max_out, r)``. deltatune's injection hands a method one layer at a
time, so the pair is built lazily instead: each new layer starts with a pair of its own, and once all of
one injection's layers are in, the method's ``attach`` hook (:func:`share`) gives them one
:class:`Projections` that has joined all their sizes; the tensors are drawn the first time they are needed (forward, merge, or listing the adapter's tensors when they are saved with it), from the
largest sizes joined, i.e. from the same sizes peft uses. Being an ``nn.Module`` held by each of those layers'
adapters, the pair moves with ``model.to(...)`` once and is deep-copied once with its model. Its buffers are
not persistent (they would appear once per layer in ``model.state_dict()``): with
``VeraConfig.save_projection`` the checkpoint code saves them once, as peft does (``base_model.vera_A`` /
``base_model.vera_B``, see :mod:`.saving`), and a loaded checkpoint's pair replaces the drawn one (:meth:`adopt`).

An adapter injected into one model in two passes (``inject_adapter_in_model`` twice with one name on
other modules) keeps the pair of its first pass when that pair is drawn already and covers the new layers;
otherwise the new layers get a pair of their own (then no single pair can be saved: see :mod:`.saving`).

Several adapters: peft's later VeRA adapters reuse the first adapter's pair; here each adapter draws its own
from its own config and targets, which is the same pair when ``r``, the seed and the largest sizes agree
(peft needs equal ``r`` anyway), and otherwise what loading that adapter alone gives in either library. A
checkpoint whose pair is larger than this adapter's targets need (peft's file of a later adapter holds the
first adapter's pair) is adopted whole: each layer uses its slice, as in peft.
"""

from __future__ import annotations


import torch
from torch import Tensor, nn

from . import functional as VF


class Projections(nn.Module):
    """The pair of one adapter: ``vera_A: (r, max_in)``, ``vera_B: (max_out, r)``, drawn on first use."""

    def __init__(self, seed: int, r: int, saved: bool = False, pending: bool = False):
        super().__init__()
        self.seed, self.r = seed, r
        # made for one new layer, to be replaced by the injection's shared pair (see :func:`share`)
        self.pending = pending
        self.saved = saved  # VeraConfig.save_projection: the pair goes into the adapter's checkpoint
        self.sizes: dict[str, tuple[int, int]] = {}  # module name -> (in, out)
        self.register_buffer("vera_A", None, persistent=False)
        self.register_buffer("vera_B", None, persistent=False)

    @property
    def drawn(self) -> bool:
        return self.vera_A is not None

    def join(self, module_name: str, in_features: int, out_features: int) -> None:
        self.sizes[module_name] = (in_features, out_features)

    def needed(self) -> tuple[int, int]:
        """``(max_in, max_out)``: the largest input and output sizes of the layers joined."""
        return max(i for i, _ in self.sizes.values()), max(o for _, o in self.sizes.values())

    def draw(self, device=None) -> None:
        """Draw the pair from the seed at :meth:`needed` sizes onto ``device`` (once; a no-op when drawn)."""
        if not self.drawn:
            A, B = VF.projections(self.seed, self.r, *self.needed())
            self.vera_A, self.vera_B = A.to(device), B.to(device)

    def check(self, A: Tensor, B: Tensor) -> None:
        """ValueError unless ``A: (r, >= max_in)`` and ``B: (>= max_out, r)`` are floating-point matrices this
        adapter's layers can slice."""
        max_in, max_out = self.needed()
        for name, t, ok, want in (("vera_A", A, A.dim() == 2 and A.shape[0] == self.r and A.shape[1] >= max_in,
                                   f"({self.r}, >= {max_in})"),
                                  ("vera_B", B, B.dim() == 2 and B.shape[1] == self.r and B.shape[0] >= max_out,
                                   f"(>= {max_out}, {self.r})")):
            if not t.is_floating_point():
                raise ValueError(f"{name} has dtype {t.dtype}; VeRA's projections are floating-point")
            if not ok:
                raise ValueError(f"{name} has shape {tuple(t.shape)} but this VeRA adapter needs {want} (r = {self.r}; "
                                 f"its largest targeted input and output sizes are {max_in} and {max_out})")

    def adopt(self, A: Tensor, B: Tensor, device=None) -> None:
        """Use ``A``, ``B`` (checked with :meth:`check`) as the pair from now on, copied onto ``device``."""
        self.check(A, B)
        self.vera_A = A.detach().to(device, copy=True)
        self.vera_B = B.detach().to(device, copy=True)

    def sliced(self, in_features: int, out_features: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(A[:, :in], B[:out, :])`` on ``like``'s device and dtype (drawing the pair first if needed)."""
        self.draw(like.device)
        A, B = self.vera_A[:, :in_features], self.vera_B[:out_features, :]
        return A.to(device=like.device, dtype=like.dtype), B.to(device=like.device, dtype=like.dtype)

    def extra_repr(self) -> str:
        shape = tuple(self.vera_A.shape) if self.drawn else "not drawn yet"
        return f"seed={self.seed}, r={self.r}, saved={self.saved}, layers={len(self.sizes)}, vera_A={shape}"


def share(fresh: list, existing: list) -> None:
    """Give the adapters ``fresh`` (one adapter's ``VeraAdapter``s in the layers one injection just made,
    each with a pending pair of its own) one :class:`Projections` sized over all of them; or ``existing[0]``
    (the pair the adapter already has in the model) when it is drawn and covers them."""
    if not fresh:
        return
    first = fresh[0].projections
    joined = Projections(first.seed, first.r, saved=first.saved)
    for ad in fresh:
        joined.sizes.update(ad.projections.sizes)
    if existing and existing[0].drawn and all(i <= existing[0].vera_A.shape[1] and o <= existing[0].vera_B.shape[0]
                                              for i, o in joined.sizes.values()):
        existing[0].sizes.update(joined.sizes)
        joined = existing[0]
    for ad in fresh:
        ad.projections = joined
