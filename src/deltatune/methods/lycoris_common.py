"""What LoHa and LoKr (the LyCORIS family) share: the config fields, the per-adapter state and the layer.

Both methods build a full-size update ``dW`` (in the base weight's layout) from a few small factors and
add ``conv(x, dW)`` / ``x dW^T`` to the base layer's output; they differ only in how ``dW`` is made
(:mod:`.loha.functional`, :mod:`.lokr.functional`). Everything else lives here, once: module dropout
(skip a whole adapter for a training step), rank dropout (zero random output rows of ``dW`` during
training), merging through the shared loop of :mod:`deltatune.adapter_state`, and the checks on which
base layers can be adapted (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, as in peft).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import adapter_state
from ..adapter_layer import logical_shape
from ..config import ConfigError, PeftConfig, check_number
from ..quant.bnb import is_quantized
from ..targeting import pattern_value
from .lora.layer import _conv1d_type, adapter_dtype


@dataclass
class LycorisConfig(PeftConfig):
    """Fields shared by :class:`~deltatune.methods.loha.LoHaConfig` and
    :class:`~deltatune.methods.lokr.LoKrConfig`, named as peft names them.

    Args:
        r: Rank of the factors (> 0).
        alpha: Scale numerator (>= 0): the update is multiplied by ``alpha / r``.
        rank_dropout: Probability, during training, of zeroing each output row of the update ``dW``.
        module_dropout: Probability, during training, of skipping the whole adapter for one forward call.
        use_effective_conv2d: For convolutions with a kernel larger than 1: factor the kernel through a
            small core tensor ``t: (r, r, kh, kw)`` (FedPara's "Proposition 3") instead of flattening it
            into the input dimension.
        target_modules: Modules to adapt (list = name or ``.``-suffix, str = full regex, ``"all-linear"``).
        exclude_modules: Modules to skip (same forms).
        init_weights: ``True``: the update starts at zero (the model starts as the base); ``False``:
            random (tests).
        layers_to_transform: Only adapt layers with these indices.
        layers_pattern: The layer container's name(s), used with ``layers_to_transform``.
        rank_pattern: ``{regex: r}`` per-module overrides of ``r``.
        alpha_pattern: ``{regex: alpha}`` per-module overrides of ``alpha``.
        modules_to_save: Modules trained in full and saved with the adapter.
    """

    r: int = 8
    alpha: Union[int, float] = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    init_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    modules_to_save: Optional[list[str]] = None

    #: The values ``init_weights`` may take (LoKr adds ``"lycoris"``).
    _INIT_CHOICES = (True, False)

    def validate(self) -> None:
        check_number("r", self.r, low=0, integer=True)
        check_number("alpha", self.alpha, low=0, low_inclusive=True)
        for name in ("rank_dropout", "module_dropout"):
            check_number(name, getattr(self, name), low=0, high=1, low_inclusive=True)
        for key, value in self.rank_pattern.items():
            check_number(f"rank_pattern[{key!r}]", value, low=0, integer=True)
        for key, value in self.alpha_pattern.items():
            check_number(f"alpha_pattern[{key!r}]", value, low=0, low_inclusive=True)
        if not any(self.init_weights is c or self.init_weights == c and isinstance(c, str)
                   for c in self._INIT_CHOICES):
            raise ConfigError(f"init_weights must be one of {list(self._INIT_CHOICES)}, got {self.init_weights!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("layers_pattern is set but layers_to_transform is not: give the layer indices too")
        # (sets and tuples become sorted lists, the JSON form peft writes and reads)
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
            if isinstance(getattr(self, name), list) and not all(isinstance(t, str) for t in getattr(self, name)):
                raise ConfigError(f"{name} entries must be strings, got {getattr(self, name)!r}")

    def rank_for(self, module_name: str) -> int:
        """``r`` for one module: the first ``rank_pattern`` key matching the end of its name, else ``r``."""
        return pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.alpha)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for name in ("target_modules", "exclude_modules"):  # peft keeps them as sets: no order, no repeats
            if isinstance(out[name], list):
                out[name] = sorted(set(out[name]))
        return out


class LycorisAdapter(nn.Module):
    """One adapter's factors in one layer (attributes named by checkpoint role, e.g. ``hada_w1_a``) and its
    hyper-parameters.

    Attributes:
        roles: The roles this adapter has, in peft's initialisation order.
        r, alpha: Rank and alpha; ``scaling = alpha / r``.
        rank_dropout, module_dropout: Training-time dropout probabilities (see :class:`LycorisConfig`).
        rank_dropout_scale: Divide the kept rows by the fraction kept (LoHa always does; LoKr if asked).
    """

    def __init__(self, shapes: dict[str, Sequence[int]], r: int, alpha: float, rank_dropout: float,
                 module_dropout: float, rank_dropout_scale: bool, device=None, dtype=None):
        super().__init__()
        self.roles = tuple(shapes)
        for role, shape in shapes.items():
            setattr(self, role, nn.Parameter(torch.empty(tuple(shape), device=device, dtype=dtype)))
        self.r, self.alpha = int(r), alpha
        self.scaling = alpha / r
        self.rank_dropout, self.module_dropout = float(rank_dropout), float(module_dropout)
        self.rank_dropout_scale = bool(rank_dropout_scale)

    def params(self) -> dict[str, nn.Parameter]:
        return {role: getattr(self, role) for role in self.roles}

    def init_params(self, zero: Iterable[str]) -> None:
        """Kaiming-uniform (as ``nn.Linear``) for every factor, in role order, except ``zero`` (set to 0).

        The order matches peft's, so the same seed gives the same values in both libraries."""
        zero = set(zero)
        with torch.no_grad():
            for role in self.roles:
                p = getattr(self, role)
                if p.is_meta:
                    continue
                if role in zero:
                    nn.init.zeros_(p)
                else:
                    nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, roles={list(self.roles)}"


def base_kind(module: nn.Module, method: str) -> str:
    """``"linear"``, ``"conv1d"`` or ``"conv2d"`` for a base layer the LyCORIS methods adapt; a TypeError
    naming what is supported otherwise (peft supports exactly these three)."""
    conv1d = _conv1d_type()
    if conv1d and isinstance(module, conv1d):
        raise TypeError(f"{method} does not support transformers' Conv1D (GPT-2 style) layers, as peft does not; "
                        "supported: torch.nn.Linear, torch.nn.Conv1d and torch.nn.Conv2d")
    if is_quantized(module):
        raise TypeError(f"{method} does not support quantized (bitsandbytes) base layers, as peft does not")
    for kind, cls in (("linear", nn.Linear), ("conv1d", nn.Conv1d), ("conv2d", nn.Conv2d)):
        if isinstance(module, cls):
            return kind
    raise TypeError(f"{method} does not support modules of type {type(module).__name__}; supported: "
                    "torch.nn.Linear, torch.nn.Conv1d and torch.nn.Conv2d")


@adapter_state.peft_surface
class LycorisLayer(nn.Module):
    """Base of the LoHa and LoKr layers: ``y = base(x) + sum_a op(x, dW_a)``, ``op`` the base layer's own
    operation (``F.linear``, or the convolution with its stride, padding, dilation and groups) and
    ``dW_a: base weight shape`` adapter ``a``'s update.

    Subclasses set ``checkpoint_kind`` and ``method`` and define :meth:`add_adapter` (shapes and
    initialisation) and :meth:`_factor_delta` (the update from the factors).
    """

    checkpoint_kind = "lycoris"
    method = "LyCORIS"

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.kind = base_kind(base_layer, self.method)
        adapter_state.init(self, base_layer)
        self.out_features, self.in_features = logical_shape(base_layer)[:2]

    weight = property(adapter_state.base_weight)
    set_active = adapter_state.set_active
    set_disabled = adapter_state.set_disabled
    delete_adapter = adapter_state.delete_adapter
    _refresh = adapter_state.refresh

    # ------------------------------------------------------------------ peft's per-adapter dicts (read-only)
    r = property(lambda self: {n: a.r for n, a in self.adapters.items()})
    alpha = property(lambda self: {n: a.alpha for n, a in self.adapters.items()})
    scaling = property(lambda self: {n: a.scaling for n, a in self.adapters.items()})

    # ------------------------------------------------------------------ subclass interface
    def add_adapter(self, name: str, *args, **kwargs) -> None:
        raise NotImplementedError

    def _factor_delta(self, ad: LycorisAdapter) -> Tensor:
        """``scaling * (product of the factors)``, any shape with the base weight's number of elements."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    def _new_adapter(self, name: str, shapes: dict, r: int, alpha: float, rank_dropout: float,
                     module_dropout: float, rank_dropout_scale: bool, autocast_adapter_dtype: bool,
                     device) -> LycorisAdapter:
        """An adapter with empty factors of ``shapes`` on the base weight's device (or ``device``), in
        float32 on half-precision bases (``autocast_adapter_dtype``); not yet installed."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        weight = self.base_layer.weight
        return LycorisAdapter(shapes, r, alpha, rank_dropout, module_dropout, rank_dropout_scale,
                              device=device or weight.device, dtype=adapter_dtype(weight, autocast_adapter_dtype))

    def _kernel(self) -> tuple[int, ...]:
        """The base convolution's kernel size (``()`` for a linear layer)."""
        return tuple(self.base_layer.kernel_size) if self.kind != "linear" else ()

    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        return self.adapters[name].params()

    def delta_weight(self, name: str) -> Tensor:
        """Adapter ``name``'s update ``dW`` in the base weight's shape (adapter dtype, with gradients)."""
        return self._delta(self.adapters[name], rank_dropout=False)

    def _delta(self, ad: LycorisAdapter, rank_dropout: bool) -> Tensor:
        dW = self._factor_delta(ad).reshape(self.base_layer.weight.shape)
        if rank_dropout and ad.rank_dropout > 0:
            # One keep/drop draw per output row (peft's "rank" dropout acts on dW's first dimension).
            keep = (torch.rand(dW.shape[0], device=dW.device) > ad.rank_dropout).to(dW.dtype)
            if ad.rank_dropout_scale and keep.sum() > 0:  # (all dropped: a zero update, not 0/0)
                keep = keep / keep.mean()
            dW = dW * keep.view(-1, *([1] * (dW.dim() - 1)))
        return dW

    def _op(self, x: Tensor, dW: Tensor) -> Tensor:
        """The base layer's operation with weight ``dW`` and no bias."""
        if self.kind == "linear":
            return F.linear(x, dW)
        return self.base_layer._conv_forward(x, dW, None)  # (honours padding_mode, which F.conv* does not)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if not self._run:
            return out
        for ad in self._run:
            if self.training and ad.module_dropout > 0 and torch.rand(1).item() <= ad.module_dropout:
                continue  # module dropout: this adapter sits out this training step
            dW = self._delta(ad, rank_dropout=self.training)
            out = out + self._op(x.to(dW.dtype), dW)
        return out.to(x.dtype) if x.is_floating_point() else out

    # ------------------------------------------------------------------ merging
    def merge(self, names: Optional[Sequence[str]] = None, safe: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weight: ``W' = W + dW``."""
        adapter_state.merge_adapters(self, names, safe, self._merged_weight)

    def unmerge(self) -> None:
        """Undo every merge, last merged first: ``W' = W - dW``."""
        adapter_state.unmerge_adapters(self, self._unmerged_weight)

    def _merged_weight(self, name: str, W: Tensor, sign: float = 1.0) -> Tensor:
        dtype = torch.promote_types(W.dtype, torch.float32)  # the sum in float32 (or wider), cast on write
        return W.to(dtype) + sign * self.delta_weight(name).detach().to(device=W.device, dtype=dtype)

    def _unmerged_weight(self, name: str, W: Tensor) -> Tensor:
        return self._merged_weight(name, W, sign=-1.0)

    def extra_repr(self) -> str:
        return f"{self.method}, kind={self.kind}"


def add_adapter_from_config(layer: LycorisLayer, module_name: str, adapter_name: str, config: LycorisConfig,
                            autocast_adapter_dtype: bool = True, device=None, **options) -> None:
    """``Method.add_adapter`` of both methods: the config's values for ``module_name`` (with its
    ``rank_pattern`` / ``alpha_pattern`` entries), plus the method's own ``options``."""
    layer.add_adapter(adapter_name, r=config.rank_for(module_name), alpha=config.alpha_for(module_name),
                      rank_dropout=config.rank_dropout, module_dropout=config.module_dropout,
                      init=config.init_weights, use_effective_conv2d=config.use_effective_conv2d,
                      autocast_adapter_dtype=autocast_adapter_dtype, device=device, **options)
