"""Prefix tuning's encoder and how its prefixes enter the model: as a pre-filled key/value cache."""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor, nn


class PrefixEncoder(nn.Module):
    """Prefixes ``(n, layers * 2 * kv_dim)``: an embedding, optionally through ``Linear-tanh-Linear``.

    Like P-tuning, a checkpoint holds the final prefixes; once loaded (or in inference mode) the
    embedding is used directly (``raw``).
    """

    checkpoint_kind = "prompt"
    is_prefix = True

    def __init__(self, config, word_embeddings: nn.Embedding):
        super().__init__()
        weight = word_embeddings.weight
        kw = dict(device=weight.device, dtype=weight.dtype)
        n, width = config.num_virtual_tokens, config.num_layers * 2 * config.token_dim
        self.config = config
        self.transform = None
        if config.prefix_projection and not config.inference_mode:
            hidden = config.encoder_hidden_size or config.token_dim
            self.embedding = nn.Embedding(n, config.token_dim, **kw)
            self.transform = nn.Sequential(nn.Linear(config.token_dim, hidden, **kw), nn.Tanh(),
                                           nn.Linear(hidden, width, **kw))
        else:
            self.embedding = nn.Embedding(n, width, **kw)
        self.raw = self.transform is None

    def prefixes(self) -> Tensor:
        w = self.embedding.weight
        return w if self.raw else self.transform(w)

    def adapter_params(self) -> dict[str, Tensor]:
        return {"prompt_embeddings": self.embedding.weight if self.raw else self.prefixes()}

    def prepare_load(self) -> None:
        """Files hold final prefixes ``(n, layers * 2 * kv_dim)``: keep them in a plain embedding."""
        if self.transform is not None:
            w = self.embedding.weight
            width = self.config.num_layers * 2 * self.config.token_dim
            self.embedding = nn.Embedding(w.shape[0], width, device=w.device, dtype=w.dtype)
            self.embedding.weight.requires_grad_(w.requires_grad)
            self.transform = None
        self.raw = True

    def cache(self, batch: int, dtype: torch.dtype):
        """A transformers ``DynamicCache`` holding the prefixes' keys and values for every layer."""
        from transformers import DynamicCache

        c = self.config
        n, heads = c.num_virtual_tokens, c.num_attention_heads
        kv = self.prefixes().to(dtype).view(n, c.num_layers * 2, heads, c.token_dim // heads)
        kv = kv.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch, -1, -1, -1)  # (2L, B, heads, n, head_dim)
        cache = DynamicCache()
        for layer in range(c.num_layers):
            cache.update(kv[2 * layer], kv[2 * layer + 1], layer)
        return cache


def cache_kwarg(model: nn.Module) -> str:
    """transformers 5 calls the cache argument ``cache``; earlier versions ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def with_prefix(encoder: PrefixEncoder, model: nn.Module, input_ids: Optional[Tensor], inputs_embeds: Optional[Tensor],
                attention_mask: Optional[Tensor]) -> dict:
    """Model inputs with the prefix cache and an attention mask that covers the prefix."""
    ref = inputs_embeds if inputs_embeds is not None else input_ids
    batch = ref.shape[0]
    dtype = model.get_input_embeddings().weight.dtype
    out = {cache_kwarg(model): encoder.cache(batch, dtype)}
    if input_ids is not None:
        out["input_ids"] = input_ids
    if inputs_embeds is not None:
        out["inputs_embeds"] = inputs_embeds
    n = encoder.config.num_virtual_tokens
    mask = attention_mask if attention_mask is not None else torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
    out["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
    return out
