"""PiSSA/OLoRA adapters rewritten as plain LoRA adapters for the original base weights (saved that way)."""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import CheckpointError


def convert_to_plain_lora(tensors: dict[str, Tensor], initial: dict[str, Tensor], config):
    """A PiSSA/OLoRA adapter as a plain LoRA adapter for the *original* base weights.

    Training moved ``(A0, B0)`` to ``(A, B)`` on the residual base ``W - s B0 A0``, so the update on the
    original ``W`` is ``s (B A - B0 A0) = s [B, -B0] [A; A0]``: rank ``2r`` with the same scaling
    (alpha doubled, or times sqrt(2) with rsLoRA).

    Returns:
        ``(tensors, config)``: the converted tensors under the same keys and the converted config.
    """
    out = dict(tensors)
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        key_b = key[: -len("lora_A.weight")] + "lora_B.weight"
        if key not in initial or key_b not in initial:
            raise CheckpointError(f"the initial adapter has no {key!r}: is it the one saved right after initialisation?")
        out[key] = torch.cat([tensors[key], initial[key].to(tensors[key].dtype)], 0)
        out[key_b] = torch.cat([tensors[key_b], -initial[key_b].to(tensors[key_b].dtype)], 1)
    factor = 2 ** 0.5 if config.use_rslora else 2
    converted = config.replace(
        init_lora_weights=True, r=2 * config.r, lora_alpha=factor * config.lora_alpha,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: factor * v for k, v in config.alpha_pattern.items()},
    )
    return out, converted


__all__ = ["convert_to_plain_lora"]
