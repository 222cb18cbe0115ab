"""Generic wrapping and unwrapping of child modules, and freezing. No method-specific logic here.

Injection is all-or-nothing: :func:`inject` takes an :class:`Undo` of the model before changing it, puts
the model back with it if anything fails, and hands it to the caller, whose later steps (modules_to_save,
activating, loading a checkpoint) use it the same way.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Sequence

from torch import Tensor, nn

from .modules_to_save import ModulesToSaveWrapper
from .registry import Method, adapter_layer_types
from .replication import StackState, replicate_layers
from .targeting import TargetError, is_target, matches, no_match_message


def iter_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` under the *original* names: the inside of adapter layers and
    modules_to_save wrappers is not entered (a wrapped layer is reported under its own name)."""
    layers = adapter_layer_types()
    return _walk(model, prefix, layers, layers + (ModulesToSaveWrapper,))


def _walk(model: nn.Module, prefix: str, layers: tuple, stop: tuple) -> Iterator[tuple[str, nn.Module]]:
    for name, child in model.named_children():
        full = f"{prefix}.{name}" if prefix else name
        yield full, child
        if not isinstance(child, stop):
            yield from _walk(child, full, layers, stop)
        if isinstance(child, layers):
            yield from _inner_layers(child, full, layers)


def _inner_layers(layer: nn.Module, full: str, layers: tuple) -> Iterator[tuple[str, nn.Module]]:
    """Adapter layers inside an adapter layer's base (one per targeted parameter of one module, or the
    ``out_proj`` of an adapted ``nn.MultiheadAttention``): layers of their own, under their full names."""
    base = layer._modules.get("base_layer")
    if base is None:
        return
    if isinstance(base, layers):
        yield f"{full}.base_layer", base
        yield from _inner_layers(base, f"{full}.base_layer", layers)
        return
    for name, module in base.named_modules(prefix=f"{full}.base_layer"):
        if isinstance(module, layers):
            yield name, module


def adapter_layers(model: nn.Module, layer_cls: type | tuple = ()) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` of every adapter layer (of ``layer_cls``, default: any method)."""
    kinds = layer_cls or adapter_layer_types()
    return ((n, m) for n, m in iter_modules(model) if isinstance(m, kinds))


def saved_module_wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    return ((n, m) for n, m in iter_modules(model) if isinstance(m, ModulesToSaveWrapper))


def own_base_weights(model: nn.Module, layers: Sequence[nn.Module]) -> None:
    """Give each of ``layers`` (adapter layers about to merge) a base weight of its own where another
    module holds the same tensor (layer replication, tied input/output embeddings).

    Merging writes the adapter's delta into the base weight in place; in a shared tensor it would reach
    every module holding it. Of the layers sharing one weight, all but the last get a copy, so the
    last may write into the original. Only floating-point weights: quantized bases are given new tensors
    when they are merged anyway.
    """
    holders = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for layer in layers:
        base = layer.base_layer
        weight = base._parameters.get("weight")
        if weight is not None and weight.is_floating_point() and holders[id(weight)] > 1:
            holders[id(weight)] -= 1
            base.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)


def assign_parameters(model: nn.Module, values: Sequence[tuple[nn.Parameter, Tensor]]) -> None:
    """Replace each parameter (one created on the ``meta`` device) by a new one holding its value.

    The new parameter keeps the old one's dtype and ``requires_grad``; it goes on the device of the base
    layer of the adapter layer that holds it (the value's own device when there is none, or when that
    base is on ``meta`` too).
    """
    if not values:  # the usual load: nothing was created on meta, no need to walk the model
        return
    devices = {}
    for _, layer in adapter_layers(model):
        real = next((p.device for p in layer.base_layer.parameters() if not p.is_meta), None)
        devices.update({id(p): real for p in layer.parameters() if p.is_meta})
    owners = {id(p): (module, attr) for module in model.modules()
              for attr, p in module._parameters.items() if p is not None}
    for param, value in values:
        module, attr = owners[id(param)]
        device = devices.get(id(param)) or value.device
        new = value.detach().to(device=device, dtype=param.dtype, copy=True)
        module._parameters[attr] = nn.Parameter(new, requires_grad=param.requires_grad)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the model's output projection (excluded from ``"all-linear"``)."""
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for name, module in iter_modules(model):
        if module is head or (isinstance(module, ModulesToSaveWrapper) and module.original_module is head):
            heads.add(name)
    if head is None and any(n == "lm_head" for n, _ in model.named_children()):
        heads.add("lm_head")
    return heads


def find_targets(model: nn.Module, config, method: Method) -> list[str]:
    """Names of the modules ``config`` adapts; a :class:`TargetError` listing close names if none."""
    if getattr(config, "target_parameters", None) and not config.target_modules:
        return []  # (parameters only: see parameter_layers)
    if config.target_modules is None:
        raise TargetError("target_modules is not set: name the modules to adapt (or use 'all-linear')")
    heads = output_head_names(model)
    modules = list(iter_modules(model))
    layers = adapter_layer_types()
    names = [  # (an adapter layer is judged by its base: "all-linear" for a second adapter)
        n for n, m in modules
        if not isinstance(m, ModulesToSaveWrapper)
        and is_target(n, m.base_layer if isinstance(m, layers) else m, config, is_linear=method.is_linear,
                      output_heads=heads)
    ]
    if not names:
        raise TargetError(no_match_message(config.target_modules, [n for n, _ in modules]))
    return names


@dataclass
class Injection:
    """What :func:`inject` did.

    Attributes:
        names: The adapted modules' names.
        undo: Puts the model back as it was before the call (see :class:`Undo`); it also covers what the
            caller changes afterwards (modules_to_save, trainability, a load), for as long as it holds on.
    """

    names: list[str]
    undo: Undo


def inject(model: nn.Module, config, adapter_name: str, method: Method,
           autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> Injection:
    """Add adapter ``adapter_name`` to every module ``config`` targets.

    A ``layer_replication`` map rebuilds the layer stack first. If anything fails the model is put back
    as it was and the error is raised; otherwise the returned :class:`Injection` holds the names and an
    undo for the caller's own later failures. ``low_cpu_mem_usage``: the adapter tensors are created on
    the ``meta`` device (no memory, no initialisation); loading a checkpoint then puts them on their
    layer's device.
    """
    undo = Undo(model)
    try:
        if getattr(config, "layer_replication", None):
            replicate_layers(model, config.layer_replication)
        names = _inject(model, config, adapter_name, method, autocast_adapter_dtype,
                        "meta" if low_cpu_mem_usage else None)
    except Exception:
        undo()
        raise
    return Injection(names, undo)


def parameter_layers(model: nn.Module, config, method: Method) -> dict[str, nn.Module]:
    """For ``config.target_parameters``: per owning module ``M`` whose parameters ``p_1 .. p_k`` (in the
    module's order) match, the chain of wrappers (existing, or new from ``method.wrap_parameter``), outermost
    first: ``{M: wraps p_k, M.base_layer: wraps p_(k-1), ...}``, the nesting peft's checkpoint keys follow.
    A :class:`TargetError` if nothing matches."""
    entries = getattr(config, "target_parameters", None) or []
    if not entries:
        return {}
    if method.wrap_parameter is None:
        raise TypeError(f"{method.peft_type.value} cannot target parameters (target_parameters)")
    layer_types = adapter_layer_types()
    found: dict[str, nn.Module] = {}
    seen = []
    for name, module in list(iter_modules(model)):
        if name.endswith(".base_layer") and isinstance(module, layer_types):
            continue  # (inner wrappers: handled with their outermost one)
        owner, chain = module, []
        while isinstance(owner, method.layer_cls) and hasattr(owner, "parameter_name"):
            chain.append(owner)
            owner = owner.base_layer
        if isinstance(owner, layer_types):
            continue
        for p in owner._parameters:
            seen.append(f"{name}.{p}")
        matched = [p for p in owner._parameters if any(f"{name}.{p}" == e or f"{name}.{p}".endswith("." + e)
                                                       for e in entries)]
        if not matched:
            continue
        if chain:
            if [layer.parameter_name for layer in reversed(chain)] != matched:
                raise ValueError(f"module {name!r}: its parameters are adapted as {[c.parameter_name for c in chain]}; "
                                 f"every adapter must target the same parameters of a module (as in peft), got {matched}")
        else:
            current = owner
            for p in matched:
                current = method.wrap_parameter(current, p)
                chain.insert(0, current)
        for depth, layer in enumerate(chain):
            found[name + ".base_layer" * depth] = layer
    if not found:
        raise TargetError(no_match_message(entries, seen, "target_parameters"))
    return found


def _inject(model, config, adapter_name, method, autocast_adapter_dtype, device) -> list[str]:
    if method.prepare_config is not None:
        config = method.prepare_config(model, config)
    names = find_targets(model, config, method)
    if method.extra_targets is not None:
        names += [n for n in method.extra_targets(model, names) if n not in names]
    layers = parameter_layers(model, config, method)
    clash = sorted(set(layers) & set(names))
    if clash:
        raise ValueError(f"modules {clash} are matched by both target_modules and target_parameters")
    names = list(layers) + names
    for name in names:
        if name in layers:
            continue
        module = model.get_submodule(name)
        if isinstance(module, method.layer_cls):
            layers[name] = module
            continue
        try:
            layers[name] = method.wrap(module)
        except TypeError as exc:
            raise TypeError(f"cannot adapt module {name!r}: {exc}") from None
    for name, layer in layers.items():
        if adapter_name in layer.adapters:
            raise ValueError(f"module {name!r} already has an adapter named {adapter_name!r}")
    # Every layer goes in before the first adapter is made, so that an Undo finds all of them (an adapter
    # initialised from the base, PiSSA/OLoRA, must give the base weight back).
    for name, layer in layers.items():
        if layer is not model.get_submodule(name):
            set_submodule(model, name, layer)
    for name, layer in layers.items():
        try:
            method.add_adapter(layer, name, adapter_name, config, autocast_adapter_dtype, device=device)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"cannot adapt module {name!r}: {exc}") from None
    if method.attach is not None:
        names += method.attach(model, config, adapter_name, autocast_adapter_dtype, device)
    return names


class Undo:
    """Puts a model back as it was when this object was made; call it when an injection, or what an entry
    point does after one (modules_to_save, activating, loading), has failed.

    It records what those steps change: every module's tables of children and parameters (adapter layers
    and modules_to_save wrappers put in, a replicated layer stack, adapters and saved copies added to
    existing layers and wrappers, a quantized base weight replaced), each parameter's ``requires_grad``,
    the active adapters of the existing layers and wrappers, and :class:`StackState` (``layer_idx`` and the
    config's layer count). A base weight rewritten in place by an initialisation (PiSSA, OLoRA) is given
    back by the new adapter's ``undo_adapter``. Nothing is kept on the model itself.
    """

    def __init__(self, model: nn.Module):
        self._model = model
        modules = list(model.modules())
        self._tables = [(m, dict(m._modules), dict(m._parameters)) for m in modules]
        self._requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        layer_types = adapter_layer_types()
        self._adapters = {id(m): (m, set(m.adapters)) for m in modules if isinstance(m, layer_types)}
        self._active = [(m, _active_names(m)) for m in modules if isinstance(m, layer_types + (ModulesToSaveWrapper,))]
        self._stack = StackState.capture(model)

    def __call__(self) -> None:
        # Adapters made since: undone first, while their layers are still in place (undo_adapter gives a
        # base weight back what a residual initialisation took from it).
        for layer in [m for m in self._model.modules() if isinstance(m, adapter_layer_types())]:
            _, before = self._adapters.get(id(layer), (layer, set()))
            for name in [n for n in layer.adapters if n not in before]:
                getattr(layer, "undo_adapter", layer.delete_adapter)(name)
        for module, children, params in self._tables:
            module._modules.clear()
            module._modules.update(children)
            module._parameters.clear()
            module._parameters.update(params)
        self._stack.restore()
        for param, flag in self._requires_grad:
            param.requires_grad_(flag)
        for module, names in self._active:
            module.set_active(names)


def _active_names(module: nn.Module) -> list[str]:
    """The adapters ``module`` runs, as ``set_active`` takes them (a wrapper runs one copy or none)."""
    active = module.active
    if isinstance(active, list):
        return list(active)
    return [] if active is None else [active]


def add_modules_to_save(model: nn.Module, entries: Sequence[str] | None, adapter_name: str) -> list[str]:
    """Give adapter ``adapter_name`` a trainable copy of each module matching ``entries``."""
    if not entries:
        return []
    names = [n for n, m in iter_modules(model) if matches(n, list(entries))]
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSaveWrapper):
            module = ModulesToSaveWrapper(module)
            set_submodule(model, name, module)
        module.add_adapter(adapter_name)
    return names


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove one adapter everywhere; layers left without adapters go back to their base module."""
    for name, layer in reversed(list(adapter_layers(model))):  # (nested layers before the layer holding them)
        if adapter_name in layer.adapters:
            layer.delete_adapter(adapter_name)
            if not layer.adapters:
                set_submodule(model, name, layer.base_layer)
    for name, wrapper in list(saved_module_wrappers(model)):
        wrapper.delete_adapter(adapter_name)
        if not wrapper.modules_to_save:
            set_submodule(model, name, wrapper.original_module)


def unwrap(model: nn.Module, keep_saved_copies: bool = False) -> nn.Module:
    """Replace every adapter layer by its base layer and every modules_to_save wrapper by the
    module that currently runs (``keep_saved_copies``) or by the original."""
    for name, layer in reversed(list(adapter_layers(model))):  # (nested layers before the layer holding them)
        set_submodule(model, name, layer.base_layer)
    for name, wrapper in list(saved_module_wrappers(model)):
        set_submodule(model, name, wrapper.current() if keep_saved_copies else wrapper.original_module)
    return model


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
