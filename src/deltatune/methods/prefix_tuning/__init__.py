"""Prefix tuning (P-tuning v2): config and prefix encoder, registered as ``PeftType.PREFIX_TUNING``."""

from ...config import PeftType
from ...registry import PromptMethod, register
from .config import PrefixTuningConfig
from .encoder import PrefixEncoder, with_prefix

register(PromptMethod(PeftType.PREFIX_TUNING, PrefixTuningConfig, PrefixEncoder))

__all__ = ["PrefixTuningConfig", "PrefixEncoder", "with_prefix"]
