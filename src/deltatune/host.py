"""The module between a PeftModel and the user's model, and what the PeftModel reads from that model.

Structure (it fixes the checkpoint key prefix ``base_model.model.``)::

    PeftModel
      base_model: AdapterHost
        model: the user's model, with adapter layers injected in place
"""

from __future__ import annotations

from torch import nn


class AdapterHost(nn.Module):
    """Holds the adapted model as ``.model`` (peft's ``LoraModel`` position); attributes fall through."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

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


__all__ = ["AdapterHost", "uses_checkpointing"]
