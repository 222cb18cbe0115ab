"""``LoKrConfig``: low-rank Kronecker-product adapters, peft's field names and JSON layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...config import ConfigError, PeftType
from ..lycoris_common import LycorisConfig


@dataclass
class LoKrConfig(LycorisConfig):
    """LoKr: ``W x + (s * W1 ⊗ W2) x`` with ``s = alpha / r``; on ``nn.Linear``, ``nn.Conv1d`` and
    ``nn.Conv2d``. Besides the shared fields of
    :class:`~deltatune.methods.lycoris_common.LycorisConfig`:

    Args:
        decompose_both: Also store ``W1`` as a rank-``r`` product (when ``r < max(a, c) / 2``).
        decompose_factor: Split sizes as ``(factor, size / factor)`` when ``factor`` divides them;
            ``-1``: as near the square root as possible (see
            :func:`~deltatune.methods.lokr.functional.factorization`).
        rank_dropout_scale: Divide the rows kept by rank dropout by the fraction kept.
        init_weights: ``True``: ``W1`` (or ``W1a``) zero, the rest random (the update starts at zero);
            ``"lycoris"``: ``W2`` (or ``W2b``) zero instead; ``False``: all random.
    """

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    peft_type: ClassVar[PeftType] = PeftType.LOKR
    _INIT_CHOICES = (True, False, "lycoris")

    def validate(self) -> None:
        super().validate()
        if isinstance(self.decompose_factor, bool) or not isinstance(self.decompose_factor, int):
            raise ConfigError(f"decompose_factor must be an integer (-1: automatic), got {self.decompose_factor!r}")
        for name in ("decompose_both", "rank_dropout_scale", "use_effective_conv2d"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
