"""Prompt-learning adapters on a model: what every prompt-learning method shares.

A prompt-learning adapter wraps no layers; its encoder (held by the PeftModel as ``prompt_encoder[name]``)
feeds virtual tokens to the forward call. How they enter ``forward`` and ``generate``, and which task
types work, is each method's own (``registry.PromptMethod``); building an encoder that fits the model is
the same for all of them and lives here.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .registry import PromptMethod


@dataclass(frozen=True)
class BuiltPrompt:
    """A new prompt-learning adapter.

    Attributes:
        config: The adapter's config with the model's sizes filled in where it left them unset.
        encoder: Its prompt encoder (on the device and dtype of the model's input embeddings).
    """

    config: object
    encoder: nn.Module


def build_prompt_encoder(method: PromptMethod, config, model: nn.Module) -> BuiltPrompt:
    """Check that ``config`` fits ``model`` (task type, sizes it names) and build its prompt encoder.

    Raises:
        ValueError: The method does not support the config's task type, or a size the config sets
            (e.g. ``token_dim``) differs from the model's: the adapter was made for another model.
    """
    if config.task_type not in method.task_types:
        supported = [getattr(t, "value", t) for t in method.task_types if t is not None]
        raise ValueError(f"{config.peft_type.value} is supported for {supported} models in this version, "
                         f"not {config.task_type.value}")
    found = config.model_sizes(model)
    wrong = [f"{k}={getattr(config, k)} (the model has {found[k]})" for k in config.binding_sizes
             if getattr(config, k) is not None and found.get(k) is not None and getattr(config, k) != found[k]]
    if wrong:
        raise ValueError(f"this {config.peft_type.value} adapter does not fit {type(model).__name__}: "
                         f"{', '.join(wrong)}; it was made for another model")
    config = config.replace(**{k: v for k, v in found.items() if getattr(config, k) is None})
    return BuiltPrompt(config=config, encoder=method.encoder_cls(config, model.get_input_embeddings()))


__all__ = ["BuiltPrompt", "build_prompt_encoder"]
