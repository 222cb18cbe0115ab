"""LoHa (low-rank Hadamard product): config, layers and pure math, registered as ``PeftType.LOHA``."""

from ...registry import Method, PeftType, register
from ..lora.layer import is_linear
from ..lycoris_common import add_adapter_from_config
from .config import LoHaConfig
from .layer import ROLES, LoHaLayer, wrap_module

register(Method(PeftType.LOHA, LoHaConfig, LoHaLayer, wrap_module, add_adapter_from_config, is_linear,
                checkpoint_keys={"loha": {role: role for role in ROLES}}, rank_role="hada_w1_b", prefix="hada_"))

__all__ = ["LoHaConfig", "LoHaLayer"]
