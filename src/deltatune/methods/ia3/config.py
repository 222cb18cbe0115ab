"""``IA3Config``: learned rescaling vectors (Liu et al., 2022), peft's field names and JSON layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Union

from ...config import ConfigError, PeftConfig, PeftType
from ...targeting import matches


@dataclass
class IA3Config(PeftConfig):
    """(IA)^3: each targeted layer's output (or, for feed-forward modules, its input) is multiplied by a
    learned vector ``l``, initialised to ones.

    Args:
        target_modules: Modules to rescale (list = name or ``.``-suffix, str = full regex, or
            ``"all-linear"``).
        feedforward_modules: Targets whose *input* is scaled (``y = W (x * l) + b``) rather than their
            output (``y = (W x + b) * l``); must be among the targets.
        exclude_modules: Modules to skip.
        fan_in_fan_out: Weight stored ``(in, out)`` (GPT-2 ``Conv1D``); set automatically for Conv1D.
        modules_to_save: Modules trained in full and saved with the adapter.
        init_ia3_weights: ``True``: ``l = 1`` (the model starts as the base); ``False``: random (tests).
    """

    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    feedforward_modules: Optional[Union[list[str], str]] = None
    fan_in_fan_out: bool = False
    modules_to_save: Optional[list[str]] = None
    init_ia3_weights: bool = True

    peft_type: ClassVar[PeftType] = PeftType.IA3
    # The LoRA-style targeting code reads these; IA3 has no layer selection by index.
    layers_to_transform: ClassVar[None] = None
    layers_pattern: ClassVar[None] = None

    def validate(self) -> None:
        for name in ("target_modules", "feedforward_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
        if not isinstance(self.init_ia3_weights, bool):
            raise ConfigError(f"init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, list) and isinstance(targets, list):
            stray = [m for m in ff if not any(matches(m, [t]) or m == t for t in targets)]
            if stray:
                raise ConfigError(f"feedforward_modules {stray} are not among target_modules {targets}: "
                                  "feedforward_modules must be a subset of target_modules")

    def is_feedforward(self, module_name: str) -> bool:
        return matches(module_name, self.feedforward_modules)

    def to_dict(self):
        out = super().to_dict()
        for name in ("target_modules", "feedforward_modules"):
            if isinstance(out[name], list):
                out[name] = sorted(set(out[name]))
        return out
