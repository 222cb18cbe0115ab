"""Merging adapters into a model's base weights, all layers or none, and subtracting them again.

Each adapter layer merges itself; this module does it for every layer of a model: shared base weights
are given their own copy first, and a layer that fails (``safe_merge``: a NaN/inf weight) undoes the
layers already merged in the same call.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from . import injection


def merge_adapters(model: nn.Module, names: Sequence[str], safe_merge: bool = False) -> None:
    """Add the deltas of adapters ``names`` into the base weights of every layer holding one of them.

    Args:
        model: The adapted model.
        names: The adapters to merge (layers where they are merged already are left alone).
        safe_merge: Check every new weight for NaN/inf before it is written.

    Raises:
        Whatever a layer's merge raises; the layers merged before it in this call are unmerged first.
    """
    layers = [layer for _, layer in injection.adapter_layers(model)
              if any(n in layer.adapters and n not in layer.merged_adapters for n in names)]
    injection.own_base_weights(model, layers)
    done = []
    try:
        for layer in layers:
            before = len(layer.merged_adapters)
            layer.merge(names, safe=safe_merge)
            if len(layer.merged_adapters) > before:
                done.append(layer)
    except Exception:
        for layer in done:
            layer.unmerge()
        raise


def unmerge_all(model: nn.Module) -> None:
    """Subtract every merged adapter again, restoring the base weights."""
    for _, layer in injection.adapter_layers(model):
        layer.unmerge()


def has_merged(model: nn.Module) -> bool:
    """Whether any adapter layer of ``model`` holds a merged adapter."""
    return any(layer.merged_adapters for _, layer in injection.adapter_layers(model))


__all__ = ["has_merged", "merge_adapters", "unmerge_all"]
