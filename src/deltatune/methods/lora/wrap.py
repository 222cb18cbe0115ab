"""Which LoRA layer type wraps which base module."""

from __future__ import annotations

from torch import nn

from .conv import LoraConv
from .embedding import LoraEmbedding
from .layer import LoraLayer, _conv1d_type
from .linear import LoraLinear
from .mha import LoraMultiheadAttention


def wrap_module(module: nn.Module) -> LoraLayer:
    """A fresh LoRA wrapper (no adapters yet) for a supported base layer, else a clear TypeError."""
    if isinstance(module, nn.Linear):
        return LoraLinear(module)
    conv1d = _conv1d_type()
    if conv1d and isinstance(module, conv1d):
        return LoraLinear(module, fan_in_fan_out=True)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return LoraConv(module)
    if isinstance(module, nn.MultiheadAttention):
        return LoraMultiheadAttention(module)
    raise TypeError(
        f"LoRA does not support modules of type {type(module).__name__}; supported: torch.nn.Linear, "
        "torch.nn.Embedding, torch.nn.Conv1d/2d/3d, torch.nn.MultiheadAttention and transformers' Conv1D"
    )
