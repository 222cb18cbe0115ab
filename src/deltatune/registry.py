"""Adapter methods by name: each method registers its config class and layer hooks once.

The core (injection, checkpoint, model) asks the registry; it never names a method itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from .config import PeftType


@dataclass(frozen=True)
class Method:
    """What the core needs to know about one layer-based adapter method.

    Attributes:
        peft_type: The method's ``peft_type``.
        config_cls: Its config dataclass.
        layer_cls: Base class of its adapter layers (to find them in a model).
        wrap: ``base module -> fresh adapter layer`` (TypeError for unsupported modules).
        add_adapter: ``(layer, module_name, adapter_name, config, autocast_adapter_dtype, device=None)
            -> None``: create one adapter in a layer (on the base weight's device; ``device="meta"``:
            empty tensors, for loading by assignment).
        is_linear: Which modules ``"all-linear"`` selects.
        adjust_output: See the field's comment.
    """

    peft_type: PeftType
    config_cls: type
    layer_cls: type
    wrap: Callable[[nn.Module], nn.Module]
    add_adapter: Callable
    is_linear: Callable[[nn.Module], bool]
    #: Optional ``(peft_model, outputs, config, adapter_name) -> outputs`` run after each forward
    #: (e.g. AdaLoRA's orthogonality penalty added to the training loss).
    adjust_output: Optional[Callable] = None


@dataclass(frozen=True)
class PromptMethod:
    """A prompt-learning method: no layers are wrapped; a prompt encoder (one per adapter, held by the
    PeftModel as ``prompt_encoder[name]``) supplies virtual tokens to the forward call.

    Attributes:
        encoder_cls: ``(config, word_embeddings) -> nn.Module`` with ``adapter_params()`` and
            ``checkpoint_kind``.
    """

    peft_type: PeftType
    config_cls: type
    encoder_cls: type


_METHODS: dict[PeftType, Method | PromptMethod] = {}


def register(method):
    _METHODS[method.peft_type] = method
    return method


def get_method(peft_type):
    """The registered method for a ``PeftType`` (or its string value)."""
    from . import methods  # noqa: F401  (importing the package registers every method)

    try:
        key = PeftType(peft_type)
        return _METHODS[key]
    except (ValueError, KeyError):
        known = sorted(m.value for m in _METHODS)
        raise ValueError(f"unknown or unsupported peft_type {peft_type!r}; deltatune supports {known}") from None


def adapter_layer_types() -> tuple[type, ...]:
    from . import methods  # noqa: F401

    return tuple(m.layer_cls for m in _METHODS.values() if isinstance(m, Method))
