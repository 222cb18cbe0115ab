"""``AdaLoraConfig`` (Zhang et al., 2023): SVD-form adapters whose rank budget is reallocated while training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from ...config import ConfigError, PeftType, check_number
from ..lora.config import LoraConfig


@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA: ``W x + s / r0 * B (A * E) x`` with ``E`` a vector of "singular values"; the least
    important triplets (by a smoothed sensitivity x uncertainty score) are pruned to follow a cubic budget
    schedule from ``init_r`` to ``target_r`` per layer. Call :meth:`PeftModel.update_and_allocate` after
    each optimizer step.

    Args:
        init_r / target_r: Starting and final average rank per layer.
        tinit: Steps of warm-up before pruning; tfinal: final steps at the target budget.
        deltaT: Prune every deltaT steps in between. total_step: Length of training (required).
        beta1 / beta2: EMA factors of sensitivity and of its uncertainty.
        orth_reg_weight: Weight of the orthogonality penalty on A and B added to the training loss.
        rank_pattern: Filled during training: which triplets of each layer survive (saved, as in peft).
    """

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = None

    peft_type: ClassVar[PeftType] = PeftType.ADALORA

    def validate(self) -> None:
        pattern, self.rank_pattern = self.rank_pattern, {}  # AdaLoRA's rank_pattern holds masks, not ranks
        try:
            super().validate()
        finally:
            self.rank_pattern = pattern
        if self.use_dora or self.layer_replication or self.init_lora_weights not in (True, False):
            raise ConfigError("AdaLoRA supports neither use_dora, layer_replication nor PiSSA/OLoRA/gaussian init")
        check_number("init_r", self.init_r, low=0, integer=True)
        check_number("target_r", self.target_r, low=0, integer=True)
        if self.target_r > self.init_r:
            raise ConfigError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r})")
        if self.total_step is None or not isinstance(self.total_step, int) or self.total_step <= 0:
            raise ConfigError(f"total_step must be a positive integer (the number of training steps), got {self.total_step!r}")
        if self.tinit + self.tfinal >= self.total_step:
            raise ConfigError(f"tinit ({self.tinit}) + tfinal ({self.tfinal}) must be below total_step ({self.total_step})")
        check_number("deltaT", self.deltaT, low=0, integer=True)
        for name in ("beta1", "beta2"):
            check_number(name, getattr(self, name), low=0, high=1, low_inclusive=True)
        check_number("orth_reg_weight", self.orth_reg_weight, low=0, low_inclusive=True)

    def rank_for(self, module_name: str) -> int:
        """Triplets to create: ``init_r``, or as many as the saved rank pattern kept."""
        mask = (self.rank_pattern or {}).get(f"{module_name}.lora_E")  # (peft writes null before any allocation)
        return self.init_r if mask is None else max(int(sum(mask)), 1)
