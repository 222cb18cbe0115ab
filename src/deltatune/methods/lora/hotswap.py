"""Hot-swapping LoRA adapters: replace an adapter's values in place, without re-wrapping any layer.

:func:`hotswap_adapter` reads a saved LoRA adapter and writes it into an existing adapter of a PeftModel:
same name, same modules, same parameter objects. The new adapter may target the same modules or a subset
of them (the others get a zero update), with ranks up to the existing ones (its factors are zero-padded:
``[A; 0]`` and ``[B, 0]`` give the same ``B A``) and any ``lora_alpha`` / rsLoRA / patterns (each layer's
scaling is recomputed from the new config). Everything is read and checked first; a refused swap raises
ValueError and leaves the model as it was.

Under ``torch.compile`` the compiled graph keeps reading the same parameters, so new values need no
recompilation as long as no shape and no constant of the graph changes. Two things would change:

- a lower rank than the model was compiled with: :func:`prepare_model_for_compiled_hotswap` pads every
  adapter to ``target_rank`` before compiling, so every later adapter fits in the same shapes;
- another scaling: a Python float is a constant the graph is specialised on; prepared adapters hold it as
  a 0-d tensor, written in place (:meth:`~deltatune.methods.lora.layer.LoraAdapter.set_scaling`).

The stored config (``model.peft_config[name]``) always describes the adapter as the model holds it: after
padding ``r`` is the padded rank and ``lora_alpha`` is rescaled to keep each layer's scaling, with exact
per-module ``rank_pattern`` / ``alpha_pattern`` entries where layers differ; after a swap, the new config
with the old adapter's targets. So ``save_pretrained`` after either writes an adapter that reloads (in
deltatune and in peft) to the same outputs.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ... import checkpoint as ckpt
from ... import injection
from ...config import PeftConfig, PeftType
from ...registry import checkpoint_suffixes
from .layer import LoraAdapter, LoraLayer

_CHECK_COMPILED = ("error", "warn", "ignore")
#: Config fields that decide which modules an adapter has: a swap keeps the old adapter's.
_STRUCTURE = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "layer_replication",
              "modules_to_save", "fan_in_fan_out", "task_type", "inference_mode")


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module itself for a ``torch.compile(model)`` wrapper (it shares the parameters)."""
    return getattr(model, "_orig_mod", model)


def _is_compiled(model: nn.Module) -> bool:
    # torch.compile(model) wraps it (_orig_mod); model.compile() compiles it in place (_compiled_call_impl).
    return hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None


def _lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return list(injection.adapter_layers(model, LoraLayer))


# ---------------------------------------------------------------------------------------- prepare
def prepare_model_for_compiled_hotswap(model: nn.Module, target_rank: Optional[int] = None, config=None,
                                       check_compiled: str = "error") -> None:
    """Make every LoRA adapter of ``model`` hot-swappable under ``torch.compile`` without recompiling.

    Call it after the first adapter is loaded and before compiling. Each LoRA adapter is zero-padded to
    ``target_rank`` (its outputs are unchanged) and its scaling becomes a 0-d tensor; every stored LoRA
    config in ``model.peft_config`` is rewritten to describe the padded adapter (see the module docstring).

    Args:
        model: A PeftModel (or any model with deltatune LoRA layers), not yet compiled.
        target_rank: The largest rank of the adapters that will be swapped in. Default: the largest rank in
            the model (peft's default is not to pad).
        config: A ``LoraConfig`` or a dict of them (e.g. configs of adapters that will be loaded later), as in
            peft: with ``target_rank`` given, their ``r`` and every ``rank_pattern`` value are set to it, in
            place (``lora_alpha`` is left as it is, as peft leaves it).
        check_compiled: What to do when ``model`` is already compiled: ``"error"`` (ValueError), ``"warn"``
            (the next call recompiles) or ``"ignore"``.

    Raises:
        ValueError: ``check_compiled`` is not one of the three, the model is compiled (``"error"``), it has no
            LoRA layers, or ``target_rank`` is not a positive integer at least the largest rank in the model.
            Nothing is changed then.
    """
    if check_compiled not in _CHECK_COMPILED:
        raise ValueError(f"check_compiled must be one of {_CHECK_COMPILED}, got {check_compiled!r}")
    if _is_compiled(model):
        if check_compiled == "error":
            raise ValueError("prepare_model_for_compiled_hotswap must be called before the model is compiled")
        if check_compiled == "warn":
            warnings.warn("prepare_model_for_compiled_hotswap was called on a compiled model: the next call "
                          "will recompile it", UserWarning, stacklevel=2)
    model = _unwrapped(model)
    layers = _lora_layers(model)
    ranks = [ad.r for _, layer in layers for ad in layer.adapters.values()]
    if not ranks:
        raise ValueError("the model has no LoRA adapter layers: load the first adapter before preparing it")
    rank = max(ranks) if target_rank is None else target_rank
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < max(ranks):
        raise ValueError(f"target_rank must be an integer >= the largest LoRA rank in the model ({max(ranks)}), "
                         f"got {target_rank!r}")
    for _, layer in layers:
        for ad in layer.adapters.values():
            ad.pad_rank(rank)
            ad.use_tensor_scaling()
        layer.cache.clear()  # entries of the replaced parameters would only keep them alive
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict):
        for name, stored in list(configs.items()):
            if stored.peft_type == PeftType.LORA:
                configs[name] = _describing_config(stored, _layer_state(layers, name))
    if config and target_rank is not None:
        for lora_config in (config.values() if isinstance(config, dict) else [config]):
            lora_config.r = target_rank
            lora_config.rank_pattern = {key: target_rank for key in lora_config.rank_pattern}


# ---------------------------------------------------------------------------------------- hot-swap
@dataclass
class _LayerSwap:
    """What one layer's adapter becomes: new factors (None: a zero update) and scaling (None: unchanged)."""

    layer: LoraLayer
    adapter: LoraAdapter
    A: Optional[Tensor] = None
    B: Optional[Tensor] = None
    magnitude: Optional[Tensor] = None
    scaling: Optional[float] = None


def hotswap_adapter(model: nn.Module, model_name_or_path: str, adapter_name: str = "default",
                    torch_device=None, **kwargs) -> None:
    """Replace adapter ``adapter_name`` of ``model`` by the LoRA adapter saved at ``model_name_or_path``.

    The adapter keeps its name, modules and parameter objects; its values, each layer's scaling, its
    dropout and ``model.peft_config[adapter_name]`` become the new adapter's. The result equals loading
    the new adapter afresh (layers the new adapter does not target get a zero update; DoRA layers there a
    magnitude of ``||W||``, so they compute the base layer). Works on a compiled model (``torch.compile(model)``
    or ``model.compile()``) without recompiling when the model was prepared with
    :func:`prepare_model_for_compiled_hotswap`, or when the ranks and scalings do not change.

    Args:
        model: A deltatune PeftModel (possibly compiled) holding ``adapter_name``.
        model_name_or_path: An adapter folder or Hub id.
        adapter_name: The adapter to replace.
        torch_device: Where the file's tensors are loaded before being copied (default: CPU); they end up
            where the adapter's parameters are.
        **kwargs: ``subfolder``, ``revision`` and the Hub download options (``token``, ``cache_dir``, ...).

    Raises:
        ValueError: The adapters do not fit: another method (including prompt learning), DoRA against plain
            LoRA, another ``bias`` or ``modules_to_save``, a module the existing adapter does not have, a rank
            above the existing (possibly padded) one, a file that disagrees with its config or lacks tensors,
            a merged adapter. The model is unchanged.
    """
    model = _unwrapped(model)
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or adapter_name not in configs:
        known = list(configs) if isinstance(configs, dict) else []
        raise ValueError(f"hotswap_adapter needs a PeftModel holding adapter {adapter_name!r}; it has {known}")
    old = configs[adapter_name]
    directory = ckpt.resolve_adapter_dir(model_name_or_path, kwargs.pop("subfolder", None),
                                         kwargs.pop("revision", None), **kwargs)
    new = PeftConfig.from_pretrained(directory)
    _check_configs(old, new, adapter_name, directory)
    weights = ckpt.from_peft_keys(model, ckpt.read_adapter_weights(directory), adapter_name)
    if torch_device is not None:
        weights = {k: v.to(torch_device) for k, v in weights.items()}
    swaps, copies = _plan(model, adapter_name, new, weights)
    stored = _describing_config(new.replace(**{f: getattr(old, f) for f in _STRUCTURE}),
                                {name: (s.adapter.r, s.scaling) for name, s in swaps.items()})
    # Nothing below can be refused: every shape and name was checked above.
    with torch.no_grad():
        for swap in swaps.values():
            _write(swap, new.lora_dropout, new.use_rslora)
        for target, tensor in copies:
            target.copy_(tensor)
    configs[adapter_name] = stored


def _check_configs(old: PeftConfig, new: PeftConfig, adapter_name: str, directory: str) -> None:
    """Refuse configs a swap cannot reconcile (ValueError naming the difference)."""
    if old.peft_type != PeftType.LORA:
        raise ValueError(f"hot-swapping replaces LoRA adapters; adapter {adapter_name!r} is {old.peft_type.value}")
    if new.peft_type != PeftType.LORA:
        raise ValueError(f"the adapter in {directory!r} is {new.peft_type.value}; only a LoRA adapter can be "
                         f"hot-swapped into LoRA adapter {adapter_name!r}")
    if new.use_dora != old.use_dora:
        kinds = {True: "DoRA", False: "plain LoRA"}
        raise ValueError(f"the adapter in {directory!r} is {kinds[new.use_dora]} but adapter {adapter_name!r} is "
                         f"{kinds[old.use_dora]}: a swap cannot add or remove DoRA's magnitude")
    for field in ("bias", "layer_replication"):
        if getattr(new, field) != getattr(old, field):
            raise ValueError(f"the adapter in {directory!r} has {field}={getattr(new, field)!r}, adapter "
                             f"{adapter_name!r} {field}={getattr(old, field)!r}: they hold different tensors")
    if set(new.modules_to_save or ()) != set(old.modules_to_save or ()):
        raise ValueError(f"the adapter in {directory!r} saves modules {sorted(new.modules_to_save or ())}, adapter "
                         f"{adapter_name!r} {sorted(old.modules_to_save or ())}: modules_to_save must be the same")


def _plan(model: nn.Module, adapter_name: str, new, weights: dict[str, Tensor]):
    """Check every file tensor against the model; return ``({module name: _LayerSwap}, [(target, tensor)])``."""
    swaps: dict[str, _LayerSwap] = {}
    layer_keys: dict[str, tuple[str, str]] = {}  # file key -> (module name, role)
    for name, layer in _lora_layers(model):
        if adapter_name not in layer.adapters:
            continue
        if adapter_name in layer.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into {name!r}; unmerge it before hot-swapping")
        module = name[len(ckpt.ROOT):] if name.startswith(ckpt.ROOT) else name
        swaps[module] = _LayerSwap(layer, layer.adapters[adapter_name])
        suffixes = checkpoint_suffixes(layer.checkpoint_kind)
        for role in layer.adapter_params(adapter_name):
            layer_keys[f"{name}.{suffixes[role]}"] = (module, role)
    others = {k: v for k, v in ckpt.adapter_tensors(model, adapter_name, new.bias, peft_layout=True).items()
              if k not in layer_keys}
    found: dict[str, dict[str, Tensor]] = {}
    copies = []
    for key, tensor in weights.items():
        if key in layer_keys:
            module, role = layer_keys[key]
            found.setdefault(module, {})[role] = tensor
        elif key in others:
            if tuple(tensor.shape) != tuple(others[key].shape):
                raise ValueError(f"{key!r} has shape {tuple(tensor.shape)} in the file, {tuple(others[key].shape)} "
                                 "in the model")
            copies.append((others[key], tensor))
        else:
            modules = ckpt.adapted_module_names([key])
            what = (f"module {modules[0]!r}, which adapter {adapter_name!r} does not adapt (hot-swapping takes the "
                    "same modules or a subset of them)") if modules else "nothing in the model"
            raise ValueError(f"the new adapter's tensor {key!r} belongs to {what}; the model was left unchanged")
    provided = {id(target) for target, _ in copies}
    lacking = [k for k, v in others.items() if id(v) not in provided]
    if lacking:
        raise ValueError(f"the new adapter has no values for {lacking[:3]} (modules_to_save copies or biases of "
                         f"adapter {adapter_name!r}); a swap would keep the old adapter's")
    if not found:
        raise ValueError("the new adapter file holds no LoRA tensors")
    for module, tensors in found.items():
        _check_layer(module, swaps[module], tensors, new)
    return swaps, copies


def _check_layer(module: str, swap: _LayerSwap, tensors: dict[str, Tensor], new) -> None:
    """Fill ``swap`` from one layer's file tensors after checking them against the adapter's."""
    ad = swap.adapter
    roles = set(ad.variant.params(ad))
    if set(tensors) != roles:
        raise ValueError(f"the new adapter's tensors for {module!r} are {sorted(tensors)}, expected {sorted(roles)}")
    A, B = tensors["lora_A"], tensors["lora_B"]
    r = A.shape[0]
    if B.dim() < 2 or B.shape[1] != r or r != new.rank_for(module):
        raise ValueError(f"{module!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not agree with each "
                         f"other or with the config's rank {new.rank_for(module)}")
    if r > ad.r:
        raise ValueError(f"{module!r}: the new adapter's rank {r} is larger than the existing adapter's {ad.r}; "
                         "prepare the model with prepare_model_for_compiled_hotswap(model, target_rank=...) first")
    for role, dim in (("lora_A", 0), ("lora_B", 1)):
        have, want = list(tensors[role].shape), list(ad._parameters[role].shape)
        have[dim] = want[dim] = None  # the rank may be smaller
        if have != want:
            raise ValueError(f"{module!r}: {role} has shape {tuple(tensors[role].shape)} in the file, "
                             f"{tuple(ad._parameters[role].shape)} in the model")
    m = tensors.get("lora_magnitude_vector")
    if m is not None and m.numel() != ad.lora_magnitude_vector.numel():
        raise ValueError(f"{module!r}: lora_magnitude_vector has {m.numel()} values in the file, "
                         f"{ad.lora_magnitude_vector.numel()} in the model")
    swap.A, swap.B, swap.magnitude, swap.scaling = A, B, m, new.scaling_for(module)


def _write(swap: _LayerSwap, dropout: float, use_rslora: bool) -> None:
    """Write one layer's planned values (no checks left to fail)."""
    ad = swap.adapter
    ad.use_rslora = bool(use_rslora)
    ad.write_factors(swap.A, swap.B)
    if swap.scaling is not None:
        ad.set_scaling(swap.scaling)
    ad.dropout = float(dropout)
    m = ad.lora_magnitude_vector
    if m is not None:
        # An untargeted DoRA layer must compute the base layer: with B = 0, m = ||W|| makes its scale 1.
        value = swap.magnitude if swap.magnitude is not None else ad.variant.norm(swap.layer, ad, cached=False)
        m.copy_(value.reshape(m.shape))


# ---------------------------------------------------------------------------------------- stored config
def _layer_state(layers, adapter_name: str) -> dict[str, tuple[int, Optional[float]]]:
    """``{module name: (rank, scaling)}`` of one adapter, module names as the config matches them."""
    out = {}
    for name, layer in layers:
        ad = layer.adapters[adapter_name] if adapter_name in layer.adapters else None
        if ad is not None:
            module = name[len(ckpt.ROOT):] if name.startswith(ckpt.ROOT) else name
            out[module] = (ad.r, float(ad.scaling))
    return out


def _describing_config(config, layers: dict[str, tuple[int, Optional[float]]]):
    """A copy of ``config`` whose ``r`` / ``lora_alpha`` / patterns give each module exactly the rank and
    scaling it has (``None``: any scaling, a zero update). The commonest rank and alpha become ``r`` and
    ``lora_alpha``; other modules get exact-name pattern entries (escaped, so they match that module only)."""
    def alpha(rank: int, scaling: float) -> float:
        value = scaling * (math.sqrt(rank) if config.use_rslora else rank)
        return int(round(value)) if math.isclose(value, round(value), rel_tol=1e-12) else value

    ranks = {m: r for m, (r, _) in layers.items()}
    alphas = {m: alpha(r, s) for m, (r, s) in layers.items() if s is not None}
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    a0 = Counter(alphas.values()).most_common(1)[0][0] if alphas else config.lora_alpha
    return config.replace(
        r=r0, lora_alpha=a0,
        rank_pattern={re.escape(m): r for m, r in ranks.items() if r != r0},
        alpha_pattern={re.escape(m): a for m, a in alphas.items() if not math.isclose(a, a0, rel_tol=1e-12)})


__all__ = ["hotswap_adapter", "prepare_model_for_compiled_hotswap"]
