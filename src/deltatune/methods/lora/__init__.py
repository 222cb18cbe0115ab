"""LoRA (with rsLoRA scaling): config, layers and pure math, registered as ``PeftType.LORA``."""

from ...registry import Method, PeftType, register
from .config import DoRAConfig, LoraConfig
from .layer import LoraLayer, is_linear
from .param import wrap_parameter
from .tokens import CHECKPOINT_KEYS as TOKEN_KEYS
from .tokens import attach
from .weighted import add_weighted_adapter
from .wrap import wrap_module


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
        lora_bias=config.lora_bias,
    )
    layer.adapters[adapter_name].use_rslora = config.use_rslora


#: HF key suffix of each tensor role, per layer ``checkpoint_kind`` (embeddings have their own names).
CHECKPOINT_KEYS = {
    "lora": {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_B_bias": "lora_B.bias",
             "lora_magnitude_vector": "lora_magnitude_vector"},
    "lora_embedding": {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B",
                       "lora_magnitude_vector": "lora_magnitude_vector"},
}

register(Method(PeftType.LORA, LoraConfig, LoraLayer, wrap_module, _add_adapter, is_linear,
                checkpoint_keys={**CHECKPOINT_KEYS, **TOKEN_KEYS}, rank_role="lora_A", prefix="lora_",
                add_weighted_adapter=add_weighted_adapter, wrap_parameter=wrap_parameter, attach=attach))

__all__ = ["DoRAConfig", "LoraConfig", "LoraLayer"]
