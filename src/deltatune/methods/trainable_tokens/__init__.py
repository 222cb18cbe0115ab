"""Trainable tokens: config, layer and pure math, registered as ``PeftType.TRAINABLE_TOKENS``.

Checkpoints hold one tensor per adapted module, ``<module>.trainable_tokens_delta`` (``(k, D)``, the rows
themselves), a tied output head's under its own name with the embedding's values, as peft writes them.

Two steps need the model, not just a layer: the default target (the input embedding) and wrapping the
output heads tied to a targeted embedding. They are :func:`~.targets.resolve_config` and
:func:`~.targets.tied_heads`, handed to the core as the registry's ``prepare_config`` and
``extra_targets`` hooks where its :class:`~deltatune.registry.Method` has those fields. Until it has
them, ``target_modules`` must be given, and a tied head must be listed in it beside its embedding: the
first forward refuses an adapted embedding whose tied head computes without its rows (``adjust_output``).

LoRA's ``trainable_token_indices`` reuses the layer through :func:`~.attach.attach_token_rows`.
"""

from __future__ import annotations

import dataclasses
import weakref

from torch import nn

from ...registry import Method, PeftType, register
from .attach import attach_token_rows, token_targets
from .config import TrainableTokensConfig
from .layer import TokenRows, TrainableTokensLayer, wrap_module
from .targets import add_token_rows, input_embedding_name, resolve_config, tied_heads, untied_heads


def _add_adapter(layer: TrainableTokensLayer, module_name: str, adapter_name: str, config: TrainableTokensConfig,
                 autocast_adapter_dtype: bool = True, device=None) -> None:
    add_token_rows(layer, adapter_name, config.token_indices, config.init_weights, autocast_adapter_dtype, device)


def _is_linear(module) -> bool:
    return False  # ("all-linear" means nothing here: the targets are embeddings)


_checked: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


def _refuse_untied_heads(peft_model, outputs, config, adapter_name: str):
    """``adjust_output`` while the core cannot wrap tied heads itself: a head sharing the adapted
    embedding's weight but computing without its rows would give other outputs than peft, silently; raise
    instead (checked once per model and adapter)."""
    done = _checked.setdefault(peft_model, set())
    if adapter_name not in done:
        missed = untied_heads(peft_model.base_model.model, adapter_name)
        if missed:
            raise ValueError(f"trainable tokens adapter {adapter_name!r}: {missed} share the adapted embedding's "
                             "weight (tied word embeddings) but are not adapted; add them to target_modules "
                             f"(e.g. target_modules=[<embedding>, {missed[0]!r}]) so they see the trained rows")
        done.add(adapter_name)
    return outputs


# Hooks the core calls with the model, where its Method declares them (the registry's dataclass decides).
_model_hooks = {"prepare_config": resolve_config, "extra_targets": tied_heads}
_fields = {f.name for f in dataclasses.fields(Method)}
_hooks = {k: v for k, v in _model_hooks.items() if k in _fields}
if "extra_targets" not in _hooks:  # (until then: refuse rather than compute other outputs than peft)
    _hooks["adjust_output"] = _refuse_untied_heads

register(Method(PeftType.TRAINABLE_TOKENS, TrainableTokensConfig, TrainableTokensLayer, wrap_module, _add_adapter,
                _is_linear, checkpoint_keys={"trainable_tokens": {"trainable_tokens_delta": "trainable_tokens_delta"}},
                prefix="trainable_tokens_", **_hooks))

__all__ = ["TrainableTokensConfig", "TrainableTokensLayer", "TokenRows", "add_token_rows", "attach_token_rows",
           "input_embedding_name", "resolve_config", "tied_heads", "token_targets"]
