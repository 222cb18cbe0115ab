"""LoRA adapter layers: each wraps a frozen ``base_layer`` and adds ``s * B A x`` per active adapter.

One layer holds any number of named adapters in ``self.adapters`` (an ``nn.ModuleDict`` of
:class:`LoraAdapter`). Which of them run is decided by :meth:`LoraLayer.set_active`,
:meth:`LoraLayer.set_disabled` and merging; the list of adapters to run is recomputed only when one of
those changes, so ``forward`` does no bookkeeping.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module

from ... import adapter_state
from . import functional as LF
from ...quant.bnb import dequantize_weight, is_quantized, replace_weight, warn_requantize
from . import inference
from .dora import DoraState, add_dora, row_scale

_HALF = (torch.float16, torch.bfloat16)
# One cheap call when no autocast is on anywhere (the usual case); the per-device check costs 5x more.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


class LoraAdapter(nn.Module):
    """One adapter's state in one layer: ``lora_A``, ``lora_B``, its scaling and dropout.

    Attributes:
        lora_A: ``(r, in, *kernel)`` (embeddings: ``(r, num_embeddings)``).
        lora_B: ``(out, r, *ones)`` (embeddings: ``(dim, r)``).
    """

    def __init__(self, a_shape: Sequence[int], b_shape: Sequence[int], scaling: float, dropout: float,
                 device=None, dtype=None):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(a_shape, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(b_shape, device=device, dtype=dtype))
        self.r = a_shape[0]
        self.scaling = float(scaling)
        self.dropout = float(dropout)
        self.register_parameter("lora_magnitude_vector", None)  # DoRA only: (out,)
        self._norm_cache: Optional[tuple] = None  # (W, A, B, key, ||W + s B A|| per row, A/B data), see dora.py
        self._inference: Optional[tuple] = None  # the no-grad path's factors, see inference.py

    def _apply(self, fn, *args, **kwargs):
        # A dtype or device conversion gives the parameters new data: values derived from the old (DoRA's
        # norm, the no-grad factors, a view of the base weight) are dropped rather than kept alive.
        self._norm_cache = self._inference = None
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        # Copies and pickles leave the caches out: a deep copy would turn the cached view of the base
        # weight into a full copy of it, kept until the copy's next forward rebuilt the cache anyway.
        state = super().__getstate__()  # (a copy of __dict__)
        state["_norm_cache"] = state["_inference"] = None
        return state

    def extra_repr(self) -> str:
        dora = ", dora" if self.lora_magnitude_vector is not None else ""
        return f"r={self.r}, scaling={self.scaling:g}, dropout={self.dropout:g}{dora}"


def adapter_dtype(weight: Tensor, autocast_adapter_dtype: bool = True) -> torch.dtype:
    """Adapters on half-precision (or quantized, non-float) bases are kept in float32."""
    if not weight.is_floating_point():
        return torch.float32
    if autocast_adapter_dtype and weight.dtype in _HALF:
        return torch.float32
    return weight.dtype


class LoraLayer(nn.Module):
    """Base class of the LoRA wrappers (Linear/Conv1D, Embedding, ConvNd).

    Subclasses define the adapter shapes, its initialisation, the forward delta and the delta weight;
    everything about adapter bookkeeping and merging lives here, once.
    """

    #: Tells checkpoint.py which HF key names this layer's adapter tensors use.
    checkpoint_kind = "lora"
    #: Output channel dimension (of the forward output, and of the base weight) for DoRA.
    _channel_dim = -1
    _weight_out_dim = 0

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        adapter_state.init(self, base_layer)
        self._dora = DoraState()

    weight = property(adapter_state.base_weight)
    set_active = adapter_state.set_active
    set_disabled = adapter_state.set_disabled
    delete_adapter = adapter_state.delete_adapter
    _refresh = adapter_state.refresh

    def _apply(self, fn, *args, **kwargs):
        self._dora.w_sqnorm = None  # derived from the base weight's old data (see LoraAdapter._apply)
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
        """The adapter's update in the base weight's layout (float32 or wider)."""
        raise NotImplementedError

    def _init_from_base(self, adapter: LoraAdapter, mode: str) -> None:
        raise TypeError(f"init_lora_weights={mode!r} is available for Linear and Conv1D layers only, "
                        f"not {type(self.base_layer).__name__}")

    # ------------------------------------------------------------------ adapter bookkeeping
    def add_adapter(self, name: str, r: int, scaling: float, dropout: float = 0.0, init=True,
                    autocast_adapter_dtype: bool = True, use_dora: bool = False, device=None) -> None:
        """Create adapter ``name`` on the base weight's device (and dtype; float32 for half bases).

        ``device="meta"`` creates it empty, to be loaded by assignment (``low_cpu_mem_usage``); a
        PiSSA/OLoRA adapter is still made on the base's device, since it must rewrite the base weight.
        """
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        weight = self.base_layer.weight
        from_base = isinstance(init, str) and init.startswith(("pissa", "olora"))
        holder = next((n for n, ad in self.adapters.items() if getattr(ad, "wrote_residual", False)), None)
        if from_base and holder is not None:
            raise ValueError(f"init_lora_weights={init!r}: the base weight already holds the residual of adapter "
                             f"{holder!r} (a PiSSA/OLoRA initialisation); a second residual would change "
                             f"{holder!r}'s outputs. Add this adapter to a fresh base model")
        if device is None or from_base:
            device = weight.device
        a_shape, b_shape = self._shapes(r)
        adapter = LoraAdapter(a_shape, b_shape, scaling, dropout, device=device,
                              dtype=adapter_dtype(weight, autocast_adapter_dtype))
        if adapter.lora_A.is_meta:
            if use_dora:  # no values to compute ||W + s B A|| from: m is loaded like A and B
                m = adapter.lora_B.new_empty(adapter.lora_B.shape[0])  # one per output channel
                adapter.lora_magnitude_vector = nn.Parameter(m.reshape(self._magnitude_shape()))
            self.adapters[name] = adapter
            return
        if from_base:
            self._init_from_base(adapter, init)
        else:
            self._init_adapter(adapter, init)
        if use_dora:
            # m starts at ||W + s B A|| per output row, so the layer starts as plain LoRA would.
            with torch.no_grad():
                norm = self._dora.norm(self, adapter, use_cache=False)
            # A copy: the cached norm must not share storage with m, which training changes in place.
            m = norm.to(adapter.lora_A.dtype).reshape(self._magnitude_shape()).clone()
            adapter.lora_magnitude_vector = nn.Parameter(m)
        self.adapters[name] = adapter

    def undo_adapter(self, name: str) -> None:
        """Remove an adapter that was *just* created (a failed injection): unlike delete_adapter, also
        gives the base back what a PiSSA/OLoRA initialisation took from it."""
        ad = self.adapters[name]
        if getattr(ad, "wrote_residual", False):
            with torch.no_grad():
                self._write_weight(LF.add_delta(self._read_weight(), self.delta_weight(name)))
        self.delete_adapter(name)

    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        """The tensors that make up adapter ``name`` in this layer, by role (``lora_A``, ``lora_B``)."""
        ad = self.adapters[name]
        params = {"lora_A": ad.lora_A, "lora_B": ad.lora_B}
        if ad.lora_magnitude_vector is not None:
            params["lora_magnitude_vector"] = ad.lora_magnitude_vector
        return params

    # ------------------------------------------------------------------ merging
    def merge(self, names: Optional[Sequence[str]] = None, safe: bool = False) -> None:
        """Add the adapters' deltas into the base weight (default: the active adapters).

        Merging computes in float32 and casts once; with ``safe=True`` a non-finite result raises
        before anything is written.
        """
        for name in self.active if names is None else names:
            if name in self.merged or name not in self.adapters:
                continue
            with torch.no_grad():
                new = self._merged_weight(name, self._read_weight())
                if safe and not torch.isfinite(new).all():
                    raise ValueError(f"merging adapter {name!r} into {self._label()} produced NaN/inf values; "
                                     "the weights were left unchanged")
                self._write_weight(new)
            self.merged.append(name)
        self._refresh()

    def unmerge(self) -> None:
        """Undo every merged adapter, last merged first."""
        while self.merged:
            name = self.merged.pop()
            with torch.no_grad():
                self._write_weight(self._unmerged_weight(name, self._read_weight()))
        self._refresh()

    def _read_weight(self) -> Tensor:
        """The base weight in its usual layout; dequantized (float32) for 4/8-bit bases."""
        if is_quantized(self.base_layer):
            return dequantize_weight(self.base_layer)
        return self.base_layer.weight

    def _write_weight(self, new: Tensor) -> None:
        """Set the base weight to ``new``; quantized bases are quantized again (with a warning)."""
        if is_quantized(self.base_layer):
            warn_requantize(self.base_layer)
            replace_weight(self.base_layer, new)
        else:
            self.base_layer.weight.copy_(new)

    def _merged_weight(self, name: str, weight: Tensor) -> Tensor:
        if self.adapters[name].lora_magnitude_vector is not None:
            return self._dora.merged_weight(self, name, weight)
        return LF.add_delta(weight, self.delta_weight(name))

    def _unmerged_weight(self, name: str, weight: Tensor) -> Tensor:
        if self.adapters[name].lora_magnitude_vector is not None:
            return self._dora.unmerged_weight(self, name, weight)
        return LF.add_delta(weight, self.delta_weight(name), sign=-1.0)

    def _magnitude_shape(self) -> tuple[int, ...]:
        """Shape of the DoRA magnitude as peft stores it: ``(out,)``; convolutions override."""
        return (-1,)

    def _dora_views(self, ad: LoraAdapter) -> tuple[Tensor, Tensor, Tensor]:
        """``(W rows (out, k), A (r, k), B (out, r))`` for the DoRA norm (default: 2-D A and B)."""
        weight = self._read_weight()
        rows = weight.t() if self._weight_out_dim == 1 else weight.reshape(weight.shape[0], -1)
        return rows, ad.lora_A.reshape(ad.r, -1), ad.lora_B.reshape(-1, ad.r)

    def _label(self) -> str:
        return type(self.base_layer).__name__

    def _accumulate(self, out: Tensor, delta: Tensor, ad: LoraAdapter) -> Tensor:
        """``out`` with one adapter's ``delta`` applied: added (LoRA) or rescaled in (DoRA)."""
        delta = delta.to(out.dtype)
        return add_dora(self, out, delta, ad) if ad.lora_magnitude_vector is not None else out + delta

    def _cast_input(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        # Under autocast the matmuls pick their own dtype; otherwise match the adapter's.
        if x.dtype == dtype or torch.is_autocast_enabled(x.device.type):
            return x
        return x.to(dtype)


class LoraLinear(LoraLayer):
    """LoRA on ``nn.Linear`` or transformers' ``Conv1D`` (``fan_in_fan_out``: weight stored ``(in, out)``).

    ``y = base(x) + sum_a s_a * B_a A_a drop(x)``, ``x: (..., in)`` -> ``y: (..., out)``.

    DoRA adapters (Liu et al., 2024) rescale each output row to a learned magnitude ``m``:
    ``y = b + (m / ||W + s B A||) * (W x + s B A drop(x))``. The base output ``W x`` is reused (never
    recomputed), and the row norm, detached as in the paper (section 4.3), comes from
    :func:`~deltatune.methods.lora.functional.dora_row_norm` without the dense matrix and is cached
    until ``A``, ``B`` or ``W`` change (tracked by the tensors' version counters).
    """

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False):
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self._weight_out_dim = 1 if fan_in_fan_out else 0
        if is_quantized(base_layer):  # packed weights: the shape is not (out, in)
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        else:
            out_f, in_f = base_layer.weight.shape
            self.in_features, self.out_features = (out_f, in_f) if fan_in_fan_out else (in_f, out_f)

    def _init_from_base(self, adapter: LoraAdapter, mode: str) -> None:
        """PiSSA / OLoRA: factors from the base weight; the residual ``W - s B A`` replaces the base."""
        weight = self._read_weight()
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"init_lora_weights={mode!r} needs a float base weight, got {weight.dtype}")
        rows = (weight.t() if self.fan_in_fan_out else weight).float()  # (out, in)
        if mode == "olora":
            A, B = LF.olora_factors(rows, adapter.r)
        else:
            niter = int(mode[len("pissa_niter_"):]) if mode.startswith("pissa_niter_") else None
            A, B = LF.pissa_factors(rows, adapter.r, adapter.scaling, niter)
        residual = rows - adapter.scaling * (B @ A)
        with torch.no_grad():
            adapter.lora_A.copy_(A)
            adapter.lora_B.copy_(B)
            self._write_weight((residual.t() if self.fan_in_fan_out else residual).to(weight.dtype))
        adapter.wrote_residual = True  # see undo_adapter

    def _shapes(self, r):
        return (r, self.in_features), (self.out_features, r)

    def delta_weight(self, name):
        ad = self.adapters[name]
        return LF.linear_delta_weight(ad.lora_A.float(), ad.lora_B.float(), ad.scaling, self.fan_in_fan_out)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        run, base = self._run, self._modules["base_layer"]  # (no nn.Module.__getattr__ in the hot path)
        if not run:
            return base(x, *args, **kwargs)
        autocast = _any_autocast() and torch.is_autocast_enabled(x.device.type)
        if type(base) is not nn.Linear or autocast or args or kwargs or not _runs_forward_only(base):
            # quantized, hooked or subclassed bases may keep or expect other shapes: out of place
            return self._add_deltas(x, base(x, *args, **kwargs), run, autocast, inplace=False)
        # A plain nn.Linear: calling F.linear is what calling the module would do (no hooks, forward not
        # replaced), minus the module-call overhead, a large share of a decoded token's cost per layer.
        # Everything runs on a 2-D x, so outputs are fresh tensors that later adapters add into in place
        # (in place on a view would make autograd copy the output gradient in backward: CopySlices).
        params = base._parameters
        weight, bias = params["weight"], params["bias"]
        compiling = torch.compiler.is_compiling()  # (the cached factors and the fused Function are eager-only)
        if not (torch.is_grad_enabled() or compiling):
            return inference.forward(self, x, weight, bias, run)
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if compiling or not x.dtype == weight.dtype == run[0].lora_A.dtype:
            out = self._add_deltas(x, F.linear(x, weight, bias), run, autocast, inplace=True)
        else:  # the first adapter and the base in one autograd node (see LF.lora_linear)
            ad = run[0]
            dropout = ad.dropout if self.training else 0.0
            dora = ad.lora_magnitude_vector is not None
            scale = row_scale(self, ad, x.dtype) if dora else None
            out = LF.lora_linear(x, weight, bias, ad.lora_A, ad.lora_B, ad.scaling, dropout, scale)
            if len(run) > 1:  # (a DoRA output is kept for backward: no in-place adds into it)
                out = self._add_deltas(x, out, run[1:], autocast, inplace=not dora)
        return out.view(*shape[:-1], out.shape[-1])

    def _add_deltas(self, x: Tensor, out: Tensor, run, autocast: bool, inplace: bool) -> Tensor:
        """``out`` with each adapter of ``run`` applied in order; ``inplace`` needs a 2-D ``out`` that
        nothing keeps for backward."""
        compiling = torch.compiler.is_compiling()  # dynamo cannot trace the in-place Functions (mark_dirty)
        for ad in run:
            A, B = ad.lora_A, ad.lora_B
            xa = x if autocast or x.dtype == A.dtype else x.to(A.dtype)
            dropout = ad.dropout > 0.0 and self.training and not autocast
            dora = ad.lora_magnitude_vector is not None
            if inplace and out.dtype == A.dtype and not (compiling and (dropout or dora)):
                # one fused kernel into out, no out-sized temporary
                if dropout:
                    out = LF.linear_dropout_add_(out, xa, A, B, ad.scaling, ad.dropout)
                else:
                    out.addmm_(F.linear(xa, A), B.t(), alpha=ad.scaling)
                if dora:
                    out = add_dora(self, out, None, ad)  # rescaled in place
                    inplace = False  # the DoRA output is kept for backward: no in-place adds after it
                continue
            if dropout:
                delta = LF.linear_delta_dropout(xa, A, B, ad.scaling, ad.dropout)
            else:
                delta = LF.linear_delta(xa, A, B, ad.scaling, ad.dropout, self.training)
            if dora:
                out = add_dora(self, out, delta.to(out.dtype), ad)
                inplace = False
                continue
            out = out.add_(delta.to(out.dtype)) if inplace else out + delta.to(out.dtype)
        return out


def _runs_forward_only(module: nn.Module) -> bool:
    """Whether calling ``module`` runs just its class's ``forward``: no hooks on it or global ones (as
    ``nn.Module.__call__`` checks), and no ``forward`` replaced on the instance (as accelerate does)."""
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__
                or _torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks
                or _torch_module._global_backward_hooks or _torch_module._global_backward_pre_hooks)


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but keep the layer usable without it
        return ()
    return Conv1D


def is_linear(module: nn.Module) -> bool:
    """Linear layers for ``"all-linear"``: ``nn.Linear`` and transformers' ``Conv1D``."""
    return isinstance(module, (nn.Linear, _conv1d_type())) and not isinstance(module, LoraLayer)


def wrap_module(module: nn.Module) -> LoraLayer:
    """A fresh LoRA wrapper (no adapters yet) for a supported base layer, else a clear TypeError."""
    from .conv import LoraConv
    from .embedding import LoraEmbedding

    if isinstance(module, nn.Linear):
        return LoraLinear(module)
    conv1d = _conv1d_type()
    if conv1d and isinstance(module, conv1d):
        return LoraLinear(module, fan_in_fan_out=True)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return LoraConv(module)
    raise TypeError(
        f"LoRA does not support modules of type {type(module).__name__}; supported: torch.nn.Linear, "
        "torch.nn.Embedding, torch.nn.Conv1d/2d/3d and transformers' Conv1D"
    )
