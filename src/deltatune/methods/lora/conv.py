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
        if base_layer.padding_mode != "zeros":
            raise TypeError(f"LoRA on convolutions with padding_mode={base_layer.padding_mode!r} is not supported")
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self._conv = _CONV_FN[base_layer.weight.dim() - 2]

    def _magnitude_shape(self):
        return (1, -1) + (1,) * (self.base_layer.weight.dim() - 2)  # peft keeps (1, out, 1, ...)

    def _check_options(self, use_dora, lora_bias):
        if use_dora and self.base_layer.groups != 1:
            raise TypeError(f"DoRA on a grouped convolution (groups={self.base_layer.groups}) is not available: its "
                            "norm needs the update as one kernel, which a grouped B A is not")

    def _shapes(self, r):
        # A sees every input channel (the base kernel, ungrouped); B is grouped as the base is (peft's layout)
        base = self.base_layer
        groups = base.groups
        if r % groups:
            raise ValueError(f"LoRA on a {type(base).__name__} with groups={groups} needs a rank divisible by "
                             f"{groups}, got r={r}")
        out_c, _, *kernel = base.weight.shape
        return (r, base.in_channels, *kernel), (out_c, r // groups, *([1] * len(kernel)))

    def delta_weight(self, name):
        if self.base_layer.groups != 1:  # conv_B . conv_A mixes all input channels: no grouped kernel holds it
            raise ValueError(f"adapter {name!r}: a LoRA update on a grouped convolution (groups="
                             f"{self.base_layer.groups}) is not a grouped kernel, so it cannot be merged (nor "
                             "combined by add_weighted_adapter); peft cannot merge it either")
        ad = self.adapters[name]
        return LF.conv_delta_weight(ad.lora_A.float(), ad.lora_B.float(), ad.scaling)

    def _delta(self, x: Tensor, ad) -> Tensor:
        b = self.base_layer
        return LF.conv_delta(self._cast_input(x, ad.lora_A.dtype), ad.lora_A, ad.lora_B, ad.scaling, self._conv,
                             b.stride, b.padding, b.dilation, ad.dropout, self.training, b.groups)

    def _down(self, x, A):
        b = self.base_layer
        return self._conv(x, A, None, b.stride, b.padding, b.dilation)

    def _up(self, h, B):
        if self.base_layer.groups != 1:  # (the concatenated B of several adapters is not grouped per adapter)
            raise ValueError(f"mixed-adapter batches are not available on grouped convolutions (groups="
                             f"{self.base_layer.groups})")
        return self._conv(h, B)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.rows is not None:
            return self._forward_rows(x, self.base_layer(x, *args, **kwargs))
        return self._apply_run(x, self.base_layer(x, *args, **kwargs), self._run)
