"""VeRA's shared projections in checkpoints (the registry's ``shared_tensors`` / ``load_shared_tensors``).

With ``save_projection=True`` (peft's default) peft writes the pair once per adapter file, from its tuner
model: ``base_model.vera_A: (r, max_in)`` and ``base_model.vera_B: (max_out, r)``, float32. deltatune writes
the same keys (the checkpoint code adds the ``base_model.`` prefix). On loading, the file's pair is used as
it is, not regenerated: it is what the adapter was trained with even where the regenerated one would differ
(another generator, or peft's later adapters, which reuse the first adapter's larger pair). Its shapes are
checked: ``r`` must equal the config's and the pair must cover the largest targeted sizes.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ... import injection
from .layer import VeraLayer
from .shared import Projections

NAMES = ("vera_A", "vera_B")


def _projections(model: nn.Module, adapter_name: str) -> tuple[list[Projections], torch.device]:
    """The pairs of adapter ``adapter_name`` in ``model`` (one, or none if no VeRA layer holds it) and the
    device to keep them on (its first layer's base weight's; the CPU for a weight not materialised yet)."""
    found, device = {}, torch.device("cpu")
    for _, layer in injection.adapter_layers(model, VeraLayer):
        if adapter_name in layer.adapters:
            proj = layer.adapters[adapter_name].projections
            if not found:
                weight = layer.base_layer.weight
                device = device if weight.is_meta else weight.device
            found[id(proj)] = proj
    return list(found.values()), device


def _one(pairs: list[Projections], adapter_name: str) -> Projections:
    if len(pairs) > 1:  # (one adapter injected in several passes: no single pair to save or load)
        raise ValueError(f"VeRA adapter {adapter_name!r} has {len(pairs)} separate projection pairs in this model; "
                         "a checkpoint holds one")
    return pairs[0]


def shared_tensors(model: nn.Module, adapter_name: str) -> dict[str, Tensor]:
    """``{"vera_A": A, "vera_B": B}`` of adapter ``adapter_name`` if its config saves them (drawn now if not
    yet: every layer has joined by the time the adapter's tensors are listed); else empty."""
    pairs, device = _projections(model, adapter_name)
    if not pairs or not pairs[0].saved:
        return {}
    proj = _one(pairs, adapter_name)
    proj.draw(device)
    return {"vera_A": proj.vera_A, "vera_B": proj.vera_B}


def load_shared_tensors(model: nn.Module, adapter_name: str, given: dict[str, Tensor]) -> Callable[[], None]:
    """Check a checkpoint's ``vera_A`` / ``vera_B`` for adapter ``adapter_name`` (both or neither; shapes as
    :meth:`Projections.check`) and return what makes them its pair. A file without them leaves the pair
    regenerated from ``projection_prng_key``; one with them is used even if the config says
    ``save_projection=False`` (peft then ignores them with a warning and regenerates)."""
    if not given:
        return lambda: None
    pairs, device = _projections(model, adapter_name)
    if not pairs:
        raise ValueError(f"the checkpoint holds VeRA projections {sorted(given)} but adapter {adapter_name!r} "
                         "has no VeRA layers")
    absent = [n for n in NAMES if n not in given]
    if absent:
        raise ValueError(f"the checkpoint holds {sorted(given)} without {absent}: VeRA's projections come as a pair")
    A, B = given["vera_A"], given["vera_B"]
    proj = _one(pairs, adapter_name)
    proj.check(A, B)
    return lambda: proj.adopt(A, B, device)
