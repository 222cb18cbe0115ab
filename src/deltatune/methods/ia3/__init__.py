"""(IA)^3: config, layers and pure math, registered as ``PeftType.IA3``."""

from ...registry import Method, PeftType, register
from ..lora.layer import is_linear
from .config import IA3Config
from .layer import IA3Layer, wrap_module


def _add_adapter(layer: IA3Layer, module_name: str, adapter_name: str, config: IA3Config,
                 autocast_adapter_dtype: bool = True, device=None) -> None:
    layer.add_adapter(adapter_name, feedforward=config.is_feedforward(module_name), init=config.init_ia3_weights,
                      autocast_adapter_dtype=autocast_adapter_dtype, device=device)


register(Method(PeftType.IA3, IA3Config, IA3Layer, wrap_module, _add_adapter, is_linear,
                checkpoint_keys={"ia3": {"ia3_l": "ia3_l"}}, prefix="ia3_"))

__all__ = ["IA3Config", "IA3Layer"]
