"""The module between a PeftModel and the user's model, and what the PeftModel reads from that model.

Structure (it fixes the checkpoint key prefix ``base_model.model.``)::

    PeftModel
      base_model: AdapterHost
        model: the user's model, with adapter layers injected in place
"""

from __future__ import annotations

import weakref
from typing import Optional

from torch import nn

from . import injection
from .registry import get_method


class AdapterHost(nn.Module):
    """Holds the adapted model as ``.model`` (peft's ``LoraModel`` position); attributes fall through.

    It is also peft's tuner model for code written for peft, which calls ``model.base_model.<method>``:
    ``peft_config``, ``prefix``, ``active_adapters``, ``set_adapter``, ``delete_adapter``,
    ``merge_adapter``/``unmerge_adapter``, ``merge_and_unload``, ``unload``,
    ``disable_adapter_layers``/``enable_adapter_layers``, ``add_weighted_adapter`` and
    ``update_and_allocate`` act on the :class:`~deltatune.PeftModel` that owns this host (without these, the
    names would fall through to the transformers model's own PEFT integration).
    """

    def __init__(self, model: nn.Module, owner: Optional[nn.Module] = None):
        super().__init__()
        self.model = model
        self.set_owner(owner)

    def set_owner(self, owner: Optional[nn.Module]) -> None:
        """Belong to PeftModel ``owner``: a weak reference outside the module tree (no reference cycle, so
        ``del model`` frees its memory at once; nothing in ``modules()`` or the state dict). Copies and
        pickles leave it out; the owner's ``__setstate__`` sets it again."""
        object.__setattr__(self, "_owner", None if owner is None else weakref.ref(owner))

    def __getstate__(self):
        state = super().__getstate__()
        state["_owner"] = None
        return state

    def _peft_model(self) -> nn.Module:
        ref = self.__dict__.get("_owner")
        owner = None if ref is None else ref()
        if owner is None:
            raise ValueError("this AdapterHost belongs to no PeftModel")
        return owner

    # ------------------------------------------------------------------ peft's tuner-model surface
    @property
    def peft_config(self) -> dict:
        return self._peft_model().peft_config

    @property
    def active_adapters(self) -> list[str]:
        return self._peft_model().active_adapters

    @property
    def active_adapter(self):
        return self._peft_model().active_adapter

    @property
    def active_peft_config(self):
        """The config of the (first) active adapter."""
        owner = self._peft_model()
        return owner.peft_config[owner.active_adapters[0]]

    @property
    def prefix(self) -> str:
        """What the adapter tensors' names start with (``"lora_"``, ``"ia3_"``), from the adapters' method."""
        prefixes = {getattr(get_method(c.peft_type), "prefix", None) for c in self.peft_config.values()} - {None}
        if len(prefixes) != 1:  # (not an AttributeError: that would fall through to the transformers model)
            raise ValueError(f"no single tuner prefix for adapters of types "
                                 f"{sorted({c.peft_type.value for c in self.peft_config.values()})}")
        return prefixes.pop()

    def set_adapter(self, adapter_name) -> None:
        self._peft_model().set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self._peft_model().delete_adapter(adapter_name)

    def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
        self._peft_model().merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self._peft_model().unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        return self._peft_model().merge_and_unload(progressbar, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        return self._peft_model().unload()

    def add_weighted_adapter(self, *args, **kwargs) -> None:
        self._peft_model().add_weighted_adapter(*args, **kwargs)

    def update_and_allocate(self, global_step: int) -> None:
        self._peft_model().update_and_allocate(global_step)

    def disable_adapter_layers(self) -> None:
        """Run the base model alone until :meth:`enable_adapter_layers` (merged adapters are unmerged
        first, with a warning, as ``disable_adapter`` does)."""
        self._set_layers_enabled(False)

    def enable_adapter_layers(self) -> None:
        self._set_layers_enabled(True)

    def _set_layers_enabled(self, enabled: bool) -> None:
        owner = self._peft_model()
        if owner._prompt_names():
            raise ValueError("prompt-learning adapters have no adapter layers to switch; use "
                             "`with model.disable_adapter():` instead")
        if not enabled:
            owner._unmerge_first("disable_adapter_layers")
        for _, module in list(injection.adapter_layers(self.model)) + list(injection.saved_module_wrappers(self.model)):
            module.set_disabled(not enabled)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


def uses_checkpointing(model: nn.Module) -> bool:
    """Whether ``model`` (a transformers model) has gradient checkpointing switched on."""
    # transformers 5 renamed the flag; read whichever exists without tripping deprecation warnings.
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if attr in dir(type(model)):
            return bool(getattr(model, attr))
    return False


def inputs_require_grad(peft_model: nn.Module) -> None:
    """Make the base model's embedding outputs require grad (transformers' ``enable_input_require_grads``), so
    adapters inside checkpointed blocks receive gradients with a frozen embedding layer."""
    enable = getattr(peft_model.base_model.model, "enable_input_require_grads", None)
    if callable(enable):
        enable()


def gradient_checkpointing_enable(peft_model: nn.Module, gradient_checkpointing_kwargs: Optional[dict] = None) -> None:
    """``PeftModel.gradient_checkpointing_enable``: the base model's, plus :func:`inputs_require_grad`."""
    peft_model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
    inputs_require_grad(peft_model)


__all__ = ["AdapterHost", "gradient_checkpointing_enable", "inputs_require_grad", "uses_checkpointing"]
