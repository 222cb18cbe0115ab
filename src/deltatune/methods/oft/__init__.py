"""OFT (orthogonal fine-tuning): config, layers and pure math, registered as ``PeftType.OFT``."""

from ...registry import Method, PeftType, register
from .config import OFTConfig
from .layer import OFTEmbeddingLayer, OFTLayer, is_linear, wrap_module


def _add_adapter(layer: OFTLayer, module_name: str, adapter_name: str, config: OFTConfig,
                 autocast_adapter_dtype: bool = True, device=None) -> None:
    layer.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype, device=device)


register(Method(PeftType.OFT, OFTConfig, OFTLayer, wrap_module, _add_adapter, is_linear,
                checkpoint_keys={"oft": {"oft_R": "oft_R.weight"},
                                 "oft_embedding": {"oft_R": "oft_embedding_R.weight"}}, prefix="oft_"))

__all__ = ["OFTConfig", "OFTEmbeddingLayer", "OFTLayer"]
