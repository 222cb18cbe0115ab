"""bitsandbytes ``Linear4bit`` (NF4/FP4, optional double quantization) and ``Linear8bitLt`` bases.

Adapter layers wrap these modules like any other base: they call ``base_layer(x)`` and add their own
float32 path. What needs the quantized weight itself (merging, the DoRA norm) goes through
:func:`dequantize_weight` and :func:`replace_weight`, which adapter layers reach through
:mod:`deltatune.adapter_layer` (``logical_shape``, ``read_weight``, ``write_weight``): one entry point
for quantized and plain bases alike. Layers are recognised by class name, so this module imports
bitsandbytes only when such a layer exists.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor, nn

_KINDS = {"Linear4bit": "4bit", "Linear8bitLt": "8bit", "Params4bit": "4bit", "Int8Params": "8bit"}


def _bnb():
    try:
        import bitsandbytes
    except ImportError:
        raise ImportError("this model has bitsandbytes-quantized layers; install the quant extra: "
                          "pip install 'deltatune[quant]'") from None
    return bitsandbytes


def quant_kind(obj) -> Optional[str]:
    """``"4bit"``/``"8bit"`` for bitsandbytes layers or parameters, else None (no import needed)."""
    cls = type(obj)
    if not cls.__module__.startswith("bitsandbytes"):
        return None
    return next((kind for c in cls.__mro__ if (kind := _KINDS.get(c.__name__))), None)


def is_quantized(module: nn.Module) -> bool:
    return quant_kind(module) is not None


def dequantize_weight(layer: nn.Module) -> Tensor:
    """The layer's weight as a float32 ``(out, in)`` tensor."""
    weight, kind = layer.weight, quant_kind(layer)
    if kind == "4bit":
        F = _bnb().functional
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks 4-bit weights for its CPU inference kernel after the first eval
            # forward; dequantizing that layout directly gives a scrambled matrix, so unpack first.
            data, state = F._convert_weight_packed_for_cpu_inverse(data, state)
        return F.dequantize_4bit(data, state).float()
    if kind == "8bit":
        scb = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
        return weight.data.float() * (scb.float()[:, None] / 127.0)
    return weight.float()


def replace_weight(layer: nn.Module, new: Tensor) -> None:
    """Quantize ``new`` (float ``(out, in)``) with the layer's own settings and make it the weight."""
    bnb, weight, kind = _bnb(), layer.weight, quant_kind(layer)
    device = weight.device
    if kind == "4bit":
        param = bnb.nn.Params4bit(new.to("cpu", weight.quant_state.dtype), requires_grad=False,
                                  quant_type=weight.quant_type, compress_statistics=weight.compress_statistics,
                                  blocksize=weight.blocksize, quant_storage=weight.quant_storage)
        layer.weight = param.to(device)
    elif kind == "8bit":
        param = bnb.nn.Int8Params(new.to("cpu", torch.float16), requires_grad=False, has_fp16_weights=False)
        layer.weight = param.to(device)
        layer.state.reset_grads()
        layer.state.CB, layer.state.SCB = None, None
    else:
        raise TypeError(f"{type(layer).__name__} is not a bitsandbytes layer")


def warn_requantize(layer: nn.Module) -> None:
    warnings.warn(f"merging into a {quant_kind(layer)} {type(layer).__name__} dequantizes, merges and quantizes "
                  "again: rounding changes the outputs slightly. For an exact merge, load the adapter onto a "
                  "full-precision copy of the base model and merge there.", stacklevel=4)


def param_numel(p: Tensor) -> int:
    """Number of weights a parameter holds: packed 4-bit storage holds two (or more) per element."""
    if quant_kind(p) == "4bit":
        return p.numel() * p.element_size() * 2
    return p.numel()


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: Optional[dict] = None) -> nn.Module:
    """Make a 4/8-bit model ready for adapter training, in place; returns it.

    Freezes every parameter, upcasts small non-quantized float16/bfloat16 parameters (norm weights and
    biases: 1-D tensors) to float32 for stable training, makes the inputs require grad so checkpointed
    blocks pass gradients to adapters, and enables gradient checkpointing.
    """
    for p in model.parameters():
        p.requires_grad_(False)
        if p.dim() == 1 and p.dtype in (torch.float16, torch.bfloat16) and quant_kind(p) is None:
            p.data = p.data.float()
    if use_gradient_checkpointing:
        enable = getattr(model, "enable_input_require_grads", None)
        if callable(enable):
            enable()
        kwargs = {"use_reentrant": True, **(gradient_checkpointing_kwargs or {})}
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
