"""Layer replication (``LoraConfig.layer_replication``): stack decoder layers again, sharing weights.

``[[0, 4], [2, 5]]`` turns layers ``0..4`` into ``[0, 1, 2, 3, 2, 3, 4]``. Every position becomes its own
module object whose parameters and buffers *are* the original layer's (no copy), so adapters injected
afterwards are per position while the base weights exist once.
"""

from __future__ import annotations

import copy
from typing import Sequence

from torch import nn

_CONTAINERS = ("layers", "h", "layer", "block", "blocks")


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


def replicate_layers(model: nn.Module, layer_map: Sequence[Sequence[int]]) -> callable:
    """Rebuild the layer stack per ``layer_map``; returns a function that undoes it."""
    parent, attr, layers = find_layer_list(model)
    n = len(layers)
    for span in layer_map:
        if len(span) != 2 or not 0 <= span[0] < span[1] <= n:
            raise ValueError(f"layer_replication range {list(span)} is not a [start, end) range within 0..{n}")
    order = [i for start, end in layer_map for i in range(start, end)]
    seen, new = set(), []
    for position, index in enumerate(order):
        layer = layers[index] if index not in seen else shared_clone(layers[index])
        seen.add(index)
        new.append(layer)
    old_idx = {id(m): m.layer_idx for layer in new for m in layer.modules() if hasattr(m, "layer_idx")}
    for position, layer in enumerate(new):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):  # the key/value cache is indexed by it
                m.layer_idx = position
    config = getattr(model, "config", None)
    saved = {k: copy.copy(getattr(config, k, None)) for k in ("num_hidden_layers", "layer_types")}
    if config is not None:
        config.num_hidden_layers = len(new)
        if isinstance(getattr(config, "layer_types", None), list) and len(config.layer_types) == n:
            config.layer_types = [config.layer_types[i] for i in order]
    setattr(parent, attr, nn.ModuleList(new))

    def undo() -> None:
        setattr(parent, attr, layers)
        for layer in layers:
            for m in layer.modules():
                if id(m) in old_idx:
                    m.layer_idx = old_idx[id(m)]
        for k, v in saved.items():
            if config is not None and v is not None:
                setattr(config, k, v)

    return undo
