"""LoRA on ``nn.Embedding``: shapes, initialisation and the delta; bookkeeping, merging and variants come
from :class:`LoraLayer`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as LF
from .layer import LoraLayer


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding``: ``y = E[ids] + s * (A^T[ids]) B^T``; ``ids: (...)`` -> ``(..., dim)``."""

    checkpoint_kind = "lora_embedding"
    _weight_out_dim = 1  # DoRA normalises each embedding dimension over the vocabulary

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim

    def _check_options(self, use_dora, lora_bias):
        if lora_bias:
            raise TypeError("lora_bias=True is not available for Embedding layers (as in peft)")

    def _shapes(self, r):
        num, dim = self.base_layer.weight.shape
        return (r, num), (dim, r)

    def _init_adapter(self, adapter, mode):
        # Rows are looked up from A, so A = 0 / B ~ N(0, 1) keeps the identity at init while the
        # gradient reaches A through a non-zero B.
        with torch.no_grad():
            if mode is False:
                nn.init.normal_(adapter.lora_A)
            else:
                nn.init.zeros_(adapter.lora_A)
            nn.init.normal_(adapter.lora_B)

    def delta_weight(self, name):
        ad = self.adapters[name]
        return LF.embedding_delta_weight(ad.lora_A.float(), ad.lora_B.float(), ad.scaling)

    def _delta(self, ids: Tensor, ad) -> Tensor:
        base = self.base_layer
        return LF.embedding_delta(ids, ad.lora_A, ad.lora_B, ad.scaling, base.padding_idx, base.max_norm,
                                  base.norm_type, base.scale_grad_by_freq, base.sparse)

    def _mixed_layout(self, A, B):
        return A.t().contiguous(), B.t().contiguous()  # (num, sum r): rows looked up; (sum r, dim)

    def _down(self, ids, A_t):
        base = self.base_layer
        return F.embedding(ids, A_t, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                           base.sparse)

    def _up(self, h, B_t):
        return h @ B_t

    def forward(self, ids: Tensor, *args, **kwargs) -> Tensor:
        if self.rows is not None:
            return self._forward_rows(ids, self.base_layer(ids, *args, **kwargs))
        return self._apply_run(ids, self.base_layer(ids, *args, **kwargs), self._run)
