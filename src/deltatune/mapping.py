"""Function-style entry points: ``get_peft_model``, ``inject_adapter_in_model`` and the state-dict helpers."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from . import checkpoint as ckpt
from . import injection
from .adapter_tensors import activate
from .config import PeftConfig
from .model import PeftModel
from .tasks import task_model_class
from .registry import get_method


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: Optional[str] = None,
                   low_cpu_mem_usage: bool = False) -> PeftModel:
    """Wrap ``model`` with a first adapter; the wrapper class follows ``peft_config.task_type``.

    Args:
        mixed: Adapters of different methods on one model (peft's ``PeftMixedModel``): not supported.
        revision: The base model's revision, recorded in the adapter's config.
        low_cpu_mem_usage: Create the adapter's tensors empty on the ``meta`` device, to be filled by
            loading (:func:`set_peft_model_state_dict`); the model cannot run before that.

    Example:
        >>> model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
        >>> model.print_trainable_parameters()
    """
    if mixed:
        raise NotImplementedError("mixed=True (adapters of different methods on one model, peft's "
                                  "PeftMixedModel) is not supported by deltatune")
    if revision is not None:
        peft_config = peft_config.replace(revision=revision)
    cls = task_model_class(peft_config.task_type)
    return cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
               low_cpu_mem_usage=low_cpu_mem_usage)


def inject_adapter_in_model(peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False, state_dict: Optional[dict[str, Tensor]] = None,
                            autocast_adapter_dtype: bool = True) -> nn.Module:
    """Inject adapter layers into ``model`` in place, without a PeftModel wrapper; returns ``model``.

    The base is frozen and the new adapter (and its modules_to_save) is active and trainable.
    ``low_cpu_mem_usage``: as in :func:`get_peft_model`. ``state_dict``: an adapter state dict (peft's keys)
    whose modules are adapted instead of ``target_modules`` (only its keys are used, not its values), for
    checkpoints saved without their config's targets.
    """
    if state_dict is not None:
        names = ckpt.adapted_module_names(state_dict)
        if not names:
            raise ValueError(f"state_dict has no adapter keys (e.g. 'x.lora_A.weight'); its keys start {list(state_dict)[:3]}")
        peft_config = peft_config.replace(target_modules=names)
    injected = injection.inject(model, peft_config, adapter_name, get_method(peft_config.peft_type),
                                autocast_adapter_dtype, low_cpu_mem_usage)
    try:
        injection.add_modules_to_save(model, peft_config.modules_to_save, adapter_name)
        activate(model, [adapter_name], {adapter_name: peft_config})
    except Exception:
        injected.undo()
        raise
    return model


def _bias(model: nn.Module, adapter_name: str, config: Optional[PeftConfig]) -> str:
    configs = getattr(model, "peft_config", None)  # (a PeftModel, or a wrapper such as FSDP around one)
    if config is None and isinstance(configs, dict):
        config = configs.get(adapter_name)
    return getattr(config, "bias", "none")


def get_peft_model_state_dict(model: nn.Module, state_dict: Optional[dict] = None, adapter_name: str = "default",
                              config: Optional[PeftConfig] = None) -> dict[str, Tensor]:
    """One adapter's tensors under peft's key names (``base_model.model.`` prefix for a PeftModel).

    Args:
        model: A :class:`PeftModel` or a model adapted with :func:`inject_adapter_in_model`.
        state_dict: If given, values are taken from it (by ``model.state_dict()`` names) instead of the
            live parameters.
        adapter_name: Which adapter.
        config: The adapter's config, needed for ``bias`` with a bare model.
    """
    live = ckpt.saved_tensors(model, adapter_name, _bias(model, adapter_name, config))
    if state_dict is None:  # (an FSDP2 model: DTensor shards, as its own state_dict() holds them)
        return {k: v.detach() for k, v in live.items()}
    return ckpt.values_from_state_dict(model, live, state_dict)


def set_peft_model_state_dict(model: nn.Module, peft_model_state_dict: dict[str, Tensor],
                              adapter_name: str = "default", ignore_mismatched_sizes: bool = False,
                              low_cpu_mem_usage: bool = False, *,
                              config: Optional[PeftConfig] = None) -> ckpt.LoadResult:
    """Load peft-format tensors into adapter ``adapter_name``; all-or-nothing.

    Args:
        ignore_mismatched_sizes: Skip tensors whose shape differs from the model's (with a warning)
            instead of raising :class:`CheckpointError`.
        low_cpu_mem_usage: Accepted for peft compatibility; tensors created empty on the ``meta`` device
            are always loaded by assignment, the others by copying.
        config: The adapter's config, needed for ``bias`` with a bare model.

    Returns:
        ``(missing_keys, unexpected_keys)``: adapter keys the dict did not provide; unexpected keys
        raise instead, so that list is empty.
    """
    weights = dict(peft_model_state_dict)
    if isinstance(model, PeftModel):
        weights = ckpt.from_peft_keys(model, weights, adapter_name)
    return ckpt.load_into(model, weights, adapter_name, _bias(model, adapter_name, config), ignore_mismatched_sizes)
