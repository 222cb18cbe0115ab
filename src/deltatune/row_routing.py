"""Mixed-adapter batches: each row of one batch through the adapter it names.

``model(**inputs, adapter_names=[...])`` (and ``generate``) take one adapter name per row, or
:data:`BASE` for the plain base model. For the duration of that call every module able to route rows
(adapter layers whose method supports it, ``modules_to_save`` wrappers) is handed one :class:`RowPlan`
through ``route_rows(plan)`` and handed ``None`` afterwards; the active adapters play no part in the call.
How a layer computes its rows is its method's business (LoRA: one base GEMM for the whole batch plus one
low-rank update over the adapters' concatenated factors, see ``methods/lora/mixed.py``).

The checks here run before anything is routed, so a refused call changes nothing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .registry import PromptMethod, adapter_layer_types, get_method

#: The name of a row that runs through the base model alone.
BASE = "__base__"


@dataclass
class RowPlan:
    """Which adapter each row of one call's batch runs through.

    Attributes:
        names: One adapter name (or :data:`BASE`) per row of the batch the call was given.
        unique: The distinct names other than :data:`BASE`, in order of first appearance.
        memo: Values derived from the plan for one layer composition (row slots, masks), kept for the
            call's duration: every layer holding the same adapters shares them.
    """

    names: tuple[str, ...]
    unique: tuple[str, ...] = ()
    memo: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.unique = tuple(dict.fromkeys(n for n in self.names if n != BASE))

    def present(self, adapters) -> tuple[str, ...]:
        """The plan's adapters that ``adapters`` (a layer's name -> adapter mapping) holds, in plan order."""
        return tuple(n for n in self.unique if n in adapters)

    def slots(self, present: tuple[str, ...], rows: int, device: torch.device) -> Tensor:
        """Per row of a ``rows``-row input, ``0`` for no adapter (base rows, adapters this layer lacks) or
        ``i + 1`` for ``present[i]``: ``(rows,)`` int64.

        ``rows`` may be a multiple of the batch size: generation expands each row into consecutive copies
        (beams, returned sequences; ``repeat_interleave``), and so does flattening ``(batch, tokens)``.
        """
        key = ("slots", present, rows, device)
        slots = self.memo.get(key)
        if slots is None:
            batch = len(self.names)
            if rows % batch:
                raise ValueError(f"adapter_names has {batch} names, but a layer received {rows} rows: mixed-adapter "
                                 f"batches need the batch as the first dimension of every layer's input")
            index = {n: i + 1 for i, n in enumerate(present)}
            slots = torch.tensor([index.get(n, 0) for n in self.names], dtype=torch.long)
            slots = slots.repeat_interleave(rows // batch).to(device)
            self.memo[key] = slots
        return slots


def batch_size(args: Sequence, kwargs: dict) -> Optional[int]:
    """The batch size of a forward/generate call: the first dimension of ``input_ids``, ``inputs_embeds``
    (or ``pixel_values``, ``input_features``), or of the first positional tensor; None if none is given."""
    for key in ("input_ids", "inputs_embeds", "pixel_values", "input_features", "x"):
        value = kwargs.get(key)
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    for value in args:
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def check(peft_model, names, batch: Optional[int], modules=None) -> tuple[str, ...]:
    """``names`` as a tuple, or a ValueError naming what is wrong with it for this model and batch
    (``modules``: the model's :func:`_modules`, when the caller has them)."""
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise ValueError(f"adapter_names must be a non-empty list with one adapter name per row (or "
                         f"{BASE!r}), got {names!r}")
    names = tuple(names)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise ValueError(f"adapter_names must hold strings, got {bad[0]!r}")
    if batch is not None and len(names) != batch:
        raise ValueError(f"adapter_names has {len(names)} names for a batch of {batch} rows: give one per row")
    config = peft_model.peft_config
    unknown = sorted({n for n in names if n != BASE and n not in config})
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown} in adapter_names; available: {list(config)} and {BASE!r}")
    for n in dict.fromkeys(names):
        if n != BASE and isinstance(get_method(config[n].peft_type), PromptMethod):
            raise ValueError(f"adapter {n!r} is a prompt-learning adapter ({config[n].peft_type.value}): "
                             f"mixed-adapter batches take layer adapters (LoRA, DoRA) only")
    if peft_model._active_prompt() is not None:
        raise ValueError(f"the active adapter {peft_model._active_prompt()!r} is a prompt-learning adapter: "
                         f"set_adapter to a layer adapter before passing adapter_names")
    layers, _ = modules or _modules(peft_model.base_model.model)
    if any(getattr(layer, "merged_adapters", None) for layer in layers):
        raise ValueError("adapter_names: the model has merged adapters, which would apply to every row; "
                         "unmerge_adapter() first")
    wanted = set(names) - {BASE}
    for layer in layers:
        if getattr(layer, "disabled", False):
            raise ValueError("adapter_names inside disable_adapter(): every row would run the base model")
        if callable(getattr(layer, "route_rows", None)):
            continue
        held = sorted(wanted & set(layer.adapters))
        if held:
            kind = config[held[0]].peft_type.value
            raise ValueError(f"adapter {held[0]!r} ({kind}) cannot run in a mixed-adapter batch: its "
                             f"{type(layer).__name__} layers do not route rows (LoRA and DoRA adapters on "
                             "Linear, Conv1D, Embedding and Conv layers do)")
        if layer._run:
            name = next(n for n, m in peft_model.base_model.model.named_modules() if m is layer)
            raise ValueError(f"layer {name!r} runs active adapters of a method that cannot route rows; "
                             f"they would apply to every row. set_adapter to a LoRA adapter first")
    return names


def _modules(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The model's adapter layers, and the modules that route rows. This runs per call, so it walks the
    module tree itself: into an adapter layer only through its ``base_layer`` (where nested layers live),
    never through its adapters (``model.modules()`` would visit every adapter of every layer)."""
    layer_types = adapter_layer_types()
    kinds: dict[type, tuple[bool, bool]] = {}  # (a model repeats a few classes: one class test each)
    layers, routable, stack = [], [], [model]
    while stack:
        module = stack.pop()
        cls = type(module)
        kind = kinds.get(cls)
        if kind is None:  # (a class lookup: no nn.Module.__getattr__)
            kind = kinds[cls] = (issubclass(cls, layer_types), callable(getattr(cls, "route_rows", None)))
        is_layer, routes = kind
        if routes:
            routable.append(module)
        if is_layer:
            layers.append(module)
            base = module._modules.get("base_layer")
            if base is not None:
                stack.append(base)
        elif not routes:  # (a routing wrapper's own copies hold no layers)
            for child in module._modules.values():
                if child is not None:
                    stack.append(child)
    return layers, routable


@contextlib.contextmanager
def routed(peft_model, names, batch: Optional[int]):
    """Context manager: route the rows of the calls inside it by ``names`` (checked first, see :func:`check`)."""
    found = _modules(peft_model.base_model.model)
    plan = RowPlan(check(peft_model, names, batch, found))
    modules = found[1]
    for m in modules:
        m.route_rows(plan)
    try:
        yield plan
    finally:
        for m in modules:
            m.route_rows(None)


def call(peft_model, fn, args: tuple, kwargs: dict, names):
    """``fn(*args, **kwargs)`` (a forward or generate) with rows routed by ``names``."""
    with routed(peft_model, names, batch_size(args, kwargs)):
        return fn(*args, **kwargs)
