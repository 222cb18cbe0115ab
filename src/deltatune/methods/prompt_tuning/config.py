"""``PromptTuningConfig`` (Lester et al., 2021): learned virtual-token embeddings prepended to the input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from ...config import ConfigError, PeftConfig, PeftType, check_number

_INITS = ("RANDOM", "TEXT")


@dataclass
class PromptTuningConfig(PeftConfig):
    """Prompt tuning: ``num_virtual_tokens`` trainable embeddings go before the input embeddings.

    Args:
        num_virtual_tokens: How many virtual tokens (> 0).
        token_dim: Embedding size; filled from the model when None.
        num_transformer_submodules: 1 for decoder-only/encoder models, 2 for encoder-decoder models (as in
            peft: ``2 * num_virtual_tokens`` embeddings, the first half prepended to the encoder input).
        num_attention_heads, num_layers: Recorded from the model, as peft does.
        prompt_tuning_init: ``"RANDOM"`` or ``"TEXT"`` (start from the embeddings of
            ``prompt_tuning_init_text``, tokenized with ``tokenizer_name_or_path``).
    """

    num_virtual_tokens: int = 20
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None
    modules_to_save: Optional[list] = None

    peft_type: ClassVar[PeftType] = PeftType.PROMPT_TUNING
    #: Recorded sizes that must equal the model's (the others are informational, as in peft).
    binding_sizes: ClassVar[tuple] = ("token_dim",)

    def total_virtual_tokens(self) -> int:
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)

    @staticmethod
    def model_sizes(model) -> dict:
        """The sizes this method records from the model (virtual tokens live in the embedding space)."""
        config = getattr(model, "config", None)
        encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        return dict(token_dim=model.get_input_embeddings().embedding_dim,
                    num_transformer_submodules=2 if encoder_decoder else 1,
                    num_layers=getattr(config, "num_hidden_layers", None),
                    num_attention_heads=getattr(config, "num_attention_heads", None))

    def validate(self) -> None:
        check_number("num_virtual_tokens", self.num_virtual_tokens, low=0, integer=True)
        if hasattr(self.prompt_tuning_init, "value"):
            self.prompt_tuning_init = self.prompt_tuning_init.value
        if self.prompt_tuning_init not in _INITS:
            raise ConfigError(f"prompt_tuning_init must be one of {_INITS}, got {self.prompt_tuning_init!r}")
        if self.prompt_tuning_init == "TEXT" and not (self.prompt_tuning_init_text and self.tokenizer_name_or_path):
            raise ConfigError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text and tokenizer_name_or_path")
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ConfigError(f"num_transformer_submodules must be 1 or 2, got {self.num_transformer_submodules!r}")
