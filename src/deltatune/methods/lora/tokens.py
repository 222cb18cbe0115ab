"""LoRA's ``trainable_token_indices``: listed rows of embeddings train beside the low-rank pairs, as peft does.

The rows are the trainable-tokens method's layers (:mod:`deltatune.methods.trainable_tokens`), under LoRA's
own checkpoint kind: peft writes them as ``<embedding>.token_adapter.trainable_tokens_delta`` in a LoRA
adapter file, and only the embedding's (an output head tied to it shares the very rows, not saved twice).
"""

from __future__ import annotations

from ..trainable_tokens import TrainableTokensLayer, attach_token_rows


class LoraTokenRows(TrainableTokensLayer):
    """Token rows held for a LoRA adapter (checkpoint kind ``lora_token``); a tied head saves nothing."""

    checkpoint_kind = "lora_token"

    def adapter_params(self, name: str) -> dict:
        return {} if self.is_tied(name) else super().adapter_params(name)


#: Key suffix of the rows in a LoRA adapter file (registered with LoRA's other checkpoint keys).
CHECKPOINT_KEYS = {"lora_token": {"trainable_tokens_delta": "token_adapter.trainable_tokens_delta"}}


def attach(model, config, adapter_name: str, autocast_adapter_dtype: bool = True, device=None) -> list[str]:
    """LoRA's ``attach`` hook: the rows ``config.trainable_token_indices`` names (a list: the input
    embedding; a dict: per embedding), tied heads following; their module names."""
    spec = getattr(config, "trainable_token_indices", None)
    if not spec:
        return []
    return attach_token_rows(model, spec, adapter_name, layer_cls=LoraTokenRows,
                             autocast_adapter_dtype=autocast_adapter_dtype, device=device)
