"""LoRA on ``nn.Conv1d/2d/3d``: shapes and the delta; bookkeeping, merging and variants come from :class:`LoraLayer`."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as LF
from .layer import LoraLayer


_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LoraConv(LoraLayer):
    """LoRA on ``nn.Conv1d/2d/3d``: ``A`` is a conv with the base kernel/stride/padding into ``r``
    channels, ``B`` a 1x1 conv back to ``out`` channels. ``x: (N, in, *S)`` -> ``(N, out, *S')``."""

    _channel_dim = 1

    def __init__(self, base_layer: nn.Module):
        if base_layer.groups != 1:
            raise TypeError(f"LoRA on grouped convolutions (groups={base_layer.groups}) is not supported")
        if base_layer.padding_mode != "zeros":
            raise TypeError(f"LoRA on convolutions with padding_mode={base_layer.padding_mode!r} is not supported")
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self._conv = _CONV_FN[base_layer.weight.dim() - 2]

    def _magnitude_shape(self):
        return (1, -1) + (1,) * (self.base_layer.weight.dim() - 2)  # peft keeps (1, out, 1, ...)

    def _shapes(self, r):
        out_c, in_c, *kernel = self.base_layer.weight.shape
        return (r, in_c, *kernel), (out_c, r, *([1] * len(kernel)))

    def delta_weight(self, name):
        ad = self.adapters[name]
        return LF.conv_delta_weight(ad.lora_A.float(), ad.lora_B.float(), ad.scaling)

    def _delta(self, x: Tensor, ad) -> Tensor:
        b = self.base_layer
        return LF.conv_delta(self._cast_input(x, ad.lora_A.dtype), ad.lora_A, ad.lora_B, ad.scaling, self._conv,
                             b.stride, b.padding, b.dilation, ad.dropout, self.training)

    def _down(self, x, A):
        b = self.base_layer
        return self._conv(x, A, None, b.stride, b.padding, b.dilation)

    def _up(self, h, B):
        return self._conv(h, B)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.rows is not None:
            return self._forward_rows(x, self.base_layer(x, *args, **kwargs))
        return self._apply_run(x, self.base_layer(x, *args, **kwargs), self._run)
