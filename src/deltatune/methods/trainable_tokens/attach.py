"""Token rows for another method's adapter: what LoRA's ``trainable_token_indices`` calls.

peft's LoRA trains listed rows of embeddings beside its low-rank pairs (``trainable_token_indices``: a list
for the input embedding, or ``{module name: ids}``), saved as ``<module>.token_adapter.trainable_tokens_delta``
(only the embedding's: a tied head's rows are the embedding's and are not written twice). The layers are
this package's; the calling method gives them its own ``checkpoint_kind`` by subclassing
:class:`~.layer.TrainableTokensLayer`, and registers that kind's key suffix in its ``Method.checkpoint_keys``.
"""

from __future__ import annotations

from typing import Mapping, Sequence, Union

from torch import nn

from ...injection import set_submodule
from ...targeting import TargetError
from .layer import TrainableTokensLayer
from .targets import add_token_rows, input_embedding_name, tied_heads


def token_targets(model: nn.Module, spec: Union[Sequence[int], Mapping[str, Sequence[int]]]) -> dict[str, list[int]]:
    """``{module name: ids}`` from a ``trainable_token_indices`` value: a list means the input embedding; a
    dict's keys are names or ``.``-suffixes of modules (each must match exactly one module)."""
    if not isinstance(spec, Mapping):
        return {input_embedding_name(model): list(spec)}
    names = [n for n, _ in model.named_modules() if n]
    out = {}
    for key, ids in spec.items():
        found = [n for n in names if n == key or n.endswith("." + key)]
        found = [n for n in found if not any(n.startswith(f + ".") for f in found)]  # (not inside a match)
        if len(found) != 1:
            raise TargetError(f"trainable_token_indices key {key!r} matches {len(found)} modules "
                              f"{found[:5]}; it must name exactly one embedding")
        out[found[0]] = list(ids)
    return out


def attach_token_rows(model: nn.Module, spec: Union[Sequence[int], Mapping[str, Sequence[int]]], adapter_name: str,
                      layer_cls: type = TrainableTokensLayer, init_weights: bool = True,
                      autocast_adapter_dtype: bool = True, device=None) -> list[str]:
    """Give adapter ``adapter_name`` trainable rows in the embeddings ``spec`` names, and make the linear
    heads sharing their weights (tied word embeddings) follow them.

    Modules are wrapped in ``layer_cls`` (a :class:`~.layer.TrainableTokensLayer` subclass) unless they
    already are; a tied head gets the embedding's own rows (``layer.is_tied(adapter_name)``: a method that
    saves only the embedding's rows, as peft's LoRA does, leaves those out of its ``adapter_params``).
    Changes the model in place: call it under the caller's :class:`~deltatune.injection.Undo`.

    Returns:
        The names of the modules that now hold the adapter's rows, embeddings first.
    """
    targets = token_targets(model, spec)
    names = list(targets) + [h for h in tied_heads(model, list(targets)) if h not in targets]
    layers = {}
    for name in names:
        module = model.get_submodule(name)
        layer = module if isinstance(module, TrainableTokensLayer) else layer_cls(module)
        if adapter_name in layer.adapters:
            raise ValueError(f"module {name!r} already has trainable token rows for adapter {adapter_name!r}")
        layers[name] = layer
    for name, layer in layers.items():
        if layer is not model.get_submodule(name):
            set_submodule(model, name, layer)
        ids, embedding = targets.get(name), None
        if ids is None:  # a tied head: the rows of the embedding it shares its weight with
            tie = next(e for e in targets if layers[e].base_layer.weight is layer.base_layer.weight)
            ids, embedding = targets[tie], layers[tie]
        add_token_rows(layer, adapter_name, ids, init_weights, autocast_adapter_dtype, device, embedding=embedding)
    return names
