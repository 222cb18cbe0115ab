"""VeRA (vector-based random matrix adaptation): config, layers, shared projections and pure math, registered
as ``PeftType.VERA``."""

from ...injection import adapter_layers
from ...registry import Method, PeftType, register
from .config import VeraConfig
from .layer import VeraLayer, is_linear, wrap_module
from .saving import NAMES, load_shared_tensors, shared_tensors
from .shared import Projections, share


def _add_adapter(layer: VeraLayer, module_name: str, adapter_name: str, config: VeraConfig,
                 autocast_adapter_dtype: bool = True, device=None) -> None:
    # (a pair of its own for now: _share gives all of the injection's layers one, sized over all of them)
    projections = Projections(config.projection_prng_key, config.r, saved=config.save_projection, pending=True)
    layer.add_adapter(adapter_name, projections, dropout=config.vera_dropout, init=config.init_weights,
                      d_initial=config.d_initial, autocast_adapter_dtype=autocast_adapter_dtype, device=device)
    projections.join(module_name, layer.in_features, layer.out_features)


def _share(model, config: VeraConfig, adapter_name: str, autocast_adapter_dtype: bool = True, device=None) -> list:
    """The registry's ``attach`` hook, run once the injection's layers are in: one pair for all of them."""
    fresh, existing = [], {}
    for _, layer in adapter_layers(model, VeraLayer):
        ad = layer.adapters[adapter_name] if adapter_name in layer.adapters else None
        if ad is not None:
            if ad.projections.pending:
                fresh.append(ad)
            else:
                existing[id(ad.projections)] = ad.projections
    share(fresh, list(existing.values()))
    return []


register(Method(PeftType.VERA, VeraConfig, VeraLayer, wrap_module, _add_adapter, is_linear,
                checkpoint_keys={"vera": {"vera_lambda_b": "vera_lambda_b", "vera_lambda_d": "vera_lambda_d"}},
                rank_role="vera_lambda_d", prefix="vera_lambda_", shared_names=NAMES, shared_tensors=shared_tensors,
                load_shared_tensors=load_shared_tensors, attach=_share))

__all__ = ["VeraConfig", "VeraLayer"]
