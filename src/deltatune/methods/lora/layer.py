"""LoRA adapter layers: each wraps a frozen ``base_layer`` and adds ``s * B A x`` per active adapter.

One layer holds any number of named adapters in ``self.adapters`` (an ``nn.ModuleDict`` of
:class:`LoraAdapter`). Which of them run is decided by :meth:`LoraLayer.set_active`,
:meth:`LoraLayer.set_disabled` and merging; the list of adapters to run is recomputed only when one of
those changes, so ``forward`` does no bookkeeping. What an adapter computes is its variant's business
(:mod:`.variants`: LoRA, DoRA); values derived from the weights live in the layer's
:class:`~.cache.LayerCache`. The layer types (:mod:`.linear`, :mod:`.conv`, :mod:`.embedding`) supply
shapes, initialisation, the delta and the delta weight.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ... import adapter_state
from ...adapter_layer import read_weight, write_weight
from . import functional as LF
from . import mixed, views
from .cache import LayerCache
from .variants import LoraVariant, variant_for

_HALF = (torch.float16, torch.bfloat16)


class LoraAdapter(nn.Module):
    """One adapter's state in one layer: ``lora_A``, ``lora_B``, its scaling, dropout and variant.

    Attributes:
        lora_A: ``(r, in, *kernel)`` (embeddings: ``(r, num_embeddings)``).
        lora_B: ``(out, r, *ones)`` (embeddings: ``(dim, r)``).
        lora_magnitude_vector: DoRA's ``m``, one per output channel (None for plain LoRA).
        lora_B_bias: ``b_B`` of ``lora_bias=True``, one per output channel (None otherwise).
        r: The rank of ``lora_A`` / ``lora_B`` as stored (after :meth:`pad_rank`, the padded rank).
        scaling: ``s``, a Python float; a 0-d float tensor once :meth:`use_tensor_scaling` was called (a
            model prepared for compiled hot-swapping), so that a new value reaches a compiled graph
            without recompiling it (a float is a constant the graph is specialised on).
        variant: The :class:`~.variants.LoraVariant` that states what the adapter computes.
        use_rslora: Whether ``s`` is ``alpha / sqrt(r)`` (rsLoRA) rather than ``alpha / r``: how the
            ``lora_alpha[name]`` view turns ``s`` back into alpha.
        merge_norm: DoRA's norm at merge time, while merged (undoing the merge needs exactly that one).
        wrote_residual: Whether a PiSSA/OLoRA initialisation wrote ``W - s B A`` into the base weight.
    """

    def __init__(self, a_shape: Sequence[int], b_shape: Sequence[int], scaling: float, dropout: float,
                 variant: LoraVariant, device=None, dtype=None):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(a_shape, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(b_shape, device=device, dtype=dtype))
        self.r = a_shape[0]
        self.scaling = float(scaling)
        self.dropout = float(dropout)
        self.variant = variant
        self.use_rslora = False
        self.register_parameter("lora_magnitude_vector", None)
        self.register_parameter("lora_B_bias", None)  # (lora_bias=True: see variants.BiasedLoraVariant)
        self.merge_norm: Optional[Tensor] = None
        self.wrote_residual = False

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, dropout={self.dropout:g}, {self.variant.name}"

    # ------------------------------------------------------------------ hot-swapping (see .hotswap)
    def use_tensor_scaling(self) -> None:
        """Hold the scaling as a 0-d tensor on ``lora_A``'s device from now on (float64 adapters: float64,
        else float32; a 0-d operand never changes the result dtype). It is a plain attribute, not a buffer:
        it stays out of state dicts and ``model.half()`` does not round it (see :meth:`_apply`)."""
        if not isinstance(self.scaling, Tensor):
            dtype = torch.float64 if self.lora_A.dtype == torch.float64 else torch.float32
            self.scaling = torch.tensor(self.scaling, dtype=dtype, device=self.lora_A.device)

    def set_scaling(self, value: float) -> None:
        """Set ``s``; a tensor scaling is written in place, so a compiled graph reading it sees the new value."""
        if isinstance(self.scaling, Tensor):
            with torch.no_grad():
                self.scaling.fill_(value)
        else:
            self.scaling = float(value)

    def pad_rank(self, r: int) -> None:
        """Grow the rank to ``r`` with zero rows of ``A`` and zero columns of ``B`` (``B A`` is unchanged).
        The tensors are new parameters (same ``requires_grad``): an optimizer holding the old ones must be
        made again."""
        if r < self.r:
            raise ValueError(f"cannot pad an adapter of rank {self.r} to the smaller rank {r}")
        if r == self.r:
            return
        for role, dim in (("lora_A", 0), ("lora_B", 1)):
            old = self._parameters[role]
            shape = list(old.shape)
            shape[dim] = r
            new = old.new_zeros(shape)
            new.narrow(dim, 0, self.r).copy_(old.detach())
            self._parameters[role] = nn.Parameter(new, requires_grad=old.requires_grad)
        self.r = r

    def write_factors(self, A: Optional[Tensor], B: Optional[Tensor]) -> None:
        """Overwrite ``A`` and ``B`` in place with factors of rank ``A.shape[0] <= r``, zero-padded; None for
        both: a zero update. Shapes are the caller's to check (:mod:`.hotswap` checks them all
        before it writes anything)."""
        with torch.no_grad():
            self.lora_A.zero_()
            self.lora_B.zero_()
            if A is not None:
                self.lora_A.narrow(0, 0, A.shape[0]).copy_(A)
                self.lora_B.narrow(1, 0, B.shape[1]).copy_(B)

    def _apply(self, fn, recurse=True):
        # A tensor scaling follows the adapter to its device but keeps its dtype: it is not a parameter or
        # buffer, so nn.Module would leave it where it was (and a buffer would be rounded by .half()).
        super()._apply(fn, recurse)
        if isinstance(self.scaling, Tensor) and self.scaling.device != self.lora_A.device:
            self.scaling = self.scaling.to(self.lora_A.device)
        return self


def adapter_dtype(weight: Tensor, autocast_adapter_dtype: bool = True) -> torch.dtype:
    """Adapters on half-precision (or quantized, non-float) bases are kept in float32."""
    if not weight.is_floating_point():
        return torch.float32
    if autocast_adapter_dtype and weight.dtype in _HALF:
        return torch.float32
    return weight.dtype


@views.install
@adapter_state.peft_surface
class LoraLayer(nn.Module):
    """Base class of the LoRA wrappers (Linear/Conv1D, Embedding, ConvNd).

    Subclasses define the adapter shapes, their initialisation, the delta ``s B A x`` (:meth:`_delta`) and
    the delta weight; bookkeeping, merging and the general forward live here, once.
    """

    #: Which of the key-suffix tables LoRA registers (CHECKPOINT_KEYS in methods/lora/__init__.py) names this
    #: layer's tensors in a checkpoint.
    checkpoint_kind = "lora"
    #: Output channel dimension (of the forward output, and of the base weight) for DoRA.
    _channel_dim = -1
    _weight_out_dim = 0

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        adapter_state.init(self, base_layer)
        self.cache = LayerCache()
        self.rows = None  # a mixed batch's RowPlan, for the duration of that call (see route_rows)

    weight = property(adapter_state.base_weight)
    # (code reading a wrapped layer's bias, nn.MultiheadAttention reading its out_proj's, sees the base's)
    bias = property(lambda self: getattr(self.base_layer, "bias", None))
    set_disabled = adapter_state.set_disabled
    _refresh = adapter_state.refresh

    def set_active(self, names: Sequence[str]) -> None:
        self.cache.clear()
        adapter_state.set_active(self, names)

    def delete_adapter(self, name: str) -> None:
        self.cache.clear()
        adapter_state.delete_adapter(self, name)

    def _apply(self, fn, *args, **kwargs):
        # A dtype or device conversion gives the tensors new data: values derived from the old (DoRA's norm,
        # the no-grad factors, a view of the base weight) are dropped rather than kept alive.
        self.cache.clear()
        return super()._apply(fn, *args, **kwargs)

    # ------------------------------------------------------------------ subclass interface
    def _shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def _init_adapter(self, adapter: LoraAdapter, mode) -> None:
        """Linear/conv init: A Kaiming-uniform (as nn.Linear) or N(0, 1/r); B zero unless ``mode`` is False."""
        with torch.no_grad():
            if mode == "gaussian":
                nn.init.normal_(adapter.lora_A, std=1.0 / adapter.r)
            else:
                nn.init.kaiming_uniform_(adapter.lora_A, a=math.sqrt(5))
            if mode is False:
                nn.init.kaiming_uniform_(adapter.lora_B, a=math.sqrt(5))
            else:
                nn.init.zeros_(adapter.lora_B)

    def delta_weight(self, name: str) -> Tensor:
        """The adapter's update ``s B A`` in the base weight's layout (float32 or wider)."""
        raise NotImplementedError

    def _delta(self, x: Tensor, ad: LoraAdapter) -> Tensor:
        """``s B A drop(x)`` of one adapter, in the adapter's dtype (or autocast's)."""
        raise NotImplementedError

    def _check_options(self, use_dora: bool, lora_bias: bool) -> None:
        """A TypeError for an adapter option this layer cannot run (default: all run)."""

    def _mixed_layout(self, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        """Concatenated ``A`` (``(sum r, in, *kernel)``) and ``B`` (``(out, sum r, *ones)``) in the layout
        :meth:`_down` and :meth:`_up` take (default: as they are)."""
        return A, B

    def _down(self, x: Tensor, A: Tensor) -> Tensor:
        """The rank channels ``A x`` (channels at ``_channel_dim``), for :mod:`.mixed`."""
        raise NotImplementedError

    def _up(self, h: Tensor, B: Tensor) -> Tensor:
        """``B h`` back to the output's channels, for :mod:`.mixed`."""
        raise NotImplementedError

    def _init_from_base(self, adapter: LoraAdapter, mode: str) -> None:
        raise TypeError(f"init_lora_weights={mode!r} is available for Linear and Conv1D layers only, "
                        f"not {type(self.base_layer).__name__}")

    # ------------------------------------------------------------------ forward
    def _apply_run(self, x: Tensor, out: Tensor, run) -> Tensor:
        """``out`` (the base output) with each adapter of ``run`` applied in order, by its variant."""
        for ad in run:
            out = ad.variant.apply(self, ad, out, self._delta(x, ad))
        return out

    def route_rows(self, plan) -> None:
        """Run each row of the following calls through the adapter ``plan`` names for it (a
        :class:`~deltatune.row_routing.RowPlan`; None: back to the active adapters). See :mod:`.mixed`."""
        self.__dict__["rows"] = plan  # (set twice per call on every layer: skip nn.Module.__setattr__)

    def _forward_rows(self, x: Tensor, out: Tensor) -> Tensor:
        return mixed.forward(self, x, out, self.rows)

    # ------------------------------------------------------------------ adapter bookkeeping
    def add_adapter(self, name: str, r: int, scaling: float, dropout: float = 0.0, init=True,
                    autocast_adapter_dtype: bool = True, use_dora: bool = False, device=None,
                    lora_bias: bool = False) -> None:
        """Create adapter ``name`` on the base weight's device (and dtype; float32 for half bases).

        ``device="meta"`` creates it empty, to be loaded by assignment (``low_cpu_mem_usage``); a
        PiSSA/OLoRA adapter is still made on the base's device, since it must rewrite the base weight.
        """
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        weight = self.base_layer.weight
        from_base = isinstance(init, str) and init.startswith(("pissa", "olora"))
        holder = next((n for n, ad in self.adapters.items() if ad.wrote_residual), None)
        if from_base and holder is not None:
            raise ValueError(f"init_lora_weights={init!r}: the base weight already holds the residual of adapter "
                             f"{holder!r} (a PiSSA/OLoRA initialisation); a second residual would change "
                             f"{holder!r}'s outputs. Add this adapter to a fresh base model")
        if device is None or from_base:
            device = weight.device
        a_shape, b_shape = self._shapes(r)
        variant = variant_for(use_dora, lora_bias)
        self._check_options(use_dora, lora_bias)
        adapter = LoraAdapter(a_shape, b_shape, scaling, dropout, variant, device=device,
                              dtype=adapter_dtype(weight, autocast_adapter_dtype))
        if adapter.lora_A.is_meta:  # no values to compute from: everything is loaded like A and B
            variant.empty(self, adapter)
        else:
            if from_base:
                self._init_from_base(adapter, init)
            else:
                self._init_adapter(adapter, init)
            variant.init(self, adapter)
        self.adapters[name] = adapter

    def undo_adapter(self, name: str) -> None:
        """Remove an adapter that was *just* created (a failed injection): unlike delete_adapter, also
        gives the base back what a PiSSA/OLoRA initialisation took from it."""
        if self.adapters[name].wrote_residual:
            with torch.no_grad():
                self._write_weight(LF.add_delta(self._read_weight(), self.delta_weight(name)))
        self.delete_adapter(name)

    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        """The tensors that make up adapter ``name`` in this layer, by role (``lora_A``, ``lora_B``, ...)."""
        ad = self.adapters[name]
        return ad.variant.params(ad)

    # ------------------------------------------------------------------ merging
    def merge(self, names: Optional[Sequence[str]] = None, safe: bool = False) -> None:
        """Add the adapters' deltas into the base weight (default: the active adapters), each as its
        variant merges it. Computed in float32 and cast once; with ``safe=True`` a non-finite result
        raises before anything of that adapter is written."""
        self.cache.clear()
        adapter_state.merge_adapters(self, names, safe, self._merged_weight, self._merged_bias)

    def unmerge(self) -> None:
        """Undo every merged adapter, last merged first."""
        self.cache.clear()
        adapter_state.unmerge_adapters(self, self._unmerged_weight, self._unmerged_bias)

    def _merged_weight(self, name: str, weight: Tensor) -> Tensor:
        return self.adapters[name].variant.merged_weight(self, name, weight)

    def _unmerged_weight(self, name: str, weight: Tensor) -> Tensor:
        return self.adapters[name].variant.unmerged_weight(self, name, weight)

    def _merged_bias(self, name: str, bias: Tensor) -> Tensor:
        return self.adapters[name].variant.merged_bias(self, name, bias)

    def _unmerged_bias(self, name: str, bias: Tensor) -> Tensor:
        return self.adapters[name].variant.unmerged_bias(self, name, bias)

    def _read_weight(self) -> Tensor:
        """The base weight in its stored layout; dequantized (float32) for 4/8-bit bases."""
        return read_weight(self.base_layer)

    def _write_weight(self, new: Tensor) -> None:
        """Set the base weight to ``new``; quantized bases are quantized again (with a warning)."""
        write_weight(self.base_layer, new)

    def _magnitude_shape(self) -> tuple[int, ...]:
        """Shape of the DoRA magnitude as peft stores it: ``(out,)``; convolutions override."""
        return (-1,)

    def _dora_views(self, ad: LoraAdapter) -> tuple[Tensor, Tensor, Tensor]:
        """``(W rows (out, k), A (r, k), B (out, r))`` for the DoRA norm (default: 2-D A and B)."""
        weight = self._read_weight()
        rows = weight.t() if self._weight_out_dim == 1 else weight.reshape(weight.shape[0], -1)
        return rows, ad.lora_A.reshape(ad.r, -1), ad.lora_B.reshape(-1, ad.r)

    def _cast_input(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        # Under autocast the matmuls pick their own dtype; otherwise match the adapter's.
        if x.dtype == dtype or torch.is_autocast_enabled(x.device.type):
            return x
        return x.to(dtype)


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but keep the layer usable without it
        return ()
    return Conv1D


def is_linear(module: nn.Module) -> bool:
    """Linear layers for ``"all-linear"``: ``nn.Linear`` and transformers' ``Conv1D``."""
    return isinstance(module, (nn.Linear, _conv1d_type())) and not isinstance(module, LoraLayer)
