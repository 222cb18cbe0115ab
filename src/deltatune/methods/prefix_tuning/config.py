"""``PrefixTuningConfig`` (Li & Liang, 2021; P-tuning v2): trainable key/value prefixes in every layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from ...config import PeftType, check_number
from ..prompt_tuning.config import PromptTuningConfig
from .encoder import cache_kwarg


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
    binding_sizes: ClassVar[tuple] = ("token_dim", "num_attention_heads", "num_layers", "num_transformer_submodules")

    def validate(self) -> None:
        super().validate()
        if self.encoder_hidden_size is not None:
            check_number("encoder_hidden_size", self.encoder_hidden_size, low=0, integer=True)

    @staticmethod
    def model_sizes(model) -> dict:
        """Key/value sizes of the attention that receives the prefixes.

        Decoder-only and encoder models: every layer (grouped-query attention included). Encoder-decoder
        models: the decoder's self-attention (``num_transformer_submodules=2``, peft's record for them).
        """
        config = getattr(model, "config", None)
        get_text = getattr(config, "get_text_config", None)
        config = get_text() if callable(get_text) else config
        encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        names = ("num_decoder_layers", "decoder_layers") if encoder_decoder else ()
        layers = _first(config, *names, "num_hidden_layers")
        names = ("decoder_attention_heads",) if encoder_decoder else ()
        heads = _first(config, *names, "num_attention_heads")
        if heads is None or layers is None or cache_kwarg(model) is None:
            raise ValueError(
                f"prefix tuning needs a transformers model whose attention takes a key/value cache (a `cache` or "
                f"`past_key_values` argument, and config.num_hidden_layers / num_attention_heads); "
                f"{type(model).__name__} has none: use prompt tuning, P-tuning or LoRA for it")
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = _first(config, "head_dim", "d_kv") or config.hidden_size // heads
        return dict(token_dim=head_dim * kv_heads, num_attention_heads=kv_heads, num_layers=layers,
                    num_transformer_submodules=2 if encoder_decoder else 1)


def _first(config, *names):
    """The first of ``names`` that ``config`` sets (not None)."""
    return next((v for v in (getattr(config, n, None) for n in names) if v is not None), None)

