"""Layer replication (``LoraConfig.layer_replication``): stack decoder layers again, sharing weights.

``[[0, 4], [2, 5]]`` turns layers ``0..4`` into ``[0, 1, 2, 3, 2, 3, 4]``. Every position becomes its own
module object whose parameters and buffers *are* the original layer's (no copy), so adapters injected
afterwards are per position while the base weights exist once.

Nothing is recorded on the model about a replication: the rebuilt stack itself shows it (positions that
share parameter tensors), which is how a second adapter with the same map finds the work done. Undoing a
replication is :class:`deltatune.injection.Undo`'s job; :class:`StackState` is the part of it that lies
outside the module tree.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from torch import nn

_CONTAINERS = ("layers", "h", "layer", "block", "blocks")
#: The config fields a replication rewrites.
_CONFIG_FIELDS = ("num_hidden_layers", "layer_types")


def find_layer_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """``(parent, attribute, ModuleList)`` of the decoder/encoder layer stack."""
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, module in model.named_modules():
        for attr in _CONTAINERS:
            child = module._modules.get(attr)
            if isinstance(child, nn.ModuleList) and (expected is None or len(child) == expected):
                return module, attr, child
    raise ValueError("layer_replication: could not find the model's stack of layers (an nn.ModuleList named "
                     f"one of {list(_CONTAINERS)} with config.num_hidden_layers entries)")


def shared_clone(layer: nn.Module) -> nn.Module:
    """A structural copy of ``layer`` whose parameters and buffers are the very same tensors."""
    memo = {id(t): t for t in list(layer.parameters()) + list(layer.buffers())}
    return copy.deepcopy(layer, memo)


def layer_order(layer_map: Sequence[Sequence[int]]) -> list[int]:
    """The original layer index at each position of the stack ``layer_map`` builds."""
    return [i for start, end in layer_map for i in range(start, end)]


def _sharing(layers: Sequence[nn.Module]) -> list[int]:
    """For each position, the first position holding one of its parameter tensors (itself if none)."""
    owner: dict[int, int] = {}
    first = []
    for position, layer in enumerate(layers):
        ids = [id(p) for p in layer.parameters()]
        first.append(min((owner[i] for i in ids if i in owner), default=position))
        for i in ids:
            owner.setdefault(i, position)
    return first


def _is_built_by(layers: nn.ModuleList, layer_map: Sequence[Sequence[int]]) -> bool:
    """Whether ``layers`` already is the stack ``layer_map`` builds.

    Its positions must share parameters exactly where the map repeats a layer. A map that repeats no
    layer leaves no trace, so it counts as built only where it could not be applied again (it reaches
    past the end of the stack); otherwise it is applied again, which changes nothing for the maps that
    keep the layers in order (``[[0, 2], [2, 4]]``, ``[[0, 3]]``).
    """
    order = layer_order(layer_map)
    if len(order) != len(layers) or _sharing(layers) != [order.index(i) for i in order]:
        return False
    return len(set(order)) < len(order) or max(end for _, end in layer_map) > len(layers)


def replicate_layers(model: nn.Module, layer_map: Sequence[Sequence[int]]) -> None:
    """Rebuild the layer stack per ``layer_map``, unless it already is that stack (a second adapter with
    the same map). A stack that another map replicated is refused, as is a range outside the stack.

    The model is changed in place and nothing else is kept: a caller that may have to go back takes a
    :class:`deltatune.injection.Undo` first.
    """
    parent, attr, layers = find_layer_list(model)
    if _is_built_by(layers, layer_map):
        return
    n = len(layers)
    if any(p != i for i, p in enumerate(_sharing(layers))):
        raise ValueError(f"layer_replication={[list(s) for s in layer_map]}: the model's layers already share "
                         "weights (replicated by another layer_replication map?); all adapters of one model "
                         "must use the same map")
    for span in layer_map:
        if len(span) != 2 or not 0 <= span[0] < span[1] <= n:
            raise ValueError(f"layer_replication range {list(span)} is not a [start, end) range within 0..{n}")
    order = layer_order(layer_map)
    seen, new = set(), []
    for index in order:
        new.append(layers[index] if index not in seen else shared_clone(layers[index]))
        seen.add(index)
    for position, layer in enumerate(new):
        for m in layer.modules():
            if "layer_idx" in vars(m):  # the key/value cache is indexed by it
                m.layer_idx = position
    config = getattr(model, "config", None)
    if hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(new)
    if isinstance(getattr(config, "layer_types", None), list) and len(config.layer_types) == n:
        config.layer_types = [config.layer_types[i] for i in order]
    setattr(parent, attr, nn.ModuleList(new))


_ABSENT = object()


@dataclass
class StackState:
    """What a replication changes besides the module tree: every ``layer_idx`` and the config's
    ``num_hidden_layers`` / ``layer_types`` (the objects themselves: a replication assigns new values,
    it never mutates the old ones).

    Attributes:
        layer_idx: ``(module, layer_idx)`` of every module of the model that has one.
        config: The model's ``config`` (None if it has none).
        fields: The config fields' values (``_ABSENT`` where the config has no such field).
    """

    layer_idx: list[tuple[nn.Module, Any]]
    config: Optional[Any]
    fields: dict[str, Any]

    @classmethod
    def capture(cls, model: nn.Module) -> "StackState":
        config = getattr(model, "config", None)
        return cls(
            layer_idx=[(m, vars(m)["layer_idx"]) for m in model.modules() if "layer_idx" in vars(m)],
            config=config,
            fields={k: getattr(config, k, _ABSENT) for k in _CONFIG_FIELDS} if config is not None else {},
        )

    def restore(self) -> None:
        for module, index in self.layer_idx:
            module.layer_idx = index
        for key, value in self.fields.items():
            if value is not _ABSENT and getattr(self.config, key, _ABSENT) is not value:
                setattr(self.config, key, value)
