"""AdaLoRA: config, SVD layers, rank allocator; registered as ``PeftType.ADALORA``."""

from ...registry import Method, PeftType, register
from ..lora.layer import is_linear
from .allocator import RankAllocator, orthogonality_penalty, update_and_allocate
from .config import AdaLoraConfig
from .layer import SVDLinear, wrap_module


def _add_adapter(layer: SVDLinear, module_name: str, adapter_name: str, config: AdaLoraConfig,
                 autocast_adapter_dtype: bool = True, device=None) -> None:
    layer.add_adapter(adapter_name, r=config.rank_for(module_name), r0=config.init_r,
                      scaling=config.lora_alpha if config.lora_alpha > 0 else float(config.init_r),
                      dropout=config.lora_dropout, init=config.init_lora_weights,
                      autocast_adapter_dtype=autocast_adapter_dtype, device=device)


def _add_orth_loss(peft_model, outputs, config: AdaLoraConfig, adapter_name: str):
    """In training, the orthogonality penalty joins the loss: ``loss + w * R(A, B)``."""
    loss = getattr(outputs, "loss", None)
    if peft_model.training and loss is not None and config.orth_reg_weight > 0:
        outputs.loss = loss + config.orth_reg_weight * orthogonality_penalty(peft_model.base_model.model, adapter_name)
    return outputs


register(Method(PeftType.ADALORA, AdaLoraConfig, SVDLinear, wrap_module, _add_adapter, is_linear,
                adjust_output=_add_orth_loss, rank_role="lora_A", update_and_allocate=update_and_allocate,
                checkpoint_keys={"adalora": {"lora_A": "lora_A", "lora_B": "lora_B", "lora_E": "lora_E"}},
                prefix="lora_"))

__all__ = ["AdaLoraConfig", "RankAllocator", "SVDLinear", "update_and_allocate"]
