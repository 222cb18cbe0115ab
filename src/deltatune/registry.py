"""Adapter methods by name: each method registers what the core needs to know about it, once.

The core (config, injection, checkpoint, model, tasks, the command line) asks the registry; it never
names a method itself. Each method's package registers itself when it is imported, and
``deltatune/__init__.py`` imports every method package, so the registry is full once ``import deltatune``
has finished. The task wrappers (``PeftModelForCausalLM``, ...) register here too, so that ``model.py``
can pick one without importing ``tasks.py`` (which subclasses its ``PeftModel``).

This module imports only leaf modules (the layer protocol's check), so everything else may import it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Union

from torch import nn


class PeftType(str, enum.Enum):
    """Adapter methods, spelled as in ``adapter_config.json``'s ``peft_type`` field (also importable as
    ``deltatune.PeftType`` and ``deltatune.config.PeftType``)."""

    LORA = "LORA"
    ADALORA = "ADALORA"
    IA3 = "IA3"
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    LOHA = "LOHA"
    LOKR = "LOKR"
    OFT = "OFT"
    VERA = "VERA"
    TRAINABLE_TOKENS = "TRAINABLE_TOKENS"


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
        checkpoint_keys: ``{checkpoint_kind: {role: HF key suffix}}``: for each ``checkpoint_kind`` its
            layers declare, the suffix peft writes after the module path for each tensor role of
            ``layer.adapter_params()``, e.g. ``{"lora": {"lora_A": "lora_A.weight", ...}}``.
        rank_role: The role whose tensors have the adapter's rank as dimension 0 (for reports such as
            ``deltatune inspect``); None if the method has no rank.
        update_and_allocate: See the field's comment.
        prefix: What its adapter tensors' names start with (peft's tuner ``prefix``: ``"lora_"``, ...).
        add_weighted_adapter: Optional ``(peft_model, adapters, weights, adapter_name, combination_type,
            **options) -> None`` behind ``PeftModel.add_weighted_adapter``.
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
    checkpoint_keys: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    rank_role: Optional[str] = None
    #: Optional ``(peft_model, global_step) -> None`` behind ``PeftModel.update_and_allocate``, called
    #: after each optimizer step (e.g. AdaLoRA's importance scores and rank budget).
    update_and_allocate: Optional[Callable] = None
    prefix: Optional[str] = None
    add_weighted_adapter: Optional[Callable] = None
    #: Optional ``(module, parameter name) -> layer``: wraps one named parameter of ``module`` (which may be
    #: such a layer already) for configs with ``target_parameters``.
    wrap_parameter: Optional[Callable] = None
    #: Optional ``(model, config) -> config``: the config as injection uses it for this model (e.g. a default
    #: target found in the model); the stored config is not changed.
    prepare_config: Optional[Callable] = None
    #: Optional ``(model, target names) -> more names``: modules to adapt as well (e.g. output heads tied to
    #: a targeted embedding).
    extra_targets: Optional[Callable] = None
    #: Optional ``(model, config, adapter_name, autocast_adapter_dtype, device) -> names``: layers of another
    #: kind the adapter adds after its own (LoRA's ``trainable_token_indices``), within the same undo.
    attach: Optional[Callable] = None
    #: Names of tensors an adapter holds once per model rather than in a layer (VeRA's shared projections
    #: ``vera_A``, ``vera_B``). peft saves them from its tuner model: keyed ``base_model.<name>`` in a PeftModel's
    #: files (``<name>`` for a bare adapted model).
    shared_names: tuple[str, ...] = ()
    #: Optional ``(model, adapter_name) -> {name: tensor}``: the live shared tensors of one adapter of
    #: ``model`` that go into its checkpoint (names from ``shared_names``; empty if it has none or saves none).
    shared_tensors: Optional[Callable] = None
    #: Optional ``(model, adapter_name, {name: tensor}) -> apply``: check a checkpoint's shared tensors for one
    #: adapter (ValueError naming the problem) and return the no-argument function that puts them in place;
    #: loading calls it only after every other checkpoint tensor has passed its checks (all-or-nothing).
    load_shared_tensors: Optional[Callable] = None


@dataclass(frozen=True)
class PromptMethod:
    """A prompt-learning method: no layers are wrapped; a prompt encoder (one per adapter, held by the
    PeftModel as ``prompt_encoder[name]``) supplies virtual tokens to the forward call.

    Attributes:
        peft_type: The method's ``peft_type``.
        config_cls: Its config dataclass.
        encoder_cls: ``(config, word_embeddings) -> nn.Module`` with ``adapter_params()`` and
            ``checkpoint_kind``.
        model_inputs: ``(encoder, model, causal, **forward_kwargs) -> dict``: the keyword arguments for
            the base model's forward with the virtual tokens added (``causal``: extend ``labels`` over them).
        generate: ``(encoder, model, input_ids, *, encoder_decoder, **generate_kwargs) -> token ids``: the
            base model's ``generate`` with the virtual tokens, returning what it returns without them.
        task_types: The ``TaskType`` values (None: a plain model) the method supports.
        checkpoint_keys: The root-level keys (no module path) its files hold, e.g. ``prompt_embeddings``.
    """

    peft_type: PeftType
    config_cls: type
    encoder_cls: type
    model_inputs: Callable[..., dict]
    generate: Callable
    task_types: tuple = ()
    checkpoint_keys: tuple[str, ...] = ()


_METHODS: dict[PeftType, Union[Method, PromptMethod]] = {}
_TASK_MODELS: dict[str, type] = {}


def register(method):
    if isinstance(method, Method):  # a layer class missing an AdapterLayer member fails here, named
        from .adapter_layer import check_layer_class  # (a leaf: imports torch and quant.bnb only)
        check_layer_class(method.layer_cls)
    _METHODS[method.peft_type] = method
    return method


def method_hook(peft_config: Mapping, names, hook: str) -> Callable:
    """The ``hook`` field (e.g. ``update_and_allocate``) of the method of the first of adapters ``names``
    (in ``peft_config``: name -> config) whose method registers one; a ValueError naming the methods that
    do otherwise."""
    for name in names:
        if name in peft_config:
            found = getattr(get_method(peft_config[name].peft_type), hook, None)
            if found is not None:
                return found
    having = sorted(m.peft_type.value for m in _METHODS.values() if getattr(m, hook, None) is not None)
    raise ValueError(f"{hook} needs adapters of a method that has it ({having}); got {list(names)}")


def get_method(peft_type):
    """The registered method for a ``PeftType`` (or its string value)."""
    try:
        key = PeftType(peft_type)
        return _METHODS[key]
    except (ValueError, KeyError):
        known = sorted(m.value for m in _METHODS)
        raise ValueError(f"unknown or unsupported peft_type {peft_type!r}; deltatune supports {known}") from None


def registered_methods() -> list[Union[Method, PromptMethod]]:
    """Every registered method, in registration order."""
    return list(_METHODS.values())


def adapter_layer_types() -> tuple[type, ...]:
    return tuple(m.layer_cls for m in _METHODS.values() if isinstance(m, Method))


def checkpoint_suffixes(checkpoint_kind: str) -> Mapping[str, str]:
    """``{role: HF key suffix}`` for layers of one ``checkpoint_kind`` (see :attr:`Method.checkpoint_keys`)."""
    for method in _METHODS.values():
        if isinstance(method, Method) and checkpoint_kind in method.checkpoint_keys:
            return method.checkpoint_keys[checkpoint_kind]
    raise KeyError(f"no registered method declares checkpoint_kind {checkpoint_kind!r}")


def adapter_key_suffixes() -> list[str]:
    """Every HF key suffix of an adapter layer's tensor, longest first (so ``lora_A.weight`` is tried
    before ``lora_A``)."""
    found = {s for m in _METHODS.values() if isinstance(m, Method) for kind in m.checkpoint_keys.values()
             for s in kind.values()}
    return sorted(found, key=lambda s: (-len(s), s))


def shared_tensor_names() -> list[str]:
    """Every method's ``shared_names`` (see :attr:`Method.shared_names`)."""
    return sorted({n for m in _METHODS.values() if isinstance(m, Method) for n in m.shared_names})


def shared_tensor_hooks() -> list[Method]:
    """The methods whose adapters may hold shared tensors (``shared_tensors`` and ``load_shared_tensors``
    set)."""
    return [m for m in _METHODS.values() if isinstance(m, Method) and m.shared_tensors is not None]


def prompt_checkpoint_keys() -> list[str]:
    """The root-level checkpoint keys of every prompt-learning method."""
    return sorted({k for m in _METHODS.values() if isinstance(m, PromptMethod) for k in m.checkpoint_keys})


def rank_key_suffixes() -> list[str]:
    """The HF key suffixes of the tensors whose dimension 0 is an adapter's rank."""
    found = {kind[m.rank_role] for m in _METHODS.values() if isinstance(m, Method) and m.rank_role
             for kind in m.checkpoint_keys.values() if m.rank_role in kind}
    return sorted(found, key=lambda s: (-len(s), s))


def register_task_model(task_type: str, cls: type) -> type:
    """Make ``cls`` the PeftModel wrapper for ``task_type`` (a ``TaskType`` or its string value)."""
    _TASK_MODELS[getattr(task_type, "value", task_type)] = cls
    return cls


def task_model(task_type) -> Optional[type]:
    """The wrapper registered for ``task_type``; None for ``task_type=None`` (a plain PeftModel)."""
    if task_type is None:
        return None
    key = getattr(task_type, "value", task_type)
    if key not in _TASK_MODELS:
        raise ValueError(f"no PeftModel wrapper for task_type {task_type!r}; known: {sorted(_TASK_MODELS)}")
    return _TASK_MODELS[key]
