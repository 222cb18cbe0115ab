"""The prompt encoder of prompt tuning and how its virtual tokens enter a forward call and ``generate``."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from ...config import TaskType


#: The task types prompt tuning supports (None: a plain model). The virtual tokens are part of the sequence,
#: so per-token heads (token classification, question answering) would get n extra outputs.
TASK_TYPES = (None, TaskType.CAUSAL_LM, TaskType.SEQ_CLS, TaskType.FEATURE_EXTRACTION, TaskType.SEQ_2_SEQ_LM)


class PromptEmbedding(nn.Module):
    """``num_virtual_tokens`` trainable vectors of the model's embedding size: ``weight (n, dim)``."""

    checkpoint_kind = "prompt"

    def __init__(self, config, word_embeddings: nn.Embedding):
        super().__init__()
        weight = word_embeddings.weight
        self.num_virtual_tokens = config.num_virtual_tokens  # used in front of the input (see with_prompts)
        self.embedding = nn.Embedding(config.total_virtual_tokens(), config.token_dim, device=weight.device,
                                      dtype=weight.dtype)
        if config.prompt_tuning_init == "TEXT":
            self._init_from_text(config, word_embeddings)

    def _init_from_text(self, config, word_embeddings: nn.Embedding) -> None:
        """Start from the embeddings of the init text's tokens, repeated or cut to the prompt length."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **(config.tokenizer_kwargs or {}))
        ids = tokenizer(config.prompt_tuning_init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError("prompt_tuning_init_text tokenizes to no tokens")
        n = config.total_virtual_tokens()
        ids = (ids * (n // len(ids) + 1))[:n]
        with torch.no_grad():
            self.embedding.weight.copy_(word_embeddings(torch.tensor(ids, device=word_embeddings.weight.device)))

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"prompt_embeddings": self.embedding.weight}

    def forward(self, batch_size: int) -> Tensor:
        """``(batch, n, dim)`` virtual-token embeddings."""
        return self.embedding.weight.unsqueeze(0).expand(batch_size, -1, -1)


def with_prompts(encoder: PromptEmbedding, word_embeddings: nn.Embedding, input_ids: Optional[Tensor],
                 inputs_embeds: Optional[Tensor], attention_mask: Optional[Tensor], labels: Optional[Tensor] = None,
                 token_type_ids: Optional[Tensor] = None, extend_labels: bool = True) -> dict:
    """Model inputs with the virtual tokens in front: embeddings, attention mask (ones for the prompt),
    labels (-100 for the prompt, for token-level losses) and token type ids (zeros)."""
    if inputs_embeds is None:
        inputs_embeds = word_embeddings(input_ids)
    batch, n = inputs_embeds.shape[0], encoder.num_virtual_tokens
    # Encoder-decoder configs hold 2n virtual tokens (peft's layout); the first n go before the input.
    prompts = encoder(batch)[:, :n].to(inputs_embeds.dtype)
    out = {"inputs_embeds": torch.cat([prompts, inputs_embeds], dim=1)}
    if attention_mask is not None:
        ones = attention_mask.new_ones(batch, n)
        out["attention_mask"] = torch.cat([ones, attention_mask], dim=1)
    if labels is not None:
        out["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1) if extend_labels else labels
    if token_type_ids is not None:
        out["token_type_ids"] = torch.cat([token_type_ids.new_zeros(batch, n), token_type_ids], dim=1)
    return out


def prompt_inputs(encoder: nn.Module, model: nn.Module, causal: bool, input_ids=None, attention_mask=None,
                  inputs_embeds=None, labels=None, token_type_ids=None, position_ids=None, **kwargs) -> dict:
    """The keyword arguments for ``model`` with the encoder's virtual tokens in front of the input (prompt
    tuning, P-tuning); ``causal``: extend ``labels`` over the prompt."""
    if position_ids is not None:
        warnings.warn("position_ids are ignored with prompt tuning (the virtual tokens shift every position)")
    inputs = with_prompts(encoder, model.get_input_embeddings(), input_ids, inputs_embeds, attention_mask, labels,
                          token_type_ids, extend_labels=causal)
    return {**kwargs, **inputs}


def generate_with_prompts(encoder: nn.Module, model: nn.Module, input_ids: Optional[Tensor], *,
                          encoder_decoder: bool, **kwargs) -> Tensor:
    """``model.generate`` from the prompt and input embeddings. Generating from embeddings returns only the
    new tokens; a decoder-only model's result gets its input ids back in front, as without a prompt."""
    inputs = with_prompts(encoder, model.get_input_embeddings(), input_ids, kwargs.pop("inputs_embeds", None),
                          kwargs.pop("attention_mask", None))
    new_tokens = model.generate(**inputs, **kwargs)
    if input_ids is None or encoder_decoder:
        return new_tokens
    return torch.cat([input_ids, new_tokens], dim=1)
