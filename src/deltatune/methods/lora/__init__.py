"""LoRA (with rsLoRA scaling): config, layers and pure math, registered as ``PeftType.LORA``."""

from ...config import PeftType
from ...registry import Method, register
from .config import DoRAConfig, LoraConfig
from .layer import LoraLayer, is_linear, wrap_module


def _add_adapter(layer: LoraLayer, module_name: str, adapter_name: str, config: LoraConfig,
                 autocast_adapter_dtype: bool = True, device=None) -> None:
    layer.add_adapter(
        adapter_name,
        r=config.rank_for(module_name),
        scaling=config.scaling_for(module_name),
        dropout=config.lora_dropout,
        init=config.init_lora_weights,
        autocast_adapter_dtype=autocast_adapter_dtype,
        use_dora=config.use_dora,
        device=device,
    )


register(Method(PeftType.LORA, LoraConfig, LoraLayer, wrap_module, _add_adapter, is_linear))

__all__ = ["DoRAConfig", "LoraConfig", "LoraLayer"]
