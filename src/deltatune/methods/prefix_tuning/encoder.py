"""Prefix tuning's encoder and how its prefixes enter the model (forward and ``generate``): as a pre-filled
key/value cache."""

from __future__ import annotations

import inspect
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from ...config import TaskType
from ..prompt_tuning.encoder import TASK_TYPES as _PROMPT_TASK_TYPES

#: The task types prefix tuning supports: the prefix is not in the sequence, so per-token heads work too.
TASK_TYPES = _PROMPT_TASK_TYPES + (TaskType.TOKEN_CLS, TaskType.QUESTION_ANS)


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
        """A transformers cache holding the prefixes' keys and values for every layer.

        Encoder-decoder models get them in the decoder's self-attention cache, beside an empty
        cross-attention cache that the model fills from the encoder's output (peft's arrangement).
        """
        from transformers import DynamicCache, EncoderDecoderCache

        c = self.config
        n, heads = c.num_virtual_tokens, c.num_attention_heads
        kv = self.prefixes().to(dtype).view(n, c.num_layers * 2, heads, c.token_dim // heads)
        kv = kv.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch, -1, -1, -1)  # (2L, B, heads, n, head_dim)
        cache = DynamicCache()
        rows = 2 * c.num_layers
        # Encoder-decoder models: peft doubles the 2L rows to 4L and gives decoder layer i rows 4i..4i+3 as
        # (self k, self v, cross k, cross v), dropping the cross pair; so layer i's self-attention reads rows
        # 4i and 4i+1, modulo 2L. Kept for checkpoint compatibility (with L even, odd layers' rows go unused).
        stride = 4 if c.num_transformer_submodules == 2 else 2
        for layer in range(c.num_layers):
            row = (stride * layer) % rows
            cache.update(kv[row], kv[row + 1], layer)
        if c.num_transformer_submodules == 2:
            return EncoderDecoderCache(cache, DynamicCache())
        return cache


def cache_kwarg(model: nn.Module) -> Optional[str]:
    """The name under which ``model`` takes a key/value cache (transformers 5: ``cache``; earlier:
    ``past_key_values``), looking through to the backbone for heads that pass ``**kwargs`` on; None if none."""
    candidates = [model]
    backbone = getattr(model, "base_model", None)
    if isinstance(backbone, nn.Module) and backbone is not model:
        candidates.append(backbone)
    for i, module in enumerate(candidates):
        params = inspect.signature(module.forward).parameters
        for name in ("cache", "past_key_values"):
            if name in params:
                return name
        if i == 0 and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return None  # a head without **kwargs cannot pass a cache to its backbone
    return None


def with_prefix(encoder: PrefixEncoder, model: nn.Module, input_ids: Optional[Tensor], inputs_embeds: Optional[Tensor],
                attention_mask: Optional[Tensor], decoder_attention_mask: Optional[Tensor] = None) -> dict:
    """Model inputs with the prefix cache and the attention mask that sees the prefix.

    Decoder-only and encoder models: ``attention_mask`` gets ``n`` leading ones (created when absent).
    Encoder-decoder models: the prefix is in the decoder, so ``decoder_attention_mask`` gets them (when
    given); the encoder's mask is left as is.
    """
    ref = inputs_embeds if inputs_embeds is not None else input_ids
    batch = ref.shape[0]
    dtype = model.get_input_embeddings().weight.dtype
    out = {cache_kwarg(model): encoder.cache(batch, dtype)}
    if input_ids is not None:
        out["input_ids"] = input_ids
    if inputs_embeds is not None:
        out["inputs_embeds"] = inputs_embeds
    n = encoder.config.num_virtual_tokens
    if encoder.config.num_transformer_submodules == 2:
        if attention_mask is not None:
            out["attention_mask"] = attention_mask
        if decoder_attention_mask is not None:
            out["decoder_attention_mask"] = _ones_before(decoder_attention_mask, n)
        return out
    if attention_mask is None:
        attention_mask = torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
    out["attention_mask"] = _ones_before(attention_mask, n)
    return out


def _ones_before(mask: Tensor, n: int) -> Tensor:
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def prefix_inputs(encoder: PrefixEncoder, model: nn.Module, causal: bool, input_ids=None, attention_mask=None,
                  inputs_embeds=None, labels=None, token_type_ids=None, position_ids=None, **kwargs) -> dict:
    """The keyword arguments for ``model`` with the prefix as a pre-filled key/value cache (``causal`` is
    not needed: the prefix is not in the sequence, so ``labels`` stay as they are)."""
    if position_ids is not None:
        warnings.warn("position_ids are ignored with prompt tuning (the virtual tokens shift every position)")
    if token_type_ids is not None:
        kwargs["token_type_ids"] = token_type_ids
    decoder_mask = kwargs.pop("decoder_attention_mask", None)
    prefix = with_prefix(encoder, model, input_ids, inputs_embeds, attention_mask, decoder_mask)
    return {**kwargs, "labels": labels, **prefix}


def generate_with_prefix(encoder: PrefixEncoder, model: nn.Module, input_ids: Tensor, *, encoder_decoder: bool,
                         **kwargs) -> Tensor:
    """``model.generate`` with the prefix cache. generate() sees the cache as n already-processed tokens, so
    it gets n placeholder ids in front (never embedded: the cache covers them), removed from the result.

    Decoder-only models: the placeholders go before ``input_ids``. Encoder-decoder models: the cache is in
    the decoder, so they go before the decoder's start token, with a decoder mask as long as the decoder
    ids (that is how generate() knows to feed only the ids after the cache).
    """
    n = encoder.config.num_virtual_tokens
    if not encoder_decoder:
        pad = input_ids.new_zeros(input_ids.shape[0], n)
        inputs = with_prefix(encoder, model, input_ids, None, kwargs.pop("attention_mask", None))
        inputs["input_ids"] = torch.cat([pad, input_ids], dim=1)
        return model.generate(**inputs, **kwargs)[:, n:]
    start = kwargs.pop("decoder_input_ids", None)
    if start is None:
        token = getattr(model.generation_config, "decoder_start_token_id", None)
        token = model.config.decoder_start_token_id if token is None else token
        start = input_ids.new_full((input_ids.shape[0], 1), token)
    mask = kwargs.pop("decoder_attention_mask", None)
    mask = torch.ones_like(start) if mask is None else mask
    inputs = with_prefix(encoder, model, input_ids, None, kwargs.pop("attention_mask", None), mask)
    inputs["decoder_input_ids"] = torch.cat([start.new_zeros(start.shape[0], n), start], dim=1)
    return model.generate(**inputs, **kwargs)[:, n:]
