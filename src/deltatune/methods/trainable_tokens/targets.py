"""What trainable tokens adapt in a model: the input embedding by default, and every output head that
shares its weight (tied word embeddings).

Two kinds of functions:

* model-level (they need the model, so the core calls them through the registry's hooks, see
  ``__init__.py``): :func:`resolve_config` fills the default ``target_modules`` on a copy of the config, and
  :func:`tied_heads` names the heads to wrap beside the targeted embeddings;
* layer-level: :func:`remember` and :func:`rows_tied_to` pair a head's layer with the embedding layer whose
  weight it shares, while an injection adds one adapter to both (the embedding comes first in module order).
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Optional, Sequence

from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ...injection import iter_modules
from .layer import TokenRows, TrainableTokensLayer

#: peft's fallback when a model has no ``get_input_embeddings``.
DEFAULT_EMBEDDING_NAME = "embed_tokens"

# base weight -> the embedding layer (weakly: the layer holds the weight) that adapters over it were last
# added to; keyed by identity, since that is what tying is (transformers ties by sharing the Parameter).
_EMBEDDING_OF_WEIGHT: WeakIdKeyDictionary = WeakIdKeyDictionary()


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


def tied_heads(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules, not among ``names``, whose weight *is* the weight of one of the
    embeddings ``names`` (tied output heads), in module order.

    Args:
        model: The model being adapted.
        names: The modules an injection is about to adapt.
    """
    weights = {id(_plain(model.get_submodule(n)).weight) for n in names
               if isinstance(_plain(model.get_submodule(n)), nn.Embedding)}
    if not weights:
        return []
    wanted = set(names)
    return [n for n, m in iter_modules(model)
            if n not in wanted and isinstance(_plain(m), nn.Linear) and id(_plain(m).weight) in weights]


def untied_heads(model: nn.Module, adapter_name: str) -> list[str]:
    """Names of the linear modules sharing the weight of an embedding that adapter ``adapter_name`` adapts
    but computing without its rows (not wrapped, or without that adapter): heads the adapter misses."""
    embeddings = {id(m.base_layer.weight) for _, m in iter_modules(model)
                  if isinstance(m, TrainableTokensLayer) and m._embedding and adapter_name in m.adapters}
    if not embeddings:
        return []
    return [n for n, m in iter_modules(model)
            if isinstance(_plain(m), nn.Linear) and id(_plain(m).weight) in embeddings
            and not (isinstance(m, TrainableTokensLayer) and adapter_name in m.adapters)]


def remember(layer: TrainableTokensLayer) -> None:
    """Record ``layer`` (an embedding's) as the one whose rows heads sharing its weight follow."""
    _EMBEDDING_OF_WEIGHT[layer.base_layer.weight] = weakref.ref(layer)


def rows_tied_to(layer: TrainableTokensLayer, adapter_name: str) -> Optional[TokenRows]:
    """The rows of adapter ``adapter_name`` in the embedding layer whose weight ``layer``'s base (a linear
    head) shares; None when the head's weight is its own, or the embedding has no such adapter."""
    if not isinstance(layer.base_layer, nn.Linear):
        return None
    ref = _EMBEDDING_OF_WEIGHT.get(layer.base_layer.weight)
    embedding = ref() if ref is not None else None
    if embedding is None or embedding.base_layer.weight is not layer.base_layer.weight:
        return None
    return embedding.adapters[adapter_name] if adapter_name in embedding.adapters else None


def add_token_rows(layer: TrainableTokensLayer, adapter_name: str, token_indices: Sequence[int],
                   init_weights: bool = True, autocast_adapter_dtype: bool = True, device=None) -> None:
    """Add adapter ``adapter_name`` to ``layer``: its own rows ``token_indices`` on an embedding, or, on a
    linear head whose weight is an already adapted embedding's, that embedding's rows (tied).

    This is the entry point for any method that trains token rows (this one; LoRA's
    ``trainable_token_indices``): call it for the embedding before its tied heads.
    """
    tied = rows_tied_to(layer, adapter_name)
    layer.add_adapter(adapter_name, token_indices, init_weights=init_weights,
                      autocast_adapter_dtype=autocast_adapter_dtype, device=device, tied=tied)
    if layer._embedding:
        remember(layer)
