"""LoHa layers: a frozen ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` plus Hadamard-product updates.

Factor shapes, as peft lays them out (so checkpoints load in both libraries):

============================  ==================  ==================  ====================
base (weight shape)           ``hada_w{1,2}_a``   ``hada_w{1,2}_b``   ``hada_t{1,2}``
============================  ==================  ==================  ====================
Linear ``(out, in)``          ``(out, r)``        ``(r, in)``         -
Conv ``(out, in, *k)``        ``(out, r)``        ``(r, in * prod k)`` -
Conv, effective, ``k != 1``   ``(r, out)``        ``(r, in)``         ``(r, r, kh, kw)``
============================  ==================  ==================  ====================

(``in`` is per group; a Conv1d kernel is stored as ``(k, 1)``.)
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from ..lycoris_common import LycorisAdapter, LycorisLayer
from . import functional as HF

ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


class LoHaLayer(LycorisLayer):
    """``y = base(x) + op(x, s * (W1a W1b) ⊙ (W2a W2b))`` per active adapter (see :mod:`.functional`)."""

    checkpoint_kind = "loha"
    method = "LoHa"

    def _shapes(self, r: int, use_effective_conv2d: bool) -> dict[str, tuple[int, ...]]:
        """The factor shapes for rank ``r`` (the table in the module docstring), in peft's init order."""
        out, in_per_group = self.base_layer.weight.shape[:2]
        kernel = self._kernel()
        if use_effective_conv2d and kernel and math.prod(kernel) != 1:
            core = (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)
            return {"hada_w1_a": (r, out), "hada_w1_b": (r, in_per_group), "hada_w2_a": (r, out),
                    "hada_w2_b": (r, in_per_group), "hada_t1": core, "hada_t2": core}
        flat = in_per_group * math.prod(kernel)
        return {"hada_w1_a": (out, r), "hada_w1_b": (r, flat), "hada_w2_a": (out, r), "hada_w2_b": (r, flat)}

    def add_adapter(self, name: str, r: int, alpha: float, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                    init=True, use_effective_conv2d: bool = False, autocast_adapter_dtype: bool = True,
                    device=None) -> None:
        """Create adapter ``name`` (``device="meta"``: empty factors, to be loaded).

        Args:
            r, alpha: Rank and alpha (``s = alpha / r``).
            rank_dropout, module_dropout: Training-time dropout (rank dropout rescales the kept rows).
            init: ``True``: ``W2b = 0`` (the update starts at zero), the rest Kaiming-uniform; ``False``:
                all Kaiming-uniform.
            use_effective_conv2d: Factor a convolution kernel larger than 1 through ``hada_t1/t2``.
        """
        shapes = self._shapes(r, use_effective_conv2d)
        adapter = self._new_adapter(name, shapes, r, alpha, rank_dropout, module_dropout, True,
                                    autocast_adapter_dtype, device)
        adapter.init_params(zero=("hada_w2_b",) if init else ())
        self.adapters[name] = adapter

    def _factor_delta(self, ad: LycorisAdapter) -> Tensor:
        if "hada_t1" in ad.roles:
            return HF.hadamard_delta_cp(ad.hada_t1, ad.hada_w1_a, ad.hada_w1_b, ad.hada_t2, ad.hada_w2_a,
                                        ad.hada_w2_b, ad.scaling)
        return HF.hadamard_delta(ad.hada_w1_a, ad.hada_w1_b, ad.hada_w2_a, ad.hada_w2_b, ad.scaling)


def wrap_module(module: nn.Module) -> LoHaLayer:
    """A fresh LoHa layer (no adapters) around ``module``; TypeError for unsupported modules."""
    return LoHaLayer(module)
