"""LoKr layers: a frozen ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` plus Kronecker-product updates.

With ``out = a * b`` and ``in = c * d`` (per group) from :func:`.functional.factorization`, each adapter
stores, as peft lays them out:

- ``W1``: ``lokr_w1 (a, c)``, or ``lokr_w1_a (a, r)`` and ``lokr_w1_b (r, c)`` (``decompose_both`` and
  ``r < max(a, c) / 2``);
- ``W2``: ``lokr_w2 (b, d, *kernel)`` unless ``r < max(b, d) / 2``; then ``lokr_w2_a (b, r)`` and
  ``lokr_w2_b (r, d * prod(kernel))``, or with ``use_effective_conv2d`` on a kernel larger than 1,
  ``lokr_t2 (r, r, kh, kw)`` (Conv1d: ``(r, r, k, 1)``), ``lokr_w2_a (r, b)`` and ``lokr_w2_b (r, d)``.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from ..lycoris_common import LycorisAdapter, LycorisLayer
from . import functional as KF

ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


class LoKrLayer(LycorisLayer):
    """``y = base(x) + op(x, s * W1 ⊗ W2)`` per active adapter (see :mod:`.functional`)."""

    checkpoint_kind = "lokr"
    method = "LoKr"

    def _shapes(self, r: int, use_effective_conv2d: bool, decompose_both: bool,
                decompose_factor: int) -> dict[str, tuple[int, ...]]:
        """The factor shapes (see the module docstring), in peft's initialisation order."""
        out, in_per_group = self.base_layer.weight.shape[:2]
        kernel = self._kernel()
        (a, b), (c, d) = KF.factorization(out, decompose_factor), KF.factorization(in_per_group, decompose_factor)
        full1, full2 = KF.use_full_factors(r, ((a, b), (c, d)), decompose_both)
        shapes = {"lokr_w1": (a, c)} if full1 else {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)}
        if full2:
            shapes["lokr_w2"] = (b, d, *kernel)
        elif use_effective_conv2d and kernel and math.prod(kernel) != 1:
            shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (r, b), (r, d)
            shapes["lokr_t2"] = (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)
        else:
            shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (b, r), (r, d * math.prod(kernel))
        return shapes

    def add_adapter(self, name: str, r: int, alpha: float, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                    init=True, use_effective_conv2d: bool = False, decompose_both: bool = False,
                    decompose_factor: int = -1, rank_dropout_scale: bool = False,
                    autocast_adapter_dtype: bool = True, device=None) -> None:
        """Create adapter ``name`` (``device="meta"``: empty factors, to be loaded).

        Args:
            r, alpha: Rank and alpha (``s = alpha / r``).
            rank_dropout, module_dropout: Training-time dropout.
            init: ``True``: ``W1`` (or ``W1a``) zero; ``"lycoris"``: ``W2`` (or ``W2b``) zero; ``False``:
                nothing zero. The other factors are Kaiming-uniform.
            use_effective_conv2d, decompose_both, decompose_factor: See :class:`~.config.LoKrConfig`.
            rank_dropout_scale: Rescale the rows kept by rank dropout.
        """
        shapes = self._shapes(r, use_effective_conv2d, decompose_both, decompose_factor)
        adapter = self._new_adapter(name, shapes, r, alpha, rank_dropout, module_dropout, rank_dropout_scale,
                                    autocast_adapter_dtype, device)
        if init == "lycoris":
            zero = ("lokr_w2", "lokr_w2_b")
        else:
            zero = ("lokr_w1", "lokr_w1_a") if init else ()
        adapter.init_params(zero=zero)
        self.adapters[name] = adapter

    def _factor_delta(self, ad: LycorisAdapter) -> Tensor:
        roles = ad.roles
        w1 = ad.lokr_w1 if "lokr_w1" in roles else ad.lokr_w1_a @ ad.lokr_w1_b
        if "lokr_w2" in roles:
            w2 = ad.lokr_w2
        elif "lokr_t2" in roles:
            w2 = KF.rebuild_kernel(ad.lokr_t2, ad.lokr_w2_a, ad.lokr_w2_b)
        else:
            w2 = ad.lokr_w2_a @ ad.lokr_w2_b
        return KF.kron_delta(w1, w2, ad.scaling)


def wrap_module(module: nn.Module) -> LoKrLayer:
    """A fresh LoKr layer (no adapters) around ``module``; TypeError for unsupported modules."""
    return LoKrLayer(module)
