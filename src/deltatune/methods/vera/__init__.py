"""VeRA (vector-based random matrix adaptation): config, layers, shared projections and pure math, registered
as ``PeftType.VERA``."""

from ...registry import Method, PeftType, register
from .config import VeraConfig
from .layer import VeraLayer, is_linear, wrap_module
from .saving import NAMES, load_shared_tensors, shared_tensors
from .shared import projections_for


def _add_adapter(layer: VeraLayer, module_name: str, adapter_name: str, config: VeraConfig,
                 autocast_adapter_dtype: bool = True, device=None) -> None:
    projections = projections_for(config, adapter_name, module_name)
    layer.add_adapter(adapter_name, projections, dropout=config.vera_dropout, init=config.init_weights,
                      d_initial=config.d_initial, autocast_adapter_dtype=autocast_adapter_dtype, device=device)
    projections.join(module_name, layer.in_features, layer.out_features)


register(Method(PeftType.VERA, VeraConfig, VeraLayer, wrap_module, _add_adapter, is_linear,
                checkpoint_keys={"vera": {"vera_lambda_b": "vera_lambda_b", "vera_lambda_d": "vera_lambda_d"}},
                rank_role="vera_lambda_d", prefix="vera_lambda_", shared_names=NAMES, shared_tensors=shared_tensors,
                load_shared_tensors=load_shared_tensors))

__all__ = ["VeraConfig", "VeraLayer"]
