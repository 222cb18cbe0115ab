"""Quantized bases (bitsandbytes 4-bit and 8-bit), behind lazy imports: nothing here imports
bitsandbytes until a quantized layer is actually met."""

from .bnb import dequantize_weight, is_quantized, param_numel, prepare_model_for_kbit_training, replace_weight

__all__ = ["dequantize_weight", "is_quantized", "param_numel", "prepare_model_for_kbit_training", "replace_weight"]
