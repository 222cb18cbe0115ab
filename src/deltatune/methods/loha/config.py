"""``LoHaConfig``: low-rank Hadamard-product adapters, peft's field names and JSON layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...config import PeftType
from ..lycoris_common import LycorisConfig


@dataclass
class LoHaConfig(LycorisConfig):
    """LoHa: ``W x + (s * (W1a W1b) ⊙ (W2a W2b)) x`` with ``W1a, W2a: (out, r)``, ``W1b, W2b: (r, in)`` and
    ``s = alpha / r``; on ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``.

    The fields are those of :class:`~deltatune.methods.lycoris_common.LycorisConfig` (``r``, ``alpha``,
    ``rank_dropout``, ``module_dropout``, ``use_effective_conv2d``, ``target_modules``,
    ``exclude_modules``, ``init_weights``, ``layers_to_transform``, ``layers_pattern``, ``rank_pattern``,
    ``alpha_pattern``, ``modules_to_save``). ``init_weights=True`` zeroes ``W2b`` so that the update
    starts at zero; ``False`` makes every factor random.
    """

    peft_type: ClassVar[PeftType] = PeftType.LOHA
