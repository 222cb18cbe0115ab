"""What the core needs from an adapter layer, and the one way to read and write its base weight.

Every layer-based method (LoRA, (IA)^3, AdaLoRA, ...) wraps a frozen ``base_layer`` in a module that
satisfies :class:`AdapterLayer`. The registry checks each method's layer class with
:func:`check_layer_class` when the method registers, so a class missing a member fails at import time
with a message naming it, instead of with an ``AttributeError`` deep inside a merge or a load.

The base layer may be an ``nn.Linear``, transformers' ``Conv1D`` (weight stored ``(in, out)``), a
convolution, an embedding, or a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``. For the latter the stored
weight is *not* the matrix the layer computes with: 4-bit weights are packed two (or more) per byte into a
``(n, 1)`` tensor, 8-bit weights are int8 with per-row scales. Adapters must be built from the layer's
logical shape and merged through the dequantized weight, which is what :func:`logical_shape`,
:func:`read_weight` and :func:`write_weight` give every method, in one place.
"""

from __future__ import annotations

from typing import ClassVar, Optional, Protocol, Sequence

import torch
from torch import Tensor, nn

from .quant.bnb import dequantize_weight, is_quantized, replace_weight, warn_requantize


class AdapterLayer(Protocol):
    """An adapter layer as the core (injection, checkpoint, model, merging) uses it.

    State (instance attributes; :func:`deltatune.adapter_state.init` creates the first five):

    Attributes:
        checkpoint_kind: Class constant naming the HF key layout of the adapter tensors
            (``"lora"``, ``"ia3"``, ``"adalora"``).
        base_layer: The wrapped, frozen module.
        adapters: ``nn.ModuleDict`` adapter name -> that adapter's module in this layer.
        active: Names of the adapters the forward runs, in order.
        merged_adapters: Names of the adapters folded into the base weight, in merge order (peft's name).
        disabled: True while every adapter is switched off.
        in_features: Logical input size (``x: (..., in_features)``; channels for convolutions,
            ``num_embeddings`` for embeddings), read from :func:`logical_shape`, never from a packed weight.
        out_features: Logical output size.
    """

    checkpoint_kind: ClassVar[str]
    base_layer: nn.Module
    adapters: nn.ModuleDict
    active: list
    merged_adapters: list
    disabled: bool
    in_features: int
    out_features: int

    def set_active(self, names: Sequence[str]) -> None:
        """Run the named adapters this layer has, in this order (others are ignored)."""

    def set_disabled(self, disabled: bool) -> None:
        """Switch every adapter off (True) or back on."""

    def add_adapter(self, name: str, *args, **kwargs) -> None:
        """Create adapter ``name`` (method-specific arguments; ``device="meta"``: empty, to be loaded)."""

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter that is not merged."""

    def adapter_params(self, name: str) -> dict:
        """Adapter ``name``'s tensors by role (``{"lora_A": ..., "lora_B": ...}``), as checkpoints key them."""

    def merge(self, names: Optional[Sequence[str]] = None, safe: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weight; see
        :func:`deltatune.adapter_state.merge_adapters`."""

    def unmerge(self) -> None:
        """Undo every merge, last merged first."""


def _protocol_members() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """``(methods, class constants, instance state)`` as declared by :class:`AdapterLayer` itself (so the
    check can never drift from the declaration)."""
    hints = AdapterLayer.__annotations__
    constants = tuple(n for n, h in hints.items() if "ClassVar" in str(h))
    state = tuple(n for n in hints if n not in constants)
    methods = tuple(n for n, v in vars(AdapterLayer).items() if callable(v) and not n.startswith("_"))
    return methods, constants, state


def check_layer_class(cls: type) -> None:
    """Raise TypeError naming every member of :class:`AdapterLayer` that ``cls`` lacks.

    A class shows its methods and class constants; its instance state (``base_layer``, ``adapters``,
    ``in_features``, ...) is assigned in ``__init__`` and so can only be checked on an instance, by
    :func:`check_layer`. (``isinstance`` against a ``runtime_checkable`` protocol would only test names, on
    instances, and say nothing about which one is missing.)
    """
    methods, constants, _ = _protocol_members()
    missing = [n for n in methods if not callable(getattr(cls, n, None))]
    missing += [n for n in constants if not isinstance(getattr(cls, n, None), str)]
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        missing.insert(0, "nn.Module base class")
    if missing:
        name = getattr(cls, "__qualname__", repr(cls))
        raise TypeError(f"{name} does not implement the AdapterLayer protocol (deltatune.adapter_layer): "
                        f"missing {', '.join(missing)}")


def check_layer(layer: nn.Module) -> None:
    """:func:`check_layer_class` for ``type(layer)``, then ``layer``'s instance state (TypeError naming
    every missing attribute)."""
    check_layer_class(type(layer))
    _, _, state = _protocol_members()
    missing = [n for n in state if not hasattr(layer, n)]
    if missing:
        raise TypeError(f"{type(layer).__qualname__} instance does not implement the AdapterLayer protocol: "
                        f"missing {', '.join(missing)}")


# ---------------------------------------------------------------------------------------- base weight
def logical_shape(base_layer: nn.Module, fan_in_fan_out: bool = False) -> tuple[int, ...]:
    """The base weight's shape as the layer computes with it: ``(out, in, *kernel)``.

    Args:
        base_layer: ``nn.Linear``, ``Conv1D``, ``nn.ConvNd`` (``(out, in / groups, *kernel)``),
            ``nn.Embedding`` (``(num_embeddings, dim)``, as stored) or a bitsandbytes 4/8-bit linear layer.
        fan_in_fan_out: The weight is stored transposed, ``(in, out)`` (transformers' ``Conv1D``).

    Returns:
        ``(out_features, in_features)`` for bitsandbytes layers (their stored 4-bit weight is packed,
        ``(out * in / 2, 1)`` for NF4/FP4 in uint8); otherwise the stored shape, its first two dimensions
        swapped when ``fan_in_fan_out``.
    """
    if is_quantized(base_layer):
        return base_layer.out_features, base_layer.in_features
    shape = tuple(base_layer.weight.shape)
    return (shape[1], shape[0], *shape[2:]) if fan_in_fan_out else shape


def read_weight(base_layer: nn.Module) -> Tensor:
    """The base weight in its stored layout: the parameter itself, or for bitsandbytes layers a float32
    dequantized ``(out, in)`` copy (``W = dequant(Q)``; writing to it changes nothing)."""
    if is_quantized(base_layer):
        return dequantize_weight(base_layer)
    return base_layer.weight


def write_weight(base_layer: nn.Module, new: Tensor) -> None:
    """Make ``new`` (stored layout, any float dtype) the base weight, in place.

    A bitsandbytes layer gets ``new`` quantized again with its own settings (``Q' = quant(new)``), with a
    warning: the rounding to the quantization grid changes outputs slightly.
    """
    if is_quantized(base_layer):
        warn_requantize(base_layer)
        replace_weight(base_layer, new)
    else:
        with torch.no_grad():
            base_layer.weight.copy_(new)
