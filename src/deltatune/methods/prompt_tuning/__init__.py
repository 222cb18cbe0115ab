"""Prompt tuning: config and prompt encoder, registered as ``PeftType.PROMPT_TUNING``."""

from ...registry import PeftType, PromptMethod, register
from .config import PromptTuningConfig
from .encoder import TASK_TYPES, PromptEmbedding, generate_with_prompts, prompt_inputs, with_prompts

register(PromptMethod(PeftType.PROMPT_TUNING, PromptTuningConfig, PromptEmbedding, model_inputs=prompt_inputs,
                      generate=generate_with_prompts, task_types=TASK_TYPES,
                      checkpoint_keys=("prompt_embeddings",)))

__all__ = ["PromptTuningConfig", "PromptEmbedding", "with_prompts"]
