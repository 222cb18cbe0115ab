"""Prompt tuning: config and prompt encoder, registered as ``PeftType.PROMPT_TUNING``."""

from ...config import PeftType
from ...registry import PromptMethod, register
from .config import PromptTuningConfig
from .encoder import PromptEmbedding, with_prompts

register(PromptMethod(PeftType.PROMPT_TUNING, PromptTuningConfig, PromptEmbedding))

__all__ = ["PromptTuningConfig", "PromptEmbedding", "with_prompts"]
