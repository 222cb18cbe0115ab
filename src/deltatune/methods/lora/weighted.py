"""``add_weighted_adapter``: a new LoRA adapter combined from existing ones (peft's operation and types).

In every adapted layer, source ``i`` contributes its update ``s_i B_i A_i`` (its own scaling ``s_i``:
rsLoRA, ``alpha_pattern`` and ``rank_pattern`` included) with weight ``w_i``. The new adapter has
``lora_alpha = r`` and no rsLoRA, so its scaling is 1 and its factors carry everything:

- ``cat`` (exact): ``A = [w_1 s_1 A_1; ...]``, ``B = [B_1, ...]``, so ``B A = sum_i w_i s_i B_i A_i``;
- ``svd`` (and ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``): the deltas
  ``s_i B_i A_i`` (as ``(out, in * prod(kernel))`` matrices) are merged by the rule
  (:mod:`deltatune.combination`) with weights ``w_i`` and factored by a truncated SVD of rank ``svd_rank``
  (default: the largest source rank);
- ``linear`` (and ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``): the factors themselves are
  merged, ``A`` with weights ``sqrt(w_i s_i)`` and ``B`` with ``sqrt(w_i s_i)``, so the product is
  ``sum_i w_i s_i B_i A_i`` plus cross terms ``sqrt(w_i s_i w_j s_j) B_i A_j`` (a cheap approximation, as in
  peft). The sources must have one rank per layer.

With a single source every type is ``linear`` (exact), as in peft. Where peft gives a silently wrong
adapter this module refuses or computes the right one: negative weights with a factor type (more than one
source) are refused, since the cross terms ``B_i A_j`` would not carry the signs; rsLoRA sources are
folded with their own scaling; DoRA sources are refused (the magnitude ``m / ||W + s B A||`` does not
combine linearly); SVD types work on Conv1d/Conv3d (the kernel is flattened into the input dimension);
the new config has one rank (results of lower rank are padded with zeros), so it saves and reloads.
Everything is checked before the new adapter is added; if filling it fails the model is put back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ... import combination as C
from ...config import PeftType
from ...injection import Undo, adapter_layers, find_targets, saved_module_wrappers
from ...registry import PromptMethod, get_method

#: combination_type -> (how the new factors are made, the merge rule of :func:`deltatune.combination.merge`).
COMBINATIONS = {
    "svd": ("svd", "weighted_sum"),
    "ties_svd": ("svd", "ties"),
    "dare_linear_svd": ("svd", "dare_linear"),
    "dare_ties_svd": ("svd", "dare_ties"),
    "magnitude_prune_svd": ("svd", "magnitude_prune"),
    "linear": ("factors", "weighted_sum"),
    "ties": ("factors", "ties"),
    "dare_linear": ("factors", "dare_linear"),
    "dare_ties": ("factors", "dare_ties"),
    "magnitude_prune": ("factors", "magnitude_prune"),
    "cat": ("cat", None),
}
_SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")


@dataclass
class _Layer:
    """One adapted layer: its name, the layer, and the sources present in it with their weights."""

    name: str
    layer: nn.Module
    sources: list[tuple[str, float]] = field(default_factory=list)


def add_weighted_adapter(peft_model, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: Optional[int] = None,
                         svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
                         svd_driver: Optional[str] = None, density: Optional[float] = None,
                         majority_sign_method: str = "total",
                         generator: Optional[torch.Generator] = None) -> None:
    """Add LoRA adapter ``adapter_name`` combining ``adapters`` with ``weights`` (see the module docstring).

    Args:
        peft_model: A deltatune ``PeftModel`` holding the LoRA adapters ``adapters``.
        adapters: Names of the source adapters.
        weights: One float per source (negative: subtract; not with the factor types, see above).
        adapter_name: Name of the new adapter (must not exist). It is added inactive, not trainable.
        combination_type: One of :data:`COMBINATIONS`.
        svd_rank: Rank of the SVD types' result (default: the largest source rank).
        svd_clamp: Quantile in ``[0, 1]`` for clamping the SVD factors (see
            :func:`deltatune.combination.truncated_svd`).
        svd_full_matrices, svd_driver: Passed to ``torch.linalg.svd`` (``svd_driver`` on CUDA only).
        density: Fraction kept by the pruning types (``ties*``, ``dare_*``, ``magnitude_prune*``).
        majority_sign_method: ``"total"`` or ``"frequency"`` (TIES types).
        generator: DARE's random drops (default: torch's global generator, so ``torch.manual_seed`` before
            the call reproduces it). The drops are drawn before the new adapter is created; peft draws after
            initialising it, so the same seed does not give peft's masks.

    Raises:
        ValueError: An unknown or existing name, mismatched lengths, a non-LoRA, prompt-learning or DoRA
            source, bad options, different source ranks in one layer for a factor type, negative weights
            with a factor type, or several sources holding a copy of one ``modules_to_save`` module.
            Nothing is changed then.
    """
    layers, wrappers = _check(peft_model, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
                              svd_driver, density, majority_sign_method)
    kind, rule = COMBINATIONS["linear" if len(adapters) == 1 else combination_type]
    rank = _new_rank(kind, layers, svd_rank)
    factors = {}  # layer name -> (A, B), float32, for a new adapter of scaling 1
    for entry in layers:
        factors[entry.name] = _combine(entry, kind, rule, rank, svd_clamp, svd_full_matrices, svd_driver, density,
                                       majority_sign_method, generator)
    config = _new_config(peft_model, adapters, rank, [e.name for e in layers])
    undo = Undo(peft_model)
    peft_model.add_adapter(adapter_name, config)
    try:
        _fill(peft_model, layers, wrappers, adapter_name, factors)
    except Exception:
        peft_model.peft_config.pop(adapter_name, None)
        undo()
        raise


# ---------------------------------------------------------------------------------------------- checks
def _check(peft_model, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp, svd_driver, density,
           majority_sign_method) -> tuple[list[_Layer], list[tuple[nn.Module, str]]]:
    """Validate everything; returns the layers holding sources and the ``(wrapper, holder)`` pairs of
    modules_to_save copies to carry over."""
    configs = peft_model.peft_config
    if not isinstance(adapter_name, str) or adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists (or is not a name); pick a new name")
    adapters, weights = list(adapters), list(weights)
    if not adapters:
        raise ValueError("add_weighted_adapter needs at least one source adapter")
    if len(weights) != len(adapters):
        raise ValueError(f"got {len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights}")
    unknown = [a for a in adapters if a not in configs]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; available: {list(configs)}")
    for name in adapters:
        config = configs[name]
        if isinstance(get_method(config.peft_type), PromptMethod):
            raise ValueError(f"adapter {name!r} is a prompt-learning adapter ({config.peft_type.value}): it adds "
                             "virtual tokens and has no low-rank weights to combine")
        if config.peft_type != PeftType.LORA:
            raise ValueError(f"add_weighted_adapter combines LoRA adapters; {name!r} is {config.peft_type.value}")
        if config.use_dora:
            raise ValueError(f"adapter {name!r} is a DoRA adapter: its output is m / ||W + s B A|| * (W + s B A) x, "
                             "which does not combine linearly with other adapters; combine plain LoRA adapters only")
        if getattr(config, "lora_bias", False):
            raise ValueError(f"adapter {name!r} has lora_bias=True: the combined adapter would lose its bias on B "
                             "(peft drops it without a word); combine adapters without lora_bias")
    if combination_type not in COMBINATIONS:
        raise ValueError(f"unknown combination_type {combination_type!r}; choose one of {list(COMBINATIONS)}")
    kind, rule = COMBINATIONS[combination_type]
    if len(adapters) > 1 and C.MERGES.get(rule, False):
        # DARE divides by the density; trimming to nothing (density 0) is allowed, as in peft.
        dare = rule.startswith("dare")
        number = isinstance(density, (int, float)) and not isinstance(density, bool)
        if not number or not (0 < density <= 1 if dare else 0 <= density <= 1):
            raise ValueError(f"combination_type={combination_type!r} needs a density in "
                             f"{'(0, 1]' if dare else '[0, 1]'}, got {density!r}")
    if majority_sign_method not in C.SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {C.SIGN_METHODS}, got {majority_sign_method!r}")
    if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank < 1):
        raise ValueError(f"svd_rank must be a positive integer or None, got {svd_rank!r}")
    if svd_clamp is not None and not (isinstance(svd_clamp, (int, float)) and 0 <= svd_clamp <= 1):
        raise ValueError(f"svd_clamp is a quantile in [0, 1] (or None), got {svd_clamp!r}")
    if svd_driver not in _SVD_DRIVERS:
        raise ValueError(f"svd_driver must be one of {_SVD_DRIVERS}, got {svd_driver!r}")
    if len(adapters) > 1 and kind == "factors" and any(w < 0 for w in weights):
        raise ValueError(
            f"combination_type={combination_type!r} merges the factors A and B separately, so B A holds cross "
            "terms B_i A_j whose signs do not follow negative weights; use 'cat' (exact) or 'svd' to subtract")
    layers = _source_layers(peft_model, adapters, weights)
    if not layers:
        raise ValueError(f"adapters {adapters} adapt no layer of this model")
    for entry in layers:
        ranks = {entry.layer.adapters[n].r for n, _ in entry.sources}
        if len(adapters) > 1 and kind == "factors" and len(ranks) > 1:
            raise ValueError(f"combination_type={combination_type!r} adds the factors, which needs one rank per "
                             f"layer, but the sources have ranks {sorted(ranks)} in {entry.name!r}; "
                             "use 'cat' or 'svd'")
        if svd_driver is not None and kind == "svd" and entry.layer.adapters[entry.sources[0][0]].lora_A.device.type != "cuda":
            raise ValueError(f"svd_driver={svd_driver!r} works on CUDA tensors only; {entry.name!r} is not on CUDA")
    return layers, _saved_copies(peft_model, adapters)


def _source_layers(peft_model, adapters, weights) -> list[_Layer]:
    """The adapter layers that hold at least one source, in module order, with the sources present."""
    found = []
    for name, layer in adapter_layers(peft_model.base_model.model):
        present = [(a, float(w)) for a, w in zip(adapters, weights) if a in layer.adapters]
        if present:
            found.append(_Layer(name, layer, present))
    return found


def _saved_copies(peft_model, adapters) -> list[tuple[nn.Module, str]]:
    """``(wrapper, source)`` for each modules_to_save wrapper in which exactly one source has a copy; a
    wrapper where several have one is refused (whole modules cannot be weighted)."""
    pairs = []
    for name, wrapper in saved_module_wrappers(peft_model.base_model.model):
        holders = sorted({a for a in adapters if a in wrapper.modules_to_save})
        if len(holders) > 1:
            raise ValueError(f"adapters {holders} each hold a trained copy of {name!r} (modules_to_save); "
                             "whole modules cannot be combined with weights")
        if holders:
            pairs.append((wrapper, holders[0]))
    return pairs


# ---------------------------------------------------------------------------------------------- the math
def _new_rank(kind: str, layers: list[_Layer], svd_rank: Optional[int]) -> int:
    """The new adapter's single rank: the largest per-layer result (``cat``: sum of the ranks present;
    factor types: the common rank), or ``svd_rank`` / the largest source rank for the SVD types."""
    def ranks(entry):
        return [entry.layer.adapters[n].r for n, _ in entry.sources]
    if kind == "cat":
        return max(sum(ranks(e)) for e in layers)
    if kind == "svd" and svd_rank is not None:
        return svd_rank
    return max(max(ranks(e)) for e in layers)


def _matrix(t: Tensor, rows_first: bool) -> Tensor:
    """A factor as a float32 matrix: ``A (r, in, *k) -> (r, in * prod k)``; ``B (out, r, 1..) -> (out, r)``."""
    return t.detach().float().reshape(t.shape[0], -1) if rows_first else t.detach().float().reshape(t.shape[0], t.shape[1])


def _pad(A: Tensor, B: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Zero rows of ``A`` / columns of ``B`` up to ``rank`` (the product is unchanged)."""
    k = A.shape[0]
    A = torch.cat([A, A.new_zeros((rank - k,) + tuple(A.shape[1:]))])
    B = torch.cat([B, B.new_zeros((B.shape[0], rank - k) + tuple(B.shape[2:]))], dim=1)
    return A, B


def _combine(entry: _Layer, kind, rule, rank, clamp, full_matrices, driver, density, sign_method, generator):
    """``(A, B)`` of the new adapter in one layer, float32, shaped as the layer's factors of rank ``rank``,
    with ``B A`` the combination for scaling 1."""
    ads = [(entry.layer.adapters[n], w) for n, w in entry.sources]
    A0, B0 = ads[0][0].lora_A, ads[0][0].lora_B
    if kind == "cat":
        A = torch.cat([ad.lora_A.detach().float() * (w * ad.scaling) for ad, w in ads])
        B = torch.cat([ad.lora_B.detach().float() for ad, w in ads], dim=1)
    elif kind == "factors":
        ws = [w * ad.scaling for ad, w in ads]
        A = C.merge(rule, [ad.lora_A.detach().float() for ad, _ in ads],
                    [math.copysign(math.sqrt(abs(w)), w) for w in ws], density, sign_method, generator)
        B = C.merge(rule, [ad.lora_B.detach().float() for ad, _ in ads], [math.sqrt(abs(w)) for w in ws],
                    density, sign_method, generator)
    else:
        deltas = [ad.scaling * (_matrix(ad.lora_B, False) @ _matrix(ad.lora_A, True)) for ad, _ in ads]
        delta = C.merge(rule, deltas, [w for _, w in entry.sources], density, sign_method, generator)
        A2, B2 = C.truncated_svd(delta, rank, clamp, full_matrices, driver)
        A = A2.reshape((rank,) + tuple(A0.shape[1:]))
        B = B2.reshape((B0.shape[0], rank) + tuple(B0.shape[2:]))
    return _pad(A, B, rank)


# ---------------------------------------------------------------------------------------------- the adapter
def _new_config(peft_model, adapters, rank, module_names):
    """The new adapter's config, derived from the first source's (never mutated): one rank, scaling 1,
    exactly the modules the sources adapt, modules_to_save the union of the sources'."""
    configs = [peft_model.peft_config[a] for a in adapters]
    saved = sorted({m for c in configs for m in (c.modules_to_save or [])})
    config = configs[0].replace(
        r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={}, use_dora=False,
        init_lora_weights=True, bias="none", exclude_modules=None, layers_to_transform=None, layers_pattern=None,
        modules_to_save=saved or None, target_modules=sorted(module_names))
    if all(isinstance(c.target_modules, (list, set, tuple)) for c in configs):
        # The shorter spelling (the union of the sources' entries, as peft writes it), when it adapts the same modules.
        union = config.replace(target_modules=sorted({t for c in configs for t in c.target_modules}))
        if set(find_targets(peft_model.base_model.model, union, get_method(PeftType.LORA))) == set(module_names):
            config = union
    return config


def _fill(peft_model, layers, wrappers, adapter_name, factors) -> None:
    """Copy the combined factors into the new adapter (``B`` divided by its scaling) and the carried-over
    modules_to_save copies."""
    with torch.no_grad():
        for entry in layers:
            new = entry.layer.adapters[adapter_name]
            A, B = factors[entry.name]
            if new.lora_A.shape != A.shape or new.lora_B.shape != B.shape:
                raise RuntimeError(f"{entry.name!r}: the new adapter has shapes {tuple(new.lora_A.shape)}, "
                                   f"{tuple(new.lora_B.shape)}, the combination {tuple(A.shape)}, {tuple(B.shape)}")
            new.lora_A.copy_(A)
            new.lora_B.copy_(B / new.scaling)
        for wrapper, source in wrappers:
            wrapper.modules_to_save[adapter_name].load_state_dict(wrapper.modules_to_save[source].state_dict())
