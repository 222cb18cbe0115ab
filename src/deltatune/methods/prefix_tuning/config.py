"""``PrefixTuningConfig`` (Li & Liang, 2021; P-tuning v2): trainable key/value prefixes in every layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from ...config import PeftType, check_number
from ..prompt_tuning.config import PromptTuningConfig


@dataclass
class PrefixTuningConfig(PromptTuningConfig):
    """Prefix tuning: ``num_virtual_tokens`` keys and values per layer, prepended to the attention's cache.

    Args:
        prefix_projection: Reparameterise the prefixes with a two-layer MLP (tanh) while training.
        encoder_hidden_size: That MLP's hidden size (default: the key/value size).
        token_dim / num_attention_heads / num_layers: Key/value size (heads x head size), key/value heads
            and layers; filled from the model.
    """

    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False
    prompt_tuning_init: ClassVar[str] = "RANDOM"
    prompt_tuning_init_text: ClassVar[None] = None
    tokenizer_name_or_path: ClassVar[None] = None
    tokenizer_kwargs: ClassVar[None] = None

    peft_type: ClassVar[PeftType] = PeftType.PREFIX_TUNING
    compat_fields: ClassVar[dict] = {"init_weights": None}

    def validate(self) -> None:
        super().validate()
        if self.num_transformer_submodules not in (None, 1):
            from ...config import ConfigError

            raise ConfigError("prefix tuning for encoder-decoder models is not supported yet")
        if self.encoder_hidden_size is not None:
            check_number("encoder_hidden_size", self.encoder_hidden_size, low=0, integer=True)

    @staticmethod
    def model_sizes(model) -> dict:
        """Key/value sizes of a transformers decoder (grouped-query attention included)."""
        config = getattr(model, "config", None)
        get_text = getattr(config, "get_text_config", None)
        config = get_text() if callable(get_text) else config
        heads = getattr(config, "num_attention_heads", None)
        layers = getattr(config, "num_hidden_layers", None)
        if heads is None or layers is None:
            raise ValueError("prefix tuning needs a transformers model with a key/value cache "
                             "(config.num_hidden_layers / num_attention_heads); this model has none")
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return dict(token_dim=head_dim * kv_heads, num_attention_heads=kv_heads, num_layers=layers,
                    num_transformer_submodules=1)
