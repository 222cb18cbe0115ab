"""P-tuning: config and prompt encoder, registered as ``PeftType.P_TUNING``."""

from ...config import PeftType
from ...registry import PromptMethod, register
from .config import PromptEncoderConfig
from .encoder import PromptEncoder

register(PromptMethod(PeftType.P_TUNING, PromptEncoderConfig, PromptEncoder))

__all__ = ["PromptEncoderConfig", "PromptEncoder"]
