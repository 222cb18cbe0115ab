"""OFT layers: wrap a frozen ``nn.Linear``, ``nn.Conv2d`` or ``nn.Embedding`` and rotate what it sees (or, for
an embedding, what it returns) by each active adapter's block-diagonal orthogonal matrix.

Linear: the input is rotated, ``y = base(x BD)`` (several adapters: ``x BD_1 BD_2 ...``, in active order, as
peft applies them). Conv2d: the flattened filters are rotated instead, ``y = conv(x, W BD^T)`` over the
``in * k * k`` filter dimension, which is what merging gives. peft 0.21 rotates unfolded input patches and
folds them back by summation, so for kernels larger than 1x1 its unmerged forward is not even the base model
at initialisation (and differs from its own merged model); for 1x1 kernels the two agree.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ... import adapter_state
from ...adapter_layer import logical_shape
from ..lora.layer import adapter_dtype
from . import functional as OF


class OFTAdapter(nn.Module):
    """One adapter's skew parameters ``oft_R: (n_rows, b (b - 1) / 2)`` (``n_rows`` = 1 with
    ``block_share``, else the number of blocks) and how they become rotations."""

    def __init__(self, n_blocks: int, block_size: int, config, device=None, dtype=None):
        super().__init__()
        rows = 1 if config.block_share else n_blocks
        self.oft_R = nn.Parameter(torch.zeros(rows, block_size * (block_size - 1) // 2, device=device, dtype=dtype))
        self.n_blocks, self.block_size = n_blocks, block_size
        self.coft, self.eps = config.coft, config.eps
        self.neumann, self.terms = config.use_cayley_neumann, config.num_cayley_neumann_terms
        self.dropout = config.module_dropout

    @property
    def r(self) -> int:
        return self.n_blocks

    def blocks(self, dropout: bool = True) -> Tensor:
        """The rotations ``(n_blocks, b, b)`` (COFT: the parameter is projected first, in place, as peft does;
        in training mode with ``dropout``: multiplicative block dropout)."""
        if self.coft and not self.oft_R.is_meta:
            with torch.no_grad():
                self.oft_R.copy_(OF.coft_project(self.oft_R, self.block_size, self.eps))
        R = OF.expand_blocks(OF.rotations(self.oft_R, self.block_size, self.neumann, self.terms), self.n_blocks)
        if dropout and self.training and self.dropout > 0:
            R = OF.drop_blocks(R, self.dropout)
        return R

    def extra_repr(self) -> str:
        return (f"blocks={self.n_blocks}, block_size={self.block_size}, shared={self.oft_R.shape[0] == 1}, "
                f"coft={self.coft}, neumann={self.terms if self.neumann else False}")


def fit_size(dim: int, wanted: int) -> int:
    """The divisor of ``dim`` nearest to ``wanted`` (ties: the smaller), ``dim`` itself when
    ``wanted >= dim``: peft's rule for an ``r`` or ``oft_block_size`` that does not divide the layer."""
    if wanted >= dim:
        return dim
    below = next(d for d in range(wanted, 0, -1) if dim % d == 0)
    above = next(d for d in range(wanted, dim + 1) if dim % d == 0)
    return below if wanted - below <= above - wanted else above


@adapter_state.peft_surface
class OFTLayer(nn.Module):
    """OFT on an ``nn.Linear`` (``y = base(x BD)``) or an ``nn.Conv2d`` (``y = conv(x, W BD^T)``, square
    kernels, no dilation, no groups)."""

    checkpoint_kind = "oft"

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        adapter_state.init(self, base_layer)
        self._conv = isinstance(base_layer, nn.Conv2d)
        self.out_features, self.in_features = logical_shape(base_layer)[:2]
        # the rotated dimension: a conv filter flattened over (in, kh, kw)
        self.rotated_features = base_layer.weight[0].numel() if self._conv else self.in_features

    weight = property(adapter_state.base_weight)
    set_active = adapter_state.set_active
    set_disabled = adapter_state.set_disabled
    delete_adapter = adapter_state.delete_adapter
    _refresh = adapter_state.refresh

    @property
    def r(self) -> dict:
        return {n: a.n_blocks for n, a in self.adapters.items()}

    @property
    def oft_block_size(self) -> dict:
        return {n: a.block_size for n, a in self.adapters.items()}

    # ------------------------------------------------------------------ bookkeeping
    def add_adapter(self, name: str, config, autocast_adapter_dtype: bool = True, device=None) -> None:
        """Create adapter ``name`` with ``config``'s sizes (``r`` or ``oft_block_size`` moved to a divisor of
        the rotated dimension, with a warning, as peft does) on the base weight's device."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        dim = self.rotated_features
        given, label = (config.oft_block_size, "oft_block_size") if config.r == 0 else (config.r, "r")
        size = fit_size(dim, given)
        if size != given:
            warnings.warn(f"OFT: {label}={given} does not divide this layer's input size {dim}; using {size}",
                          UserWarning, stacklevel=4)
        block = size if label == "oft_block_size" else dim // size
        weight = self.base_layer.weight
        adapter = OFTAdapter(dim // block, block, config, device=device or weight.device,
                             dtype=adapter_dtype(weight, autocast_adapter_dtype))
        if not config.init_weights and not adapter.oft_R.is_meta:
            with torch.no_grad():
                adapter.oft_R.normal_(0.0, 0.1)
        self.adapters[name] = adapter

    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        return {"oft_R": self.adapters[name].oft_R}

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if not self._run:
            return self.base_layer(x, *args, **kwargs)
        if self._conv:
            base = self.base_layer
            W = base.weight
            flat = W.reshape(W.shape[0], -1)
            for ad in reversed(self._run):  # x BD_1 BD_2 ... W^T = x (W ... BD_2^T BD_1^T)^T
                R = ad.blocks()
                flat = OF.rotate_weight(flat.to(R.dtype), R)
            return base._conv_forward(x, flat.reshape(W.shape).to(W.dtype), base.bias)
        dtype = x.dtype
        for ad in self._run:
            R = ad.blocks()
            x = OF.rotate_input(x.to(R.dtype), R)
        return self.base_layer(x.to(dtype), *args, **kwargs)

    # ------------------------------------------------------------------ merging
    def merge(self, names: Optional[Sequence[str]] = None, safe: bool = False) -> None:
        """Fold rotations into the weight, ``W' = W BD^T`` (flattened filters for Conv2d).

        Adapters merged in one call are folded last-first, so that the merged model computes
        ``x BD_1 BD_2 ... W^T`` as the unmerged forward does; an adapter merged in a later call acts before
        those merged earlier."""
        order = list(self.active if names is None else names)
        adapter_state.merge_adapters(self, list(reversed(order)), safe, self._merged_weight)

    def unmerge(self) -> None:
        """Undo every merge, last merged first: ``W = W' (BD^{-1})^T`` (block inverses)."""
        adapter_state.unmerge_adapters(self, self._unmerged_weight)

    def _blocks_for_merge(self, name: str, inverse: bool) -> Tensor:
        with torch.no_grad():
            R = self.adapters[name].blocks(dropout=False).float()
        return OF.inverse_blocks(R) if inverse else R

    def _merged_weight(self, name: str, weight: Tensor, inverse: bool = False) -> Tensor:
        R = self._blocks_for_merge(name, inverse)
        wide = torch.promote_types(weight.dtype, torch.float32)
        flat = weight.reshape(weight.shape[0], -1).to(wide)
        return OF.rotate_weight(flat, R.to(wide)).reshape(weight.shape)

    def _unmerged_weight(self, name: str, weight: Tensor) -> Tensor:
        return self._merged_weight(name, weight, inverse=True)


class OFTEmbeddingLayer(OFTLayer):
    """OFT on an ``nn.Embedding``: each looked-up row is rotated, ``y = E[ids] BD`` (several adapters: in
    active order, as peft applies them); merged, ``E' = E BD``. Saved as peft's ``oft_embedding_R``."""

    checkpoint_kind = "oft_embedding"

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.base_layer(x, *args, **kwargs)
        dtype = out.dtype
        for ad in self._run:
            R = ad.blocks()
            out = OF.rotate_input(out.to(R.dtype), R)
        return out.to(dtype)

    def merge(self, names: Optional[Sequence[str]] = None, safe: bool = False) -> None:
        """Fold rotations into the table, ``E' = E BD``, in order (the first acts first, as in the forward)."""
        adapter_state.merge_adapters(self, names, safe, self._merged_weight)

    def _merged_weight(self, name: str, weight: Tensor, inverse: bool = False) -> Tensor:
        R = self._blocks_for_merge(name, inverse)
        wide = torch.promote_types(weight.dtype, torch.float32)
        return OF.rotate_input(weight.to(wide), R.to(wide))


def is_linear(module: nn.Module) -> bool:
    """What ``"all-linear"`` selects for OFT: ``nn.Linear`` (peft's OFT has no Conv1D layer)."""
    return isinstance(module, nn.Linear)


def wrap_module(module: nn.Module) -> OFTLayer:
    if isinstance(module, nn.Embedding):
        return OFTEmbeddingLayer(module)
    if isinstance(module, nn.Linear):
        return OFTLayer(module)
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size
        if module.groups != 1:
            raise TypeError(f"OFT on grouped convolutions (groups={module.groups}) is not supported")
        if tuple(module.dilation) != (1, 1):
            raise TypeError(f"OFT on Conv2d with dilation {tuple(module.dilation)} is not supported (as in peft)")
        if k[0] != k[1]:
            raise TypeError(f"OFT on Conv2d needs a square kernel, got {tuple(k)} (as peft sizes its blocks)")
        return OFTLayer(module)
    raise TypeError(f"OFT does not support modules of type {type(module).__name__}; supported: torch.nn.Linear, "
                    "torch.nn.Conv2d and torch.nn.Embedding")
