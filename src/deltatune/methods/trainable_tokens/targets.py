"""What trainable tokens adapt in a model: the input embedding by default, and every output head that
shares its weight (tied word embeddings).

Two kinds of functions:

* model-level (they need the model, so the core calls them through the registry's hooks, see
  ``__init__.py``): :func:`resolve_config` fills the default ``target_modules`` on a copy of the config, and
  :func:`tied_heads` names the heads to wrap beside the targeted embeddings;
* layer-level: :func:`add_token_rows` adds one adapter's rows to a layer; a head tied to an embedding is
  given that embedding layer (or follows the one it was tied to before, :func:`~.layer.embedding_of`) and
  uses its rows.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from torch import nn

from ...injection import iter_modules
from .layer import TrainableTokensLayer, embedding_of

#: peft's fallback when a model has no ``get_input_embeddings``.
DEFAULT_EMBEDDING_NAME = "embed_tokens"


def _plain(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, TrainableTokensLayer) else module


def input_embedding_name(model: nn.Module) -> str:
    """The module name of ``model.get_input_embeddings()`` (as the core's injection names modules: the
    inside of adapter layers not entered); ``"embed_tokens"`` where the model has none, as in peft."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get() if callable(get) else None
    except NotImplementedError:
        embedding = None
    if embedding is not None:
        for name, module in iter_modules(model):
            if module is embedding or _plain(module) is embedding:
                return name
    return DEFAULT_EMBEDDING_NAME


def resolve_config(model: nn.Module, config):
    """``config`` itself if its ``target_modules`` is set, else a copy naming the model's input embedding
    (the copy is what gets saved: peft writes the resolved name too). ``config`` is never changed."""
    if config.target_modules is not None:
        return config
    return dataclasses.replace(config, target_modules=input_embedding_name(model))


def _shares_weight(head: nn.Module, embeddings: list[nn.Module]) -> bool:
    """Whether linear ``head`` (plain, or wrapped) shares, or shared, the weight of one of ``embeddings``."""
    weight = _plain(head).weight
    follows = head._follows if isinstance(head, TrainableTokensLayer) else []
    return any(_plain(e).weight is weight or any(f is e for f in follows) for e in embeddings)


def tied_heads(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules, not among ``names``, whose weight is (or, before a merge gave
    each its own copy, was) the weight of one of the embeddings ``names``: tied output heads, in module order.

    Args:
        model: The model being adapted.
        names: The modules an injection is about to adapt.
    """
    embeddings = [m for m in map(model.get_submodule, names) if isinstance(_plain(m), nn.Embedding)]
    if not embeddings:
        return []
    wanted = set(names)
    return [n for n, m in iter_modules(model)
            if n not in wanted and isinstance(_plain(m), nn.Linear) and _shares_weight(m, embeddings)]


def add_token_rows(layer: TrainableTokensLayer, adapter_name: str, token_indices: Sequence[int],
                   init_weights: bool = True, autocast_adapter_dtype: bool = True, device=None,
                   embedding: Optional[TrainableTokensLayer] = None) -> None:
    """Add adapter ``adapter_name`` to ``layer``: its own rows ``token_indices`` on an embedding or an untied
    head, or, on a linear head tied to ``embedding`` (an adapted embedding layer sharing its weight; default:
    the one the head followed before), that embedding's rows.

    This is the entry point for any method that trains token rows (this one; LoRA's
    ``trainable_token_indices``): call it for the embedding before its tied heads.
    """
    embedding = embedding if embedding is not None else embedding_of(layer)
    tied = embedding.adapters[adapter_name] if embedding is not None and adapter_name in embedding.adapters else None
    layer.add_adapter(adapter_name, token_indices, init_weights=init_weights,
                      autocast_adapter_dtype=autocast_adapter_dtype, device=device, tied=tied)
    if tied is not None:
        layer._follows = [embedding]
