"""Which tensors belong to an adapter, found on the modules that hold them; and which of them train.

An adapter's tensors are its layers' declared tensors (``layer.adapter_params(name)``), the tensors its
method holds once per model (``registry.Method.shared_tensors``: VeRA's saved projections), its prompt
encoder's, its modules_to_save copies (parameters and buffers) and, per its ``bias`` setting, base
biases. Both trainability (:func:`activate`) and checkpoints (``checkpoint.keys``, which only renames the
layer tensors to peft's key names) read them from here, so the two always agree.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from torch import Tensor, nn

from . import injection
from .host import AdapterHost
from .modules_to_save import ModulesToSaveWrapper
from .registry import adapter_layer_types, shared_tensor_hooks

#: ``(module_name, layer, role) -> key`` for a layer's adapter tensor.
LayerKey = Callable[[str, nn.Module, str], str]


def _role_key(name: str, layer: nn.Module, role: str) -> str:
    return f"{name}.{role}"


def named_tensors(model: nn.Module, adapter_name: str, bias: str = "none", peft_layout: bool = False,
                  for_save: bool = False, layer_key: Optional[LayerKey] = None) -> dict[str, Tensor]:
    """The live tensors of one adapter, keyed relative to ``model``.

    Args:
        model: A model with adapter layers (or a PeftModel, whose prompt encoders count too).
        adapter_name: Which adapter.
        bias: ``"none"``, ``"<method>_only"`` (``"lora_only"``, ``"oft_only"``, ``"vera_only"``: the base
            biases of every adapted layer) or ``"all"`` (every module's bias).
        peft_layout: With ``bias="all"``, also list the biases inside modules_to_save wrappers under
            both of peft's names (so saved files carry the same key set as peft's).
        for_save: Take what a layer saves rather than what it trains (AdaLoRA keeps only its unpruned
            triplets).
        layer_key: Names a layer's tensor; default ``<module>.<role>`` (e.g. ``q_proj.lora_A``).
    """
    layer_key = layer_key or _role_key
    out: dict[str, Tensor] = {}
    for name, layer in injection.adapter_layers(model):
        if adapter_name in layer.adapters:
            params = layer.saved_params(adapter_name) if for_save and hasattr(layer, "saved_params") \
                else layer.adapter_params(adapter_name)
            for role, tensor in params.items():
                out[layer_key(name, layer, role)] = tensor
        # As in peft, "lora_only" (any "<method>_only") means the biases of every adapted layer, whichever
        # adapter it holds.
        if bias.endswith("_only") and getattr(layer.base_layer, "bias", None) is not None:
            out[_bias_key(name, layer, adapter_name)] = layer.base_layer.bias
    out.update(shared_tensors(model, adapter_name))
    prompts = getattr(model, "prompt_encoder", None)
    if isinstance(prompts, nn.ModuleDict) and adapter_name in prompts:
        out.update(prompts[adapter_name].adapter_params())  # root-level keys, as peft saves them
    for name, wrapper in injection.saved_module_wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            for key, tensor in wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                out[f"{name}.{key}"] = tensor
    if bias == "all":
        out.update(_all_biases(model, adapter_name, peft_layout))
    return out


def shared_key_prefix(model: nn.Module) -> str:
    """Where a method's shared tensors are keyed: on the tuner model, as peft keys them (``base_model.``) in a
    PeftModel (any object whose ``base_model`` is an :class:`~deltatune.host.AdapterHost`), at the root of a
    bare adapted model."""
    return "base_model." if isinstance(getattr(model, "base_model", None), AdapterHost) else ""


def shared_tensors(model: nn.Module, adapter_name: str) -> dict[str, Tensor]:
    """The tensors adapter ``adapter_name`` holds once per model (``registry.Method.shared_tensors``), keyed
    ``<shared_key_prefix><name>`` (e.g. ``base_model.vera_A``)."""
    prefix = shared_key_prefix(model)
    return {prefix + name: tensor for method in shared_tensor_hooks()
            for name, tensor in method.shared_tensors(model, adapter_name).items()}


def _bias_key(name: str, layer: nn.Module, adapter_name: str) -> str:
    """A base bias is keyed as the adapter alone would see it: ``x.base_layer.bias`` if this adapter
    wraps the layer, ``x.bias`` if only other adapters do (so the file loads on its own, in peft too)."""
    return f"{name}.base_layer.bias" if adapter_name in layer.adapters else f"{name}.bias"


def _all_biases(module: nn.Module, adapter_name: str, peft_layout: bool, prefix: str = "") -> dict[str, Tensor]:
    """Every module's own ``bias`` parameter. A modules_to_save copy is saved whole already; peft
    additionally lists ``<name>.original_module.bias`` and ``<name>.modules_to_save.bias``."""
    out = {}
    if isinstance(module, adapter_layer_types()) and adapter_name not in module.adapters:
        return _all_biases(module.base_layer, adapter_name, peft_layout, prefix)
    if isinstance(module, ModulesToSaveWrapper):
        if peft_layout:
            out.update(_all_biases(module.original_module, adapter_name, False, prefix + "original_module."))
            if adapter_name in module.modules_to_save:
                copy = module.modules_to_save[adapter_name]
                out.update(_all_biases(copy, adapter_name, False, prefix + "modules_to_save."))
        return out
    if module._parameters.get("bias") is not None:
        out[prefix + "bias"] = module._parameters["bias"]
    for name, child in module.named_children():
        out.update(_all_biases(child, adapter_name, peft_layout, f"{prefix}{name}."))
    return out


def activate(model: nn.Module, names: Sequence[str], configs: dict) -> None:
    """Run adapters ``names`` in every layer and saved-module wrapper of ``model``; freeze everything
    else, and make the named adapters' tensors (per their ``bias`` setting) trainable unless their config
    is in inference mode.

    Args:
        model: The adapted model (not the PeftModel: prompt encoders are switched by the PeftModel).
        names: The adapters to run.
        configs: ``{adapter name: PeftConfig}`` for at least ``names``.
    """
    for _, module in list(injection.adapter_layers(model)) + list(injection.saved_module_wrappers(model)):
        module.set_active(names)
    injection.freeze(model)
    for name in names:
        config = configs[name]
        if config.inference_mode:
            continue
        for tensor in named_tensors(model, name, getattr(config, "bias", "none")).values():
            if isinstance(tensor, nn.Parameter) and tensor.is_floating_point():
                tensor.requires_grad_(True)


__all__ = ["activate", "named_tensors", "shared_key_prefix", "shared_tensors"]
