"""LoKr (low-rank Kronecker product): config, layers and pure math, registered as ``PeftType.LOKR``."""

from ...registry import Method, PeftType, register
from ..lora.layer import is_linear
from ..lycoris_common import add_adapter_from_config
from .config import LoKrConfig
from .layer import ROLES, LoKrLayer, wrap_module


def _add_adapter(layer: LoKrLayer, module_name: str, adapter_name: str, config: LoKrConfig,
                 autocast_adapter_dtype: bool = True, device=None) -> None:
    add_adapter_from_config(layer, module_name, adapter_name, config, autocast_adapter_dtype, device,
                            decompose_both=config.decompose_both, decompose_factor=config.decompose_factor,
                            rank_dropout_scale=config.rank_dropout_scale)


register(Method(PeftType.LOKR, LoKrConfig, LoKrLayer, wrap_module, _add_adapter, is_linear,
                checkpoint_keys={"lokr": {role: role for role in ROLES}}, rank_role="lokr_w2_b", prefix="lokr_"))

__all__ = ["LoKrConfig", "LoKrLayer"]
