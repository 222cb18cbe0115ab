"""P-tuning: config and prompt encoder, registered as ``PeftType.P_TUNING``.

Its virtual tokens enter the model as prompt tuning's do (in front of the input embeddings).
"""

from ...registry import PeftType, PromptMethod, register
from ..prompt_tuning.encoder import TASK_TYPES, generate_with_prompts, prompt_inputs
from .config import PromptEncoderConfig
from .encoder import PromptEncoder

register(PromptMethod(PeftType.P_TUNING, PromptEncoderConfig, PromptEncoder, model_inputs=prompt_inputs,
                      generate=generate_with_prompts, task_types=TASK_TYPES,
                      checkpoint_keys=("prompt_embeddings",)))

__all__ = ["PromptEncoderConfig", "PromptEncoder"]
