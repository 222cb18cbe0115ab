"""Prefix tuning (P-tuning v2): config and prefix encoder, registered as ``PeftType.PREFIX_TUNING``."""

from ...registry import PeftType, PromptMethod, register
from .config import PrefixTuningConfig
from .encoder import TASK_TYPES, PrefixEncoder, generate_with_prefix, prefix_inputs, with_prefix

register(PromptMethod(PeftType.PREFIX_TUNING, PrefixTuningConfig, PrefixEncoder, model_inputs=prefix_inputs,
                      generate=generate_with_prefix, task_types=TASK_TYPES,
                      checkpoint_keys=("prompt_embeddings",)))

__all__ = ["PrefixTuningConfig", "PrefixEncoder", "with_prefix"]
