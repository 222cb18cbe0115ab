"""VeRA (vector-based random matrix adaptation): config, layers, shared projections and pure math, registered
as ``PeftType.VERA``."""

from ...registry import Method, PeftType, register
from .config import VeraConfig
from .layer import VeraLayer, is_linear, wrap_module
from .shared import projections_for


def _add_adapter(layer: VeraLayer, module_name: str, adapter_name: str, config: VeraConfig,
                 autocast_adapter_dtype: bool = True, device=None) -> None:
    if config.save_projection:
        # peft saves the projections under model-level keys (base_model.vera_A / vera_B) that the checkpoint
        # code cannot yet write or read for a layer method: refuse now rather than fail at save or load.
        raise ValueError("VeRA with save_projection=True is not supported yet: deltatune cannot save or load the "
                         "model-level vera_A/vera_B tensors; use VeraConfig(save_projection=False) (the projections "
                         "are regenerated from projection_prng_key, as peft does for such checkpoints)")
    projections = projections_for(config, adapter_name, module_name)
    layer.add_adapter(adapter_name, projections, dropout=config.vera_dropout, init=config.init_weights,
                      d_initial=config.d_initial, autocast_adapter_dtype=autocast_adapter_dtype, device=device)
    projections.join(module_name, layer.in_features, layer.out_features)


register(Method(PeftType.VERA, VeraConfig, VeraLayer, wrap_module, _add_adapter, is_linear,
                checkpoint_keys={"vera": {"vera_lambda_b": "vera_lambda_b", "vera_lambda_d": "vera_lambda_d"}},
                rank_role="vera_lambda_d", prefix="vera_lambda_"))

__all__ = ["VeraConfig", "VeraLayer"]
