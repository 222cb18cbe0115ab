"""``VeraConfig``: vector-based random matrix adaptation (Kopiczko et al., 2024), peft's field names and JSON
layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

from ...config import ConfigError, PeftConfig, PeftType, check_number

_BIAS_CHOICES = ("none", "all", "vera_only")


@dataclass
class VeraConfig(PeftConfig):
    """VeRA: ``y = W x + b + Λ_b B Λ_d A x`` where ``A: (r, in)`` and ``B: (out, r)`` are frozen random
    projections shared by every adapted layer (slices of one ``(r, max_in)`` / ``(max_out, r)`` pair
    drawn from ``projection_prng_key``) and only the vectors ``λ_d: (r,)``, ``λ_b: (out,)`` train.

    Args:
        r: Rank of the shared projections (> 0); VeRA uses far larger ranks than LoRA (peft's default 256).
        target_modules: Modules to adapt (``nn.Linear``, GPT-2 ``Conv1D``; list, regex or ``"all-linear"``).
        projection_prng_key: Seed of the CPU ``torch.Generator`` the projections are drawn from
            (Kaiming-uniform, ``A`` first, then ``B``), as peft draws them.
        save_projection: Save the shared pair in the checkpoint, as peft does (peft's default): keys
            ``base_model.vera_A: (r, max_in)`` and ``base_model.vera_B: (max_out, r)``; loading then uses the
            file's pair. ``False``: the pair is regenerated from ``projection_prng_key`` on load (bit-identical
            to peft's on the CPU generator). A checkpoint that holds the pair is loaded with it either way.
            (peft refuses VeRA adapters of one model that differ in this setting; deltatune keeps one per
            adapter.)
        vera_dropout: Dropout probability on the adapter's input, in ``[0, 1)``.
        d_initial: Initial value of every ``λ_d`` entry (``λ_b`` starts at 0, so the model starts as the base).
        fan_in_fan_out: Weights stored ``(in, out)`` (GPT-2 ``Conv1D``); set automatically for Conv1D.
        bias: Which biases train and are saved with the adapter: ``"none"``, ``"all"`` (every bias in the model)
            or ``"vera_only"`` (the base biases of the adapted layers, keyed ``<module>.base_layer.bias``).
        modules_to_save: Modules trained in full and saved with the adapter.
        init_weights: ``True``: ``λ_b = 0``, ``λ_d = d_initial``; ``False``: ``λ_b = 1``, ``λ_d ~ N(0, 1)`` (tests).
        layers_to_transform: Only adapt layers with these indices.
        layers_pattern: Name(s) of the layer container used to find the index.
    """

    r: int = 256
    target_modules: Optional[Union[list[str], str]] = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    peft_type: ClassVar[PeftType] = PeftType.VERA
    # peft 0.21's VeraConfig has no exclude_modules field (the targeting code reads it).
    exclude_modules: ClassVar[None] = None

    def validate(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        check_number("r", self.r, low=0, integer=True)
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, int):
            raise ConfigError(f"projection_prng_key must be an integer, got {self.projection_prng_key!r}")
        check_number("vera_dropout", self.vera_dropout, low=0, high=1, low_inclusive=True)
        check_number("d_initial", self.d_initial, low=float("-inf"))
        for name in ("save_projection", "fan_in_fan_out", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.bias not in _BIAS_CHOICES:
            raise ConfigError(f"bias must be one of {_BIAS_CHOICES}, got {self.bias!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("layers_pattern is set but layers_to_transform is not: give both")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if isinstance(out["target_modules"], list):
            out["target_modules"] = sorted(set(out["target_modules"]))
        return out
