"""Trainable tokens: config, layer and pure math, registered as ``PeftType.TRAINABLE_TOKENS``.

Checkpoints hold one tensor per adapted module, ``<module>.trainable_tokens_delta`` (``(k, D)``, the rows
themselves), a tied output head's under its own name with the embedding's values, as peft writes them.

Two steps need the model, not just a layer: the default target (the input embedding) and wrapping the
output heads tied to a targeted embedding. They are :func:`~.targets.resolve_config` and
:func:`~.targets.tied_heads`, the registry's ``prepare_config`` and ``extra_targets`` hooks.

LoRA's ``trainable_token_indices`` reuses the layer through :func:`~.attach.attach_token_rows`.
"""

from __future__ import annotations

from ...injection import adapter_layers
from ...registry import Method, PeftType, register
from .attach import attach_token_rows, token_targets
from .config import TrainableTokensConfig
from .layer import TokenRows, TrainableTokensLayer, embedding_of, wrap_module
from .targets import add_token_rows, input_embedding_name, resolve_config, tied_heads


def _add_adapter(layer: TrainableTokensLayer, module_name: str, adapter_name: str, config: TrainableTokensConfig,
                 autocast_adapter_dtype: bool = True, device=None) -> None:
    if layer._embedding or embedding_of(layer) is not None:
        add_token_rows(layer, adapter_name, config.token_indices, config.init_weights, autocast_adapter_dtype, device)
    else:  # a head: which embedding it is tied to (if any) needs the model, see _tie_heads
        layer._pending[adapter_name] = (config.token_indices, config.init_weights, autocast_adapter_dtype, device)


def _tie_heads(model, config: TrainableTokensConfig, adapter_name: str, autocast_adapter_dtype: bool = True,
               device=None) -> list:
    """The registry's ``attach`` hook, run once the injection's layers are in: each waiting head gets the
    rows of the adapted embedding sharing its weight (tied word embeddings), else rows of its own."""
    layers = [layer for _, layer in adapter_layers(model, TrainableTokensLayer)]
    embeddings = [e for e in layers if e._embedding and adapter_name in e.adapters]
    for head in layers:
        waiting = head._pending.pop(adapter_name, None)
        if waiting is None:
            continue
        ids, init_weights, autocast, dev = waiting
        tie = next((e for e in embeddings if e.base_layer.weight is head.base_layer.weight), None)
        add_token_rows(head, adapter_name, ids, init_weights, autocast, dev, embedding=tie)
    return []


def _is_linear(module) -> bool:
    return False  # ("all-linear" means nothing here: the targets are embeddings)


register(Method(PeftType.TRAINABLE_TOKENS, TrainableTokensConfig, TrainableTokensLayer, wrap_module, _add_adapter,
                _is_linear, checkpoint_keys={"trainable_tokens": {"trainable_tokens_delta": "trainable_tokens_delta"}},
                prefix="trainable_tokens_", prepare_config=resolve_config, extra_targets=tied_heads,
                attach=_tie_heads))

__all__ = ["TrainableTokensConfig", "TrainableTokensLayer", "TokenRows", "add_token_rows", "attach_token_rows",
           "input_embedding_name", "resolve_config", "tied_heads", "token_targets"]
