"""``PromptEncoderConfig`` (P-tuning, Liu et al., 2021): virtual tokens produced by a small MLP or LSTM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from ...config import ConfigError, PeftType, check_number
from ..prompt_tuning.config import PromptTuningConfig

_TYPES = ("MLP", "LSTM")


@dataclass
class PromptEncoderConfig(PromptTuningConfig):
    """P-tuning: ``num_virtual_tokens`` embeddings reparameterised by an MLP (or bidirectional LSTM + MLP)
    while training; the saved adapter holds the encoder's *output* (as peft saves it), so a loaded
    adapter uses those prompts directly.

    Args:
        encoder_reparameterization_type: ``"MLP"`` or ``"LSTM"``.
        encoder_hidden_size: Hidden size of the reparameterisation (default: the token size).
        encoder_num_layers: LSTM layers (the MLP always has three linears, as in peft).
        encoder_dropout: LSTM dropout.
    """

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: Optional[int] = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    # P-tuning has no text initialisation; these prompt-tuning fields are not part of its config.
    prompt_tuning_init: ClassVar[str] = "RANDOM"
    prompt_tuning_init_text: ClassVar[None] = None
    tokenizer_name_or_path: ClassVar[None] = None
    tokenizer_kwargs: ClassVar[None] = None

    peft_type: ClassVar[PeftType] = PeftType.P_TUNING

    def validate(self) -> None:
        super().validate()
        if hasattr(self.encoder_reparameterization_type, "value"):
            self.encoder_reparameterization_type = self.encoder_reparameterization_type.value
        if self.encoder_reparameterization_type not in _TYPES:
            raise ConfigError(f"encoder_reparameterization_type must be one of {_TYPES}, "
                              f"got {self.encoder_reparameterization_type!r}")
        if self.encoder_hidden_size is not None:
            check_number("encoder_hidden_size", self.encoder_hidden_size, low=0, integer=True)
        check_number("encoder_num_layers", self.encoder_num_layers, low=0, integer=True)
        check_number("encoder_dropout", self.encoder_dropout, low=0, high=1, low_inclusive=True)
